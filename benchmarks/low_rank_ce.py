"""Skip2-LoRA's low-rank head gradients on real logits: the two fused kernels that never write G (their tiles
swept) against the library's unfused way (the softmax step writing G, then two cuBLAS products), one process.

Per batch of logits X (n, V) the cached Skip2-LoRA epoch needs the loss, dz = G U (n, R) and Gᵀz (V, R), with
G = softmax(X) − onehot (`legolm.train.low_rank_head`). The logits are x Wᵀ of the real-text head inputs that
`benchmarks.linear_ce` builds (``--model gpt2``: GPT-2's shape, random weights, Tiny Shakespeare; ``smollm2``: the
real pretrained model), laid out as the library does (rows padded to a multiple of 64). z = x A and U = W b come
from adapter factors A (C, R) and b (C, R) drawn like trained LoRA factors (normal, seeded): their values do not
change the work.

    copy                     a copy of the logits (one read, one write): the bandwidth reference
    unfused (library)        `ce_grad_` with the library's launch (G written over the logits), dz = G U,
                             Gᵀz in fp32 (`ProductSum`): what ``--head-grad low-rank`` runs
    rows M/V/W/S             `low_rank_rows_` alone (loss, lse, dz): M rows by V words, W warps, S stages
    columns M/V/W/S          `low_rank_columns_` alone (Gᵀz), given the rows' lse
    fused (default)          both kernels with `LOW_RANK_LAUNCH`: what ``--head-grad low-rank-fused`` runs
    fused (best rows + best columns)   both kernels with the fastest settings of this run

ms = median of ``--repeats`` after ``--warmup`` (CUDA events; the logits are restored from a copy before each call,
outside the timing); errors against fp32 torch (G from the same logits): max |dz − ref| / max |ref|, the same for
Gᵀz, and the summed loss's relative error.

    python -m benchmarks.low_rank_ce                          # GPU (carry .bench)
    python -m benchmarks.low_rank_ce --rows-m 64 128 --rows-v 64 128 --warps 4 8 --stages 0 3
    python -m benchmarks.low_rank_ce --smoke --json out.json  # CPU, tiny shapes, fp32, Triton's interpreter
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "--smoke" in sys.argv:  # Triton's CPU interpreter: set before anything imports Triton (torch may)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from torch import Tensor

from benchmarks.ce_step import GPT2_VOCAB, timed
from benchmarks.common import device_info, print_table, write_result
from benchmarks.linear_ce import add_input_arguments, add_run_arguments, build_inputs, free, versions
from legolm.kernels.cross_entropy import CE_STEP, ce_grad_
from legolm.kernels.low_rank_ce import (
    LOW_RANK_LAUNCH,
    LowRankLaunch,
    TileLaunch,
    low_rank_columns_,
    low_rank_rows_,
    low_rank_softmax_,
)
from legolm.train.head_loss import IGNORE_INDEX, ProductSum, aligned_rows

COLUMNS = ["impl", "ms", "x copy", "loss rel err", "dz rel err", "Gᵀz rel err"]
Outputs = tuple[Tensor, Tensor, Tensor]  # summed loss, dz (n, R), Gᵀz (V, R)


class Problem:
    """The logits of real text in the library's padded layout, their labels and the two narrow factors."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
        inputs = build_inputs(args, device, dtype)
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        C, R = inputs.x.shape[1], args.rank
        a = (torch.randn(C, R, generator=gen) / C ** 0.5).to(device, dtype)  # (C, R), LoRA's A scale
        b = (torch.randn(C, R, generator=gen) * args.b_std).to(device, dtype)  # (C, R)
        with torch.no_grad():
            w = aligned_rows(inputs.weight)  # (V', C): zero rows pad V
            self.V = inputs.weight.shape[0]
            self.source = torch.mm(inputs.x, w.T)  # (n, V') in the run's dtype
            self.z = torch.mm(inputs.x, a).contiguous()  # (n, R)
            self.u = torch.mm(w, b).contiguous()  # (V', R)
        self.labels = inputs.labels
        self.work = torch.empty_like(self.source)
        self.source_name = inputs.source
        self.rows = self.source.shape[0]

    @property
    def logits(self) -> Tensor:
        """The working copy's first V columns (what the kernels get)."""
        return self.work[:, :self.V]

    def restore(self) -> None:
        self.work.copy_(self.source)

    def buffers(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Fresh loss, lse (n,), dz (n, R) and a zeroed Gᵀz (V', R), fp32."""
        n, R, dev = self.rows, self.u.shape[1], self.source.device
        loss, lse = (torch.empty(n, device=dev, dtype=torch.float32) for _ in range(2))
        return loss, lse, torch.empty(n, R, device=dev, dtype=torch.float32), \
            torch.zeros(self.u.shape, device=dev, dtype=torch.float32)


def reference(p: Problem) -> Outputs:
    """fp32 torch: the summed loss, G U and Gᵀz from the same logits."""
    x = p.source[:, :p.V].float()
    keep = p.labels != IGNORE_INDEX
    lse = torch.logsumexp(x, 1)
    target = p.labels.clamp(min=0)
    loss = ((lse - x.gather(1, target[:, None])[:, 0]) * keep).sum()
    g = torch.exp(x - lse[:, None])
    g[torch.arange(x.shape[0], device=x.device), target] -= 1.0
    g *= keep[:, None]
    return loss, g @ p.u[:p.V].float(), g.T @ p.z.float()


def unfused(p: Problem) -> Callable[[], Outputs]:
    def run() -> Outputs:
        loss, lse, _, _ = p.buffers()
        ce_grad_(p.logits, p.labels, loss, lse, IGNORE_INDEX, CE_STEP, True)
        g = p.work  # G over the first V columns; the pad columns hold 0 (loaded) and meet U's zero rows
        gtz = ProductSum(p.u.shape, p.u.dtype, p.u.device)
        gtz.add_(g.T, p.z)
        return loss.sum(), torch.mm(g, p.u), gtz.total

    return run


def fused(p: Problem, launch: LowRankLaunch) -> Callable[[], Outputs]:
    def run() -> Outputs:
        loss, lse, dz, gtz = p.buffers()
        low_rank_softmax_(p.logits, p.labels, p.u, p.z, loss, lse, dz, gtz, IGNORE_INDEX, launch)
        return loss.sum(), dz, gtz

    return run


def rows_only(p: Problem, launch: TileLaunch) -> Callable[[], Outputs]:
    def run() -> Outputs:
        loss, lse, dz, gtz = p.buffers()
        low_rank_rows_(p.logits, p.labels, p.u, loss, lse, dz, IGNORE_INDEX, launch)
        return loss.sum(), dz, gtz

    return run


def columns_only(p: Problem, launch: TileLaunch, lse: Tensor) -> Callable[[], Outputs]:
    def run() -> Outputs:
        loss, _, dz, gtz = p.buffers()
        low_rank_columns_(p.logits, p.labels, lse, p.z, gtz, IGNORE_INDEX, launch)
        return loss.sum(), dz, gtz  # loss and dz unset: not compared

    return run


def errors(got: Outputs, ref: Outputs, parts: tuple[bool, bool, bool]) -> dict[str, float]:
    """Relative errors of the parts a row computes (loss; dz; Gᵀz)."""
    names = ("loss_rel_err", "dz_rel_err", "gtz_rel_err")
    out = {}
    for name, g, r, on in zip(names, got, ref, parts, strict=True):
        if on:
            g = g[:r.shape[0]] if g.dim() else g
            out[name] = float((g.float() - r).abs().max() / r.abs().max().clamp(min=1e-30))
    return out


def measure(run: Callable[[], Outputs], p: Problem, ref: Outputs, parts: tuple[bool, bool, bool],
            args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    p.restore()
    result: dict[str, Any] = errors(run(), ref, parts)
    times = timed(run, p.restore, args.warmup, args.repeats, device)
    return {**result, "ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times)}


def guarded(name: str, fn: Callable[[], dict[str, Any]], smoke: bool) -> dict[str, Any]:
    """One row; a launch setting that fails (e.g. out of shared memory) is a row saying so, not the end."""
    try:
        return fn()
    except Exception as err:
        if smoke:
            raise
        return {"status": f"failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"}


def settings(ms: list[int], vs: list[int], warps: list[int], stages: list[int]) -> list[TileLaunch]:
    return [TileLaunch(m, v, w, s or None) for m, v, w, s in itertools.product(ms, vs, warps, stages)]


def label(kind: str, t: TileLaunch, default: TileLaunch) -> str:
    mark = " (default)" if t == default else ""
    return f"{kind} {t.block_m}/{t.block_v}/{t.num_warps}/{t.num_stages or '-'}{mark}"


def best(results: dict[str, dict[str, Any]], prefix: str, launches: dict[str, TileLaunch]) -> TileLaunch:
    timed_rows = {k: r["ms"] for k, r in results.items() if k.startswith(prefix) and "ms" in r}
    return launches[min(timed_rows, key=lambda k: timed_rows[k])]


def sweep(p: Problem, ref: Outputs, args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, Any]]:
    copy_ms = statistics.median(timed(p.restore, lambda: None, args.warmup, args.repeats, device))
    results: dict[str, dict[str, Any]] = {"copy": {"ms": copy_ms}}

    def row(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        results[name] = guarded(name, fn, args.smoke)
        free(device)
        r = results[name]
        print(f"{name}: " + (r["status"] if "status" in r else f"{r['ms']:.3f} ms"), flush=True)

    row("unfused (library)", lambda: measure(unfused(p), p, ref, (True, True, True), args, device))
    row("fused (default)", lambda: measure(fused(p, LOW_RANK_LAUNCH), p, ref, (True, True, True), args, device))
    launches: dict[str, TileLaunch] = {}
    for t in settings(args.rows_m, args.rows_v, args.warps, args.stages):
        name = label("rows", t, LOW_RANK_LAUNCH.rows)
        launches[name] = t
        row(name, lambda t=t: measure(rows_only(p, t), p, ref, (True, True, False), args, device))
    lse = torch.logsumexp(p.source[:, :p.V].float(), 1)
    for t in settings(args.columns_m, args.columns_v, args.warps, args.stages):
        name = label("columns", t, LOW_RANK_LAUNCH.columns)
        launches[name] = t
        row(name, lambda t=t: measure(columns_only(p, t, lse), p, ref, (False, False, True), args, device))
    winner = LowRankLaunch(best(results, "rows ", launches), best(results, "columns ", launches))
    row("fused (best rows + best columns)",
        lambda: measure(fused(p, winner), p, ref, (True, True, True), args, device) | {"launch": repr(winner)})
    return results


def table_row(name: str, r: dict[str, Any], copy_ms: float) -> dict[str, str]:
    if "status" in r:
        return {"impl": name, "ms": r["status"]}
    row = {"impl": name, "ms": f"{r['ms']:.3f}", "x copy": f"{r['ms'] / copy_ms:.2f}"}
    for col, key in (("loss rel err", "loss_rel_err"), ("dz rel err", "dz_rel_err"), ("Gᵀz rel err", "gtz_rel_err")):
        if key in r:
            row[col] = f"{r[key]:.1e}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser, GPT2_VOCAB)
    parser.add_argument("--rank", type=int, default=96, help="R = taps x rank (GPT-2, rank 8 on 12 blocks: 96)")
    parser.add_argument("--b-std", type=float, default=0.02, help="std of the drawn adapter factor b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows-m", type=int, nargs="+", default=[64, 128, 256], help="rows kernel: rows per block")
    parser.add_argument("--rows-v", type=int, nargs="+", default=[32, 64, 128], help="rows kernel: words per tile")
    parser.add_argument("--columns-m", type=int, nargs="+", default=[32, 64, 128],
                        help="columns kernel: rows per step")
    parser.add_argument("--columns-v", type=int, nargs="+", default=[64, 128, 256],
                        help="columns kernel: words per program")
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8], help="warp counts to sweep")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 3],
                        help="pipeline stages to sweep (0 = Triton's default)")
    add_run_arguments(parser, "low_rank_ce", warmup=2, repeats=10)
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.hidden, args.vocab, args.layers, args.seq, args.rank = 64, 64, 1000, 2, 64, 24
        args.rows_m, args.rows_v, args.columns_m, args.columns_v = [16, 32], [64], [32], [128]
        args.warps, args.stages, args.warmup, args.repeats = [4], [0], 1, 2
        args.dtype = "fp32"  # the interpreter's tl.dot of bf16 operands multiplies their raw bits (the GPU does not)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False
    p = Problem(args, device, dtype)
    ref = reference(p)
    header = (f"Low-rank head gradients (loss, dz = G U, Gᵀz; R = {args.rank}), {p.rows:,} x {p.V:,} {args.dtype} "
              f"logits of real text ({p.source_name}), {device_info()['device'] or device.type}; "
              f"median of {args.repeats} after {args.warmup} warmup")
    print(header, flush=True)
    results = sweep(p, ref, args, device)
    save(args, header, results)


def save(args: argparse.Namespace, header: str, results: dict[str, dict[str, Any]]) -> None:
    print()
    print(header)
    table = print_table([table_row(name, r, results["copy"]["ms"]) for name, r in results.items()], COLUMNS)
    payload = {**device_info(), **versions(), "args": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items()},
               "rows": [{"impl": name, **r} for name, r in results.items()], "header": header, "table": table}
    if args.json is not None:
        import json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    elif not args.smoke:
        print(f"wrote {write_result('low_rank_ce', payload)}")


if __name__ == "__main__":
    main()
