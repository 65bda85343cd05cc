"""The softmax step alone: each row's loss and softmax − onehot over real logits, legolm's Triton kernel (its
launch settings swept) against Liger Kernel's cross-entropy kernel and the compiled torch loss, one process.

The chunked linear cross-entropy (`benchmarks.linear_ce`) and Skip2-LoRA's cached epochs (`benchmarks.skip2lora`)
spend a third or more of their GPU time in this step. The logits are x Wᵀ of the real-text head inputs that
`benchmarks.linear_ce` builds (``--model gpt2``: a GPT-2-shaped model with random weights on Tiny Shakespeare;
``--model smollm2``: the real pretrained model), in the run's dtype.

    copy                 a copy of the logits (one read, one write): the bandwidth reference
    legolm B/W/S         `legolm.kernels.cross_entropy.ce_grad_` with tiles of B logits, W warps and S pipeline
                         stages ("-" = Triton's default); "(default)" marks the settings the library uses
    liger                Liger's `LigerCrossEntropyLoss`, forward + backward (it also writes the gradient over
                         its input); "not installed" without liger-kernel
    torch compile        ``F.cross_entropy(logits.float(), labels)`` forward + backward under torch.compile

``--layout padded`` (default) gives legolm's kernel its logits as the chunked loss does: the first V columns of
rows padded to a multiple of 64 (`legolm.train.head_loss.VOCAB_ALIGN`), the pad columns its scratch (aligned
vector loads at an odd V); ``contiguous``: rows of exactly V. The peers always get contiguous logits.

Per row: ms = median of ``--repeats`` timings of the step alone (the logits are restored from a copy before each
call, outside the timing); "x copy" = ms / the copy's ms; errors against torch in fp32: |summed loss − ref| /
ref, and max |g − g_ref| of the gradient of the summed loss (the mean loss's gradient times the scored rows).

    python -m benchmarks.ce_step                              # GPU (carry .bench)
    python -m benchmarks.ce_step --blocks 1024 2048 --warps 8 16 --stages 1 2 3 4 --layout contiguous
    python -m benchmarks.ce_step --smoke --json out.json      # CPU, tiny shapes, Triton's interpreter
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "--smoke" in sys.argv:  # Triton's CPU interpreter: set before anything imports Triton (torch may)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import device_info, print_table, write_result
from benchmarks.linear_ce import add_input_arguments, add_run_arguments, build_inputs, free, versions
from legolm.kernels.cross_entropy import CE_STEP, StepLaunch, ce_grad_
from legolm.train.head_loss import IGNORE_INDEX, VOCAB_ALIGN

GPT2_VOCAB = 50257
COLUMNS = ["impl", "ms", "x copy", "loss rel err", "grad max abs err"]
Step = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (logits, labels) -> (summed loss, grad of it)


def legolm_step(launch: StepLaunch, pad_scratch: bool) -> Step:
    def step(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        rows, lse = (torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32) for _ in range(2))
        ce_grad_(logits, labels, rows, lse, IGNORE_INDEX, launch, pad_scratch)
        return rows.sum(), logits

    return step


def autograd_step(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Step:
    """A summed loss of the logits by autograd: its value and the gradient of a leaf over the logits."""
    def step(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        leaf = logits.detach().requires_grad_(True)
        loss = loss_fn(leaf, labels)
        loss.backward()
        assert leaf.grad is not None
        return loss.detach(), leaf.grad

    return step


def liger_step() -> Step | str:
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    except ImportError:
        return "not installed"
    return autograd_step(LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum"))


def torch_step(backend: str) -> Step:
    return autograd_step(torch.compile(
        lambda lg, y: F.cross_entropy(lg.float(), y, ignore_index=IGNORE_INDEX, reduction="sum"), backend=backend))


def steps(args: argparse.Namespace) -> dict[str, Step | str]:
    """Every row but the copy, in order."""
    rows: dict[str, Step | str] = {}
    for block, warps, stages in itertools.product(args.blocks, args.warps, args.stages):
        launch = StepLaunch(block_v=block, num_warps=warps, num_stages=stages or None)
        name = f"legolm {block}/{warps}/{'-' if stages == 0 else stages}" + (" (default)" if launch == CE_STEP else "")
        rows[name] = legolm_step(launch, args.layout == "padded")
    rows["liger"] = liger_step()
    rows["torch compile"] = torch_step(args.compile_backend)
    return rows


def reference(logits: Tensor, labels: Tensor) -> tuple[float, Tensor]:
    """Summed loss and its gradient softmax − onehot (0 on unscored rows), torch in fp32."""
    x = logits.float().requires_grad_(True)
    loss = F.cross_entropy(x, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    loss.backward()
    assert x.grad is not None
    return loss.item(), x.grad


def timed(fn: Callable[[], object], restore: Callable[[], object], warmup: int, repeats: int,
          device: torch.device) -> list[float]:
    """ms of ``fn`` alone, ``restore`` run before each call outside the timing."""
    for _ in range(warmup):
        restore()
        fn()
    times = []
    for _ in range(repeats):
        restore()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return times


def measure(step: Step, logits: Tensor, work: Tensor, labels: Tensor, ref: tuple[float, Tensor], warmup: int,
            repeats: int, device: torch.device) -> dict[str, Any]:
    """Errors of one call on fresh logits, then the timings (``work`` is the logits' scratch copy)."""
    work.copy_(logits)
    loss, grad = step(work, labels)
    result = {"loss_rel_err": abs(float(loss) - ref[0]) / abs(ref[0]),
              "grad_max_abs_err": float((grad.float() - ref[1]).abs().max())}
    times = timed(lambda: step(work, labels), lambda: work.copy_(logits), warmup, repeats, device)
    return {**result, "ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser, GPT2_VOCAB)  # GPT-2's own vocabulary: the row length the loss sees (unpadded)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="tile sizes to sweep")
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16], help="warp counts to sweep")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3],
                        help="pipeline stages to sweep (0 = Triton's default)")
    parser.add_argument("--layout", choices=["padded", "contiguous"], default="padded",
                        help="legolm's logits as the chunked loss lays them out, or rows of exactly V (see above)")
    add_run_arguments(parser, "ce_step", warmup=2, repeats=10)
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.hidden, args.vocab, args.layers, args.seq = 64, 64, 1000, 2, 64
        args.blocks, args.warps, args.stages = [256, CE_STEP.block_v], [CE_STEP.num_warps], [0]
        args.warmup, args.repeats = 1, 2
        args.compile_backend = args.compile_backend or "aot_eager"
    args.compile_backend = args.compile_backend or "inductor"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False

    inputs = build_inputs(args, device, dtype)
    with torch.no_grad():
        logits = (inputs.x @ inputs.weight.T).detach()  # (N, V) in the run's dtype
    labels = inputs.labels
    del inputs
    free(device)
    ref = reference(logits, labels)
    work = torch.empty_like(logits)
    n, v = logits.shape
    padded = torch.zeros(n, -(-v // VOCAB_ALIGN) * VOCAB_ALIGN, device=device, dtype=logits.dtype)[:, :v]
    header = (f"Softmax step (loss + softmax - onehot), {n:,} x {v:,} {args.dtype} logits of real text "
              f"({args.layout} rows for legolm), "
              f"{device_info()['device'] or device.type}; median of {args.repeats} after {args.warmup} warmup")
    print(header, flush=True)
    copy_ms = statistics.median(timed(lambda: work.copy_(logits), lambda: None, args.warmup, args.repeats, device))
    results: dict[str, dict[str, Any]] = {"copy": {"ms": copy_ms}}
    for name, step in steps(args).items():
        if isinstance(step, str):
            results[name] = {"status": step}
            continue
        try:
            scratch = padded if name.startswith("legolm") and args.layout == "padded" else work
            results[name] = measure(step, logits, scratch, labels, ref, args.warmup, args.repeats, device)
        except Exception as err:  # a launch setting or a peer that fails is one row, not the end of the run
            if name.startswith("legolm") and args.smoke:
                raise
            results[name] = {"status": f"failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"}
        free(device)
        r = results[name]
        print(f"{name}: " + (r["status"] if "status" in r else f"{r['ms']:.3f} ms"), flush=True)
    save(args, header, results, copy_ms)


def table_row(name: str, r: dict[str, Any], copy_ms: float) -> dict[str, str]:
    if "status" in r:
        return {"impl": name, "ms": r["status"]}
    row = {"impl": name, "ms": f"{r['ms']:.3f}", "x copy": f"{r['ms'] / copy_ms:.2f}"}
    if "loss_rel_err" in r:
        row |= {"loss rel err": f"{r['loss_rel_err']:.1e}", "grad max abs err": f"{r['grad_max_abs_err']:.1e}"}
    return row


def save(args: argparse.Namespace, header: str, results: dict[str, dict[str, Any]], copy_ms: float) -> None:
    print()
    print(header)
    table = print_table([table_row(name, r, copy_ms) for name, r in results.items()], COLUMNS)
    payload = {**device_info(), **versions(), "args": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items()},
               "rows": [{"impl": name, **r} for name, r in results.items()], "header": header, "table": table}
    if args.json is not None:
        import json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    elif not args.smoke:
        print(f"wrote {write_result('ce_step', payload)}")


if __name__ == "__main__":
    main()
