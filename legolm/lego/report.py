"""The quality/speed table of ``legolm lego``: perplexities and measured early-exit decode speed per setting.

A setting is a threshold τ and a ``kv_mode``. Decode speed is measured, not modelled: every
setting greedily decodes the same real prompts at batch 1 with `generate_with_early_exit`, and
the baseline is the same code at full depth (``routing_threshold=None``: no shallow exit, upper
layers every step). Rounds interleave the settings so that a slow moment of a shared machine hits
all of them alike; the median round counts. ``wall/compute`` is the measured wall-clock saving
over the compute saving (token-layer evaluations; 1.0 = the time saved is all the skipped layer
work; the issue asks >= 0.8). The table also gives the cost in layer calls (what a GPU at batch 1,
bound by reading weights, pays) and in weight multiply-adds, which charge the shallow exit's head
that every routed step evaluates and the layer counts leave out.

Quality, per setting: the soft-routed and hard-routed perplexity of full forward passes over the
validation windows (`TokenScores`), and the decode-path perplexity: the validation text scored
token by token through the early-exit decoder with that setting's cache (teacher forcing), which
is what ``skip``/``propagate`` change (``fill`` equals the hard-routed one).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from legolm.generation.early_exit import KVMode, decode_path_nll, generate_with_early_exit
from legolm.lego.evaluate import TokenScores
from legolm.model.lego import LegoLM
from legolm.utils.io import atomic_savefig


@dataclass
class Setting:
    """One point of the curve: how τ was chosen, τ (None = full-depth baseline) and the cache mode."""

    label: str
    threshold: float | None
    kv_mode: KVMode


@dataclass
class DecodeMeasure:
    """One setting's decoding over all prompts (summed), the median of the timed rounds.

    Attributes:
        decode_s: Decode wall time of all prompts (prefill excluded), median round.
        tokens: Tokens generated over all prompts.
        shallow_ratio: Generated tokens from the shallow exit.
        compute_cost: Decode token-layer evaluations ÷ (decode steps × L), over all prompts.
        call_cost: Decode layer calls ÷ (decode steps × L).
        macs_cost: Decode weight multiply-adds (both exits' heads included) ÷ full depth's.
    """

    decode_s: float
    tokens: int
    shallow_ratio: float
    compute_cost: float
    call_cost: float
    macs_cost: float


def measure_decode(model: LegoLM, prompts: Tensor, settings: list[Setting], max_new_tokens: int,
                   repeats: int = 3, warmup: int = 1, progress: bool = False) -> list[DecodeMeasure]:
    """Greedy early-exit decoding of each prompt row (batch 1) in each setting, timed.

    Args:
        model: Extended LEGO model (eval mode, on its device).
        prompts: (n, P) prompt ids; each row is decoded alone.
        settings: Thresholds and cache modes (threshold None = the full-depth baseline).
        max_new_tokens: Tokens per prompt (no EOS stop).
        repeats: Timed rounds (median reported).
        warmup: Untimed rounds first.
        progress: Show a tqdm bar (one tick per setting and round).
    """
    device = next(model.parameters()).device
    times: list[list[float]] = [[] for _ in settings]
    last: list[list] = [[] for _ in settings]
    bar = tqdm(total=(warmup + repeats) * len(settings), desc="decode timing", unit="run", disable=not progress)
    for r in range(warmup + repeats):
        for i, s in enumerate(settings):
            bar.update()
            last[i] = [generate_with_early_exit(model, row[None].to(device), max_new_tokens, s.threshold,
                                                kv_mode=s.kv_mode).stats for row in prompts]
            if r >= warmup:
                times[i].append(sum(st.decode_s for st in last[i]))
    out = []
    L = model.n_layer
    for i in range(len(settings)):
        stats = last[i]
        steps = sum(st.decode_steps for st in stats)
        tokens = sum(st.shallow_count + st.deep_count for st in stats)
        out.append(DecodeMeasure(
            decode_s=statistics.median(times[i]), tokens=tokens,
            shallow_ratio=sum(st.shallow_count for st in stats) / tokens,
            compute_cost=sum(st.token_layer_evals for st in stats) / (steps * L),
            call_cost=sum(st.layer_calls - st.prefill_layer_calls for st in stats) / (steps * L),
            macs_cost=sum(st.macs_cost * st.decode_steps for st in stats) / steps,
        ))
    return out


def decode_path_ppl(model: LegoLM, windows: Tensor, prompt_len: int, setting: Setting,
                    progress: bool = False) -> float:
    """Perplexity of ``windows[:, prompt_len:]`` along the decode path of ``setting`` (batch 1 per window)."""
    assert setting.threshold is not None
    device = next(model.parameters()).device
    nll = n = 0.0
    for row in tqdm(windows, desc=f"decode-path ppl ({setting.label}, {setting.kv_mode})", unit="window",
                    disable=not progress, leave=False):
        row_nll, row_n, _ = decode_path_nll(model, row[None].to(device), prompt_len, setting.threshold,
                                            setting.kv_mode)
        nll, n = nll + row_nll, n + row_n
    return math.exp(nll / n)


def val_windows(ids: np.ndarray, n: int, length: int, offset: int = 0) -> Tensor:
    """``n`` windows of ``length`` tokens at evenly spaced starts of a token stream: (n, length).

    ``offset`` shifts every start (so that timing prompts and scoring windows differ).
    """
    starts = np.linspace(0, len(ids) - length - offset - 1, n).astype(np.int64) + offset
    return torch.from_numpy(np.stack([np.asarray(ids[s : s + length], dtype=np.int64) for s in starts]))


@dataclass
class CurveRow:
    """One setting of the quality/speed curve.

    Attributes:
        label: How τ was chosen (calibrated, a target ratio, never/always exit).
        kv_mode: Upper-cache handling of exited tokens.
        threshold: τ.
        routed_ppl: Soft-routed perplexity at τ (training's continuous weights), full forward.
        hard_routed_ppl: Perplexity under generation's hard rule at τ, full forward.
        decode_ppl: Perplexity along the decode path with this kv_mode (teacher forcing).
        eval_shallow_ratio: Validation tokens that exit at τ.
        gen_shallow_ratio: Generated tokens that exited.
        compute_cost: Token-layer evaluations ÷ full depth while decoding.
        call_cost: Layer calls ÷ full depth while decoding.
        macs_cost: Weight multiply-adds (shallow and deep heads included) ÷ full depth while decoding.
        speedup: Full-depth decode time ÷ this setting's.
        wall_over_compute: (1 - time/full-depth time) ÷ (1 - compute_cost).
        tok_per_s: Generated tokens per second of decode time.
    """

    label: str
    kv_mode: str
    threshold: float
    routed_ppl: float
    hard_routed_ppl: float
    decode_ppl: float
    eval_shallow_ratio: float
    gen_shallow_ratio: float
    compute_cost: float
    call_cost: float
    macs_cost: float
    speedup: float
    wall_over_compute: float
    tok_per_s: float


def curve_row(scores: TokenScores, temperature: float, setting: Setting, measured: DecodeMeasure,
              baseline: DecodeMeasure, decode_ppl: float) -> CurveRow:
    """Join evaluation scores and the decode measurement of one setting."""
    tau = setting.threshold
    assert tau is not None
    saved = 1.0 - measured.compute_cost
    wall = 1.0 - measured.decode_s / baseline.decode_s
    return CurveRow(
        label=setting.label, kv_mode=setting.kv_mode, threshold=tau, routed_ppl=scores.routed_ppl(tau, temperature),
        hard_routed_ppl=scores.hard_routed_ppl(tau), decode_ppl=decode_ppl,
        eval_shallow_ratio=scores.shallow_ratio(tau), gen_shallow_ratio=measured.shallow_ratio,
        compute_cost=measured.compute_cost, call_cost=measured.call_cost,
        macs_cost=measured.macs_cost, speedup=baseline.decode_s / measured.decode_s,
        wall_over_compute=wall / saved if saved > 1e-9 else math.nan, tok_per_s=measured.tokens / measured.decode_s,
    )


def format_table(rows: list[CurveRow], phase1_ppl: float, deep_ppl: float) -> str:
    """One markdown table: phase-1, deep and routed perplexity, shallow ratio, compute cost, speedup."""
    head = ("| threshold | kv | τ | phase-1 PPL | deep PPL | routed PPL | hard-routed PPL | decode-path PPL "
            "| shallow ratio (val / gen) | compute cost | calls | MACs | decode speedup | wall/compute | tok/s |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        woc = "—" if math.isnan(r.wall_over_compute) else f"{r.wall_over_compute:.2f}"
        lines.append(f"| {r.label} | {r.kv_mode} | {r.threshold:.4f} | {phase1_ppl:.2f} | {deep_ppl:.2f} | "
                     f"{r.routed_ppl:.2f} | {r.hard_routed_ppl:.2f} | {r.decode_ppl:.2f} | "
                     f"{r.eval_shallow_ratio:.3f} / {r.gen_shallow_ratio:.3f} | {r.compute_cost:.3f} | "
                     f"{r.call_cost:.3f} | {r.macs_cost:.3f} | {r.speedup:.2f}x | {woc} | {r.tok_per_s:,.0f} |")
    return "\n".join(lines)


def plot_curve(rows: list[CurveRow], path: Path, phase1_ppl: float, deep_ppl: float) -> str | None:
    """Save decode-path perplexity against measured decode speedup (one line per kv mode) as a PNG.

    Returns a note instead when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"{path.name} skipped: pip install matplotlib to draw the quality/speed curve"
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for mode, style in (("fill", "o-"), ("skip", "s--"), ("propagate", "^:")):
        pts = sorted((r for r in rows if r.kv_mode == mode), key=lambda r: r.speedup)
        if not pts:
            continue
        ax.plot([r.speedup for r in pts], [r.decode_ppl for r in pts], style, label=f"decode-path PPL, kv {mode}")
        for r in pts:
            ax.annotate(f"{r.label}\ncost {r.compute_cost:.2f}", (r.speedup, r.decode_ppl), fontsize=6,
                        textcoords="offset points", xytext=(4, 4))
    ax.axhline(phase1_ppl, color="gray", ls=":", label=f"phase-1 (shallow) PPL {phase1_ppl:.2f}")
    ax.axhline(deep_ppl, color="black", ls=":", label=f"deep PPL {deep_ppl:.2f}")
    ax.set_xlabel("measured decode speedup vs full depth (same code)")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    return None
