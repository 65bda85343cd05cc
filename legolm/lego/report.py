"""The quality/speed table of ``legolm lego``: perplexities and measured early-exit decode speed per threshold.

Decode speed is measured, not modelled: every threshold decodes the same real prompts at batch 1
with `generate_with_early_exit`, and the baseline is the same code at full depth
(``routing_threshold=None``: no shallow exit, upper layers every step). Rounds interleave the
thresholds so that a slow moment of a shared machine hits all of them alike; the median round
counts. ``wall/compute`` is the measured wall-clock saving over the reported compute saving
(1.0 = the time saved is all the layer calls skipped; the issue asks >= 0.8).
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from legolm.lego.early_exit import KVMode, generate_with_early_exit
from legolm.lego.evaluate import TokenScores
from legolm.lego.model import LegoLM


@dataclass
class DecodeMeasure:
    """One threshold's decoding over all prompts (summed), the median of the timed rounds.

    Attributes:
        threshold: τ (None = the full-depth baseline).
        decode_s: Decode wall time of all prompts (prefill excluded), median round.
        tokens: Tokens generated over all prompts.
        shallow_ratio: Generated tokens from the shallow exit.
        compute_cost: Decode layer calls ÷ (decode steps × L), over all prompts.
        token_cost: Decode token-layer evaluations ÷ (decode steps × L).
    """

    threshold: float | None
    decode_s: float
    tokens: int
    shallow_ratio: float
    compute_cost: float
    token_cost: float


def measure_decode(model: LegoLM, prompts: Tensor, thresholds: list[float | None], max_new_tokens: int,
                   kv_mode: KVMode = "fill", repeats: int = 3, warmup: int = 1) -> list[DecodeMeasure]:
    """Greedy early-exit decoding of each prompt row (batch 1) at each threshold, timed.

    Args:
        model: Extended LEGO model (eval mode, on its device).
        prompts: (n, P) prompt ids; each row is decoded alone.
        thresholds: τ values; None = the full-depth baseline of the same code.
        max_new_tokens: Tokens per prompt (no EOS stop).
        kv_mode: Upper-cache handling of exited tokens.
        repeats: Timed rounds (median reported).
        warmup: Untimed rounds first.
    """
    device = next(model.parameters()).device
    times: dict[int, list[float]] = {i: [] for i in range(len(thresholds))}
    last: dict[int, list[Any]] = {}
    for r in range(warmup + repeats):
        for i, tau in enumerate(thresholds):
            stats = [generate_with_early_exit(model, row[None].to(device), max_new_tokens, tau,
                                              kv_mode=kv_mode).stats for row in prompts]
            if r >= warmup:
                times[i].append(sum(s.decode_s for s in stats))
            last[i] = stats
    out = []
    L = model.n_layer
    for i, tau in enumerate(thresholds):
        stats = last[i]
        steps = sum(s.decode_steps for s in stats)
        tokens = sum(s.shallow_count + s.deep_count for s in stats)
        out.append(DecodeMeasure(
            threshold=tau, decode_s=statistics.median(times[i]), tokens=tokens,
            shallow_ratio=sum(s.shallow_count for s in stats) / tokens,
            compute_cost=sum(s.layer_calls - s.prefill_layer_calls for s in stats) / (steps * L),
            token_cost=sum(s.token_layer_cost * s.decode_steps for s in stats) / steps,
        ))
    return out


def val_prompts(ids: np.ndarray, n: int, length: int) -> Tensor:
    """``n`` prompts of ``length`` tokens from evenly spaced offsets of a token stream: (n, length)."""
    starts = np.linspace(0, len(ids) - length - 1, n).astype(np.int64)
    return torch.from_numpy(np.stack([np.asarray(ids[s : s + length], dtype=np.int64) for s in starts]))


@dataclass
class CurveRow:
    """One threshold of the quality/speed curve.

    Attributes:
        label: How τ was chosen (calibrated, a target ratio, never/always exit).
        threshold: τ.
        routed_ppl: Soft-routed perplexity at τ (training's continuous weights).
        hard_routed_ppl: Perplexity under generation's hard rule at τ.
        eval_shallow_ratio: Validation tokens that exit at τ.
        gen_shallow_ratio: Generated tokens that exited.
        compute_cost: Layer calls ÷ full depth while decoding.
        token_cost: Token-layer evaluations ÷ full depth while decoding.
        speedup: Full-depth decode time ÷ this threshold's.
        wall_over_compute: (1 - time/full-depth time) ÷ (1 - compute_cost).
        tok_per_s: Generated tokens per second of decode time.
    """

    label: str
    threshold: float
    routed_ppl: float
    hard_routed_ppl: float
    eval_shallow_ratio: float
    gen_shallow_ratio: float
    compute_cost: float
    token_cost: float
    speedup: float
    wall_over_compute: float
    tok_per_s: float


def curve_rows(scores: TokenScores, temperature: float, labelled: list[tuple[str, float]],
               measured: list[DecodeMeasure], baseline: DecodeMeasure) -> list[CurveRow]:
    """Join evaluation scores and decode measurements per threshold."""
    rows = []
    for (label, tau), m in zip(labelled, measured, strict=True):
        saved = 1.0 - m.compute_cost
        wall = 1.0 - m.decode_s / baseline.decode_s
        rows.append(CurveRow(
            label=label, threshold=tau, routed_ppl=scores.routed_ppl(tau, temperature),
            hard_routed_ppl=scores.hard_routed_ppl(tau), eval_shallow_ratio=scores.shallow_ratio(tau),
            gen_shallow_ratio=m.shallow_ratio, compute_cost=m.compute_cost, token_cost=m.token_cost,
            speedup=baseline.decode_s / m.decode_s, wall_over_compute=wall / saved if saved > 0 else math.nan,
            tok_per_s=m.tokens / m.decode_s,
        ))
    return rows


def format_table(rows: list[CurveRow], phase1_ppl: float, deep_ppl: float) -> str:
    """One markdown table: phase-1, deep and routed perplexity, shallow ratio, compute cost, speedup."""
    head = ("| threshold | τ | phase-1 PPL | deep PPL | routed PPL | hard-routed PPL | shallow ratio (val / gen) "
            "| compute cost | decode speedup | wall/compute | tok/s |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        woc = "—" if math.isnan(r.wall_over_compute) else f"{r.wall_over_compute:.2f}"
        lines.append(f"| {r.label} | {r.threshold:.4f} | {phase1_ppl:.2f} | {deep_ppl:.2f} | {r.routed_ppl:.2f} | "
                     f"{r.hard_routed_ppl:.2f} | {r.eval_shallow_ratio:.3f} / {r.gen_shallow_ratio:.3f} | "
                     f"{r.compute_cost:.3f} | {r.speedup:.2f}x | {woc} | {r.tok_per_s:,.0f} |")
    return "\n".join(lines)


def rows_as_dicts(rows: list[CurveRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def plot_curve(rows: list[CurveRow], path: Path, phase1_ppl: float, deep_ppl: float) -> str | None:
    """Save routed perplexity against measured decode speedup as a PNG; a note instead without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"{path.name} skipped: pip install matplotlib to draw the quality/speed curve"
    ordered = sorted(rows, key=lambda r: r.speedup)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [r.speedup for r in ordered]
    ax.plot(x, [r.hard_routed_ppl for r in ordered], "o-", label="routed PPL, generation rule (hard τ)")
    ax.plot(x, [r.routed_ppl for r in ordered], "s--", label="routed PPL, soft weights", alpha=0.7)
    for r in ordered:
        ax.annotate(f"{r.label}\ncost {r.compute_cost:.2f}", (r.speedup, r.hard_routed_ppl), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.axhline(phase1_ppl, color="gray", ls=":", label=f"phase-1 (shallow) PPL {phase1_ppl:.2f}")
    ax.axhline(deep_ppl, color="black", ls=":", label=f"deep PPL {deep_ppl:.2f}")
    ax.set_xlabel("measured decode speedup vs full depth (same code)")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return None
