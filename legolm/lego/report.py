"""The tables of ``legolm lego``: quality of the exits, and measured LEGO decoding against full depth.

Quality (`quality_table`): perplexity of the shallow exit, the deep exit and the routed mixture
(soft weights, as trained; and generation's hard rule) over all validation tokens and over the
hard ones (shallow confidence below τ).

Decoding (`measure_decode`): every setting greedily decodes the same real prompts at batch 1 as
whole `generate` calls (prefill included), and the baseline is the fastest full-depth decoder of
the same model: the fused Triton decoder on a GPU (``generate --fused``), the static-cache decoder
on a CPU. Rounds interleave the settings so that a slow moment of a shared machine hits all of them
alike; the median round counts. A setting is

* ``threshold`` at τ with a ``kv_mode`` (early exit: confident tokens skip the upper layers), or
* ``speculative`` with d drafts (the shallow exit drafts, the upper layers verify; lossless).

Per setting: the decode-path perplexity (the validation text scored token by token through the
decoder's rule and cache, teacher-forced; ``fill`` equals the hard-routed one, ``skip`` and
``propagate`` show what their approximate caches cost; speculative output is the deep model's),
the shallow ratio (threshold) or acceptance rate (speculative), the cost against full depth in
layer calls and in weights read per token (what batch-1 decoding is bound by), tok/s, the speedup,
and ``wall/call``: the measured wall-clock saving over the call-cost saving (1.0 = the time saved
is all the skipped layer calls).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from legolm.generation import GenerationConfig, GenerationResult, generate
from legolm.generation.early_exit import KVMode, decode_path_nll
from legolm.generation.fused import FusedBlocks
from legolm.lego.evaluate import TokenScores
from legolm.model.lego import LegoLM, exits
from legolm.utils.finite import safe_exp
from legolm.utils.io import atomic_savefig, pyplot


@dataclass
class Setting:
    """One decoder: ``full`` depth, ``threshold`` early exit at τ with a kv mode, or ``speculative`` with d drafts."""

    label: str
    mode: str
    threshold: float | None = None
    kv_mode: KVMode = "fill"
    draft_tokens: int = 0
    if_nodes: bool = False

    def config(self, max_new_tokens: int, fused: bool, kernel: FusedBlocks) -> GenerationConfig:
        """The `GenerationConfig` of this setting (greedy, no EOS stop: every setting decodes as many tokens);
        ``kernel``: the fused blocks (`GenerationConfig.fused_kernel`) of every fused row. ``if_nodes`` picks
        threshold rows' branch (an IF node, or the host read); speculative rows run as `generate` does
        by default (each round an IF node gated on "more tokens wanted", where the driver has them)."""
        fast = fused and (self.mode != "threshold" or self.kv_mode != "propagate")
        early = {"full": "none"}.get(self.mode, self.mode)
        return GenerationConfig(max_new_tokens=max_new_tokens, greedy=True, stop_at_eos=False, fused=fast,
                                fused_kernel=kernel,
                                early_exit=early, threshold=self.threshold, kv_mode=self.kv_mode,  # type: ignore[arg-type]
                                draft_tokens=max(self.draft_tokens, 1),
                                fused_if_nodes=self.if_nodes if self.mode == "threshold" else None)


@dataclass
class DecodeMeasure:
    """One setting's decoding of all prompts: the median round's wall time and the stats summed over prompts.

    Attributes:
        wall_s: Whole calls (prefill + decode) of all prompts, median round.
        tokens: Tokens generated over all prompts.
        shallow_ratio: Generated tokens from the shallow exit (threshold).
        acceptance: Confirmed drafts ÷ drafts (speculative).
        tokens_per_round: Tokens per verify pass (speculative).
        call_cost: Decode layer calls ÷ full depth's.
        weight_cost: Decode weights read ÷ full depth's (both heads charged).
        fused: The setting ran on the fused kernels.
        prefill_s: Mean seconds of a call's prefill and start (the last round).
        decode_s: Mean seconds of a call's decode loop (the last round); the rest of ``wall_s`` / calls is the
            call's other work (session lookup, stats, copies).
    """

    wall_s: float
    tokens: int
    shallow_ratio: float
    acceptance: float
    tokens_per_round: float
    call_cost: float
    weight_cost: float
    fused: bool
    prefill_s: float
    decode_s: float


def _summarize(results: list[GenerationResult], wall_s: float, tokens: int, fused: bool) -> DecodeMeasure:
    known = [r.early_exit for r in results if r.early_exit is not None]
    prefill_s, decode_s = (sum(getattr(r, key) for r in results) / len(results) for key in ("prefill_s", "decode_s"))
    if not known:  # the full-depth decoder
        return DecodeMeasure(wall_s, tokens, 0.0, 0.0, 0.0, 1.0, 1.0, fused, prefill_s, decode_s)
    steps = sum(s.decode_steps for s in known)
    drafted = sum(s.drafted for s in known)
    rounds = sum(s.rounds for s in known)
    return DecodeMeasure(
        wall_s=wall_s, tokens=tokens,
        shallow_ratio=sum(s.shallow_count for s in known) / max(sum(s.shallow_count + s.deep_count for s in known), 1),
        acceptance=sum(s.accepted for s in known) / drafted if drafted else 0.0,
        tokens_per_round=sum(s.shallow_count + s.deep_count - 1 for s in known) / rounds if rounds else 0.0,
        call_cost=sum(s.call_cost * s.decode_steps for s in known) / steps,
        weight_cost=sum(s.macs_cost * s.decode_steps for s in known) / steps, fused=fused, prefill_s=prefill_s,
        decode_s=decode_s)


def measure_decode(model: LegoLM, prompts: Tensor, settings: list[Setting], max_new_tokens: int, fused: bool,
                   kernel: FusedBlocks, repeats: int = 3, warmup: int = 1,
                   progress: bool = False) -> list[DecodeMeasure]:
    """Greedy decoding of each prompt row (batch 1) in each setting, timed as whole `generate` calls (``kernel``:
    the fused blocks of every setting)."""
    device = next(model.parameters()).device
    use_fused = fused and device.type == "cuda"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: list[list[float]] = [[] for _ in settings]
    last: list[list[GenerationResult]] = [[] for _ in settings]
    tokens = [0] * len(settings)
    bar = tqdm(total=(warmup + repeats) * len(settings), desc="decode timing", unit="run", disable=not progress)
    for r in range(warmup + repeats):
        for i, s in enumerate(settings):
            bar.update()
            # every setting keeps its session (graphs captured once): round-robin over more settings than
            # the default LRU size would rebuild them inside the timed calls
            cfg = replace(s.config(max_new_tokens, use_fused, kernel), session_cache_size=len(settings))
            sync()
            t0 = time.perf_counter()
            results = [generate(model, [row.tolist()], cfg) for row in prompts]
            sync()
            if r >= warmup:
                times[i].append(time.perf_counter() - t0)
            last[i] = results
            tokens[i] = sum(len(res.tokens[0]) for res in results)
    return [_summarize(last[i], statistics.median(times[i]), tokens[i], settings[i].config(1, use_fused, kernel).fused)
            for i in range(len(settings))]


def decode_path_ppl(model: LegoLM, windows: Tensor, prompt_len: int, setting: Setting,
                    progress: bool = False) -> float:
    """Perplexity of ``windows[:, prompt_len:]`` along the decode path of ``setting`` (batch 1 per window).

    Full depth and speculative decoding emit the deep model's tokens: their path is τ = 1 (never exit).
    ``fill`` keeps the upper cache exact, so its path is the hard rule on full forward passes
    (`exact_path_ppl`; the tests check the two are equal); ``skip`` and ``propagate`` run the
    early-exit loop token by token, teacher-forced.
    """
    tau = setting.threshold if setting.mode == "threshold" and setting.threshold is not None else 1.0
    if setting.mode != "threshold" or setting.kv_mode == "fill":
        return exact_path_ppl(model, windows, prompt_len, tau)
    device = next(model.parameters()).device
    nll = n = 0.0
    for row in tqdm(windows, desc=f"decode-path ppl ({setting.label})", unit="window", disable=not progress,
                    leave=False):
        row_nll, row_n, _ = decode_path_nll(model, row[None].to(device), prompt_len, tau, setting.kv_mode)
        nll, n = nll + row_nll, n + row_n
    return safe_exp(nll / n)


@torch.no_grad()
def exact_path_ppl(model: LegoLM, windows: Tensor, prompt_len: int, threshold: float) -> float:
    """Perplexity of ``windows[:, prompt_len:]`` under generation's hard rule at τ, from full forward passes."""
    device = next(model.parameters()).device
    nll = n = 0.0
    for row in windows:
        ids = row[None].to(device)
        out = model.forward_exits(ids[:, :-1])
        assert out.deep_logits is not None
        labels = ids[:, prompt_len:, None]
        lp_s = out.shallow_logits[:, prompt_len - 1:].float().log_softmax(-1).gather(-1, labels)[..., 0]
        lp_d = out.deep_logits[:, prompt_len - 1:].float().log_softmax(-1).gather(-1, labels)[..., 0]
        lp = torch.where(exits(out.conf[:, prompt_len - 1:], threshold), lp_s, lp_d)
        nll, n = nll - float(lp.double().sum()), n + lp.numel()
    return safe_exp(nll / n)


def val_windows(ids: np.ndarray, n: int, length: int, offset: int = 0) -> Tensor:
    """``n`` windows of ``length`` tokens at evenly spaced starts of a token stream: (n, length).

    ``offset`` shifts every start (so that timing prompts and scoring windows differ).
    """
    starts = np.linspace(0, len(ids) - length - offset - 1, n).astype(np.int64) + offset
    return torch.from_numpy(np.stack([np.asarray(ids[s : s + length], dtype=np.int64) for s in starts]))


@dataclass
class CurveRow:
    """One setting of the decode table (see the module docstring for each column).

    Attributes:
        label: How τ was chosen, or the decoder.
        mode: full, threshold or speculative.
        kv_mode: Threshold mode's upper-cache handling.
        draft_tokens: Speculative mode's d.
        threshold: τ (threshold mode; 1.0 otherwise).
        routed_ppl: Soft-routed perplexity at τ, full forward passes.
        hard_routed_ppl: Perplexity under generation's hard rule at τ, full forward passes.
        decode_ppl: Perplexity along the decode path (teacher forcing).
        eval_shallow_ratio: Validation tokens that exit at τ.
        gen_shallow_ratio: Generated tokens that exited.
        acceptance: Confirmed drafts ÷ drafts.
        tokens_per_round: Tokens per verify pass.
        call_cost: Decode layer calls ÷ full depth's.
        weight_cost: Decode weights read ÷ full depth's.
        tok_per_s: Generated tokens per second of whole calls.
        speedup: This setting's tok/s ÷ the full-depth decoder's.
        wall_over_call: (1 - time / full-depth time) ÷ (1 - call_cost); None where under ``MIN_CALL_SAVING`` of the
            calls is saved (the ratio of two near-zero savings says nothing).
        fused: Ran on the fused kernels.
        if_nodes: Threshold mode's per-token branch was asked to run as an IF graph node (False: the host read
            each decision).
    """

    label: str
    mode: str
    kv_mode: str
    draft_tokens: int
    threshold: float
    routed_ppl: float
    hard_routed_ppl: float
    decode_ppl: float
    eval_shallow_ratio: float
    gen_shallow_ratio: float
    acceptance: float
    tokens_per_round: float
    call_cost: float
    weight_cost: float
    tok_per_s: float
    speedup: float
    wall_over_call: float | None
    fused: bool
    if_nodes: bool


MIN_CALL_SAVING = 0.05  # wall/call is reported where a setting saves at least this fraction of the calls


def curve_row(scores: TokenScores, temperature: float, setting: Setting, measured: DecodeMeasure,
              baseline: DecodeMeasure, decode_ppl: float) -> CurveRow:
    """Join the evaluation scores and the decode measurement of one setting."""
    tau = setting.threshold if setting.mode == "threshold" and setting.threshold is not None else 1.0
    saved = 1.0 - measured.call_cost
    wall = 1.0 - measured.wall_s / baseline.wall_s
    return CurveRow(
        label=setting.label, mode=setting.mode, kv_mode=setting.kv_mode if setting.mode == "threshold" else "—",
        draft_tokens=setting.draft_tokens, threshold=tau, routed_ppl=scores.routed_ppl(tau, temperature),
        hard_routed_ppl=scores.hard_routed_ppl(tau), decode_ppl=decode_ppl,
        eval_shallow_ratio=scores.shallow_ratio(tau), gen_shallow_ratio=measured.shallow_ratio,
        acceptance=measured.acceptance, tokens_per_round=measured.tokens_per_round, call_cost=measured.call_cost,
        weight_cost=measured.weight_cost, tok_per_s=measured.tokens / measured.wall_s,
        speedup=baseline.wall_s / measured.wall_s, wall_over_call=wall / saved if saved >= MIN_CALL_SAVING else None,
        fused=measured.fused, if_nodes=setting.if_nodes)


@dataclass(frozen=True)
class KVChoice:
    """The kv mode a LEGO model keeps for generation, and the measurements at τ it was chosen from."""

    kv_mode: Literal["fill", "skip"]
    fill_ppl: float
    skip_ppl: float
    fill_tok_per_s: float
    skip_tok_per_s: float

    def line(self) -> str:
        return (f"kv mode saved with the model: {self.kv_mode} (decode-path PPL at τ: skip {self.skip_ppl:.2f}, fill "
                f"{self.fill_ppl:.2f}; {self.skip_tok_per_s:,.0f} / {self.fill_tok_per_s:,.0f} tok/s)")


def choose_kv_mode(rows: list[CurveRow], tau: float, tolerance: float) -> KVChoice | None:
    """Skip where, at the calibrated τ, it decoded faster than fill and its decode-path PPL stayed within
    ``tolerance`` (relative) of fill's, the exact cache; else fill. Each mode's fastest row at τ counts (IF nodes
    or the host read). None where either mode was not measured at τ."""
    at_tau = [r for r in rows if r.mode == "threshold" and r.threshold == tau]
    best: dict[str, CurveRow] = {}
    for r in at_tau:
        if r.kv_mode in ("fill", "skip") and (r.kv_mode not in best or r.tok_per_s > best[r.kv_mode].tok_per_s):
            best[r.kv_mode] = r
    if set(best) != {"fill", "skip"}:
        return None
    fill, skip = best["fill"], best["skip"]
    keep_skip = skip.tok_per_s > fill.tok_per_s and skip.decode_ppl <= fill.decode_ppl * (1 + tolerance)
    return KVChoice("skip" if keep_skip else "fill", fill.decode_ppl, skip.decode_ppl, fill.tok_per_s, skip.tok_per_s)


def format_table(rows: list[CurveRow]) -> str:
    """One markdown table of the decode settings."""
    head = ("| setting | kv / d | τ | routed PPL | hard-routed PPL | decode-path PPL | shallow ratio (val / gen) "
            "| acceptance | call cost | weight cost | tok/s | vs full depth | wall/call |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        woc = "—" if r.wall_over_call is None else f"{r.wall_over_call:.2f}"
        kv = f"d={r.draft_tokens}" if r.mode == "speculative" else r.kv_mode
        acc = f"{r.acceptance:.3f} ({r.tokens_per_round:.2f}/pass)" if r.mode == "speculative" else "—"
        lines.append(f"| {r.label} | {kv} | {r.threshold:.4f} | {r.routed_ppl:.2f} | {r.hard_routed_ppl:.2f} | "
                     f"{r.decode_ppl:.2f} | {r.eval_shallow_ratio:.3f} / {r.gen_shallow_ratio:.3f} | {acc} | "
                     f"{r.call_cost:.3f} | {r.weight_cost:.3f} | {r.tok_per_s:,.0f} | {r.speedup:.2f}x | {woc} |")
    return "\n".join(lines)


def quality_table(scores: TokenScores, tau: float, temperature: float) -> tuple[str, dict[str, float]]:
    """Shallow / deep / routed (soft and hard) perplexity over all validation tokens and the hard ones."""
    hard = scores.conf < tau
    parts = {"all": scores, "hard": TokenScores(scores.shallow_logp[hard], scores.deep_logp[hard], scores.conf[hard])}
    values: dict[str, float] = {"hard_fraction": float(hard.float().mean())}
    lines = ["| tokens | count | shallow PPL | deep PPL | routed PPL (soft) | routed PPL (hard) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, part in parts.items():
        row = {"shallow": part.shallow_ppl(), "deep": part.deep_ppl(), "routed": part.routed_ppl(tau, temperature),
               "hard_routed": part.hard_routed_ppl(tau)}
        values.update({f"{name}_{k}_ppl": v for k, v in row.items()})
        lines.append(f"| {name} | {len(part):,} | {row['shallow']:.2f} | {row['deep']:.2f} | {row['routed']:.2f} | "
                     f"{row['hard_routed']:.2f} |")
    return "\n".join(lines), values


def plot_curve(rows: list[CurveRow], path: Path, phase1_ppl: float, deep_ppl: float) -> str | None:
    """Decode-path perplexity against the measured speedup (threshold per kv mode, speculative) as a PNG.

    Returns a note instead when matplotlib is missing.
    """
    plt = pyplot()
    if plt is None:
        return f"{path.name} skipped: pip install matplotlib to draw the quality/speed curve"
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    threshold = [r for r in rows if r.mode == "threshold"]
    groups = [(f"threshold, kv {m}", [r for r in threshold if r.kv_mode == m and not r.if_nodes], style)
              for m, style in (("fill", "o-"), ("skip", "s--"), ("propagate", "^:"))]
    groups += [("threshold, IF graph nodes", [r for r in threshold if r.if_nodes], "x")]
    groups += [("speculative (lossless)", [r for r in rows if r.mode == "speculative"], "D"),
               ("full depth", [r for r in rows if r.mode == "full"], "k*")]
    for name, pts, style in groups:
        pts = sorted(pts, key=lambda r: r.speedup)
        if not pts:
            continue
        ax.plot([r.speedup for r in pts], [r.decode_ppl for r in pts], style, label=name)
        for r in pts:
            ax.annotate(r.label if r.mode != "speculative" else f"d={r.draft_tokens}", (r.speedup, r.decode_ppl),
                        fontsize=6, textcoords="offset points", xytext=(4, 4))
    ax.axhline(phase1_ppl, color="gray", ls=":", label=f"shallow exit PPL {phase1_ppl:.2f}")
    ax.axhline(deep_ppl, color="black", ls=":", label=f"deep exit PPL {deep_ppl:.2f}")
    ax.axvline(1.0, color="black", lw=0.5)
    ax.set_xlabel("measured tok/s ÷ the fastest full-depth decoder of the same model")
    ax.set_ylabel("validation perplexity (decode path)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    return None
