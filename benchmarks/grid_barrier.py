"""What one grid barrier costs on this GPU: the persistent decode step's (`legolm.kernels.persistent`) against a
self-resetting barrier with a generation counter (the textbook sense-reversing one, which the step used first).

A kernel of P programs passes N barriers; the time per barrier is (t(N) - t(0)) / N, both replayed as CUDA
graphs. No model, no data: a diagnostic of the one cost the persistent step adds per phase.

    python3 -m benchmarks.grid_barrier            # GPU only
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import triton
import triton.language as tl
import triton.testing

from benchmarks.common import device_info, print_table, write_result
from legolm.kernels.persistent import _grid_sync


@triton.jit
def _generation_sync(sync_ptr, NP):
    """Read the generation, arrive; the last to arrive resets the count and bumps the generation, the others
    spin until it changes."""
    tl.debug_barrier()
    gen = tl.atomic_add(sync_ptr + 1, 0, sem="relaxed", scope="gpu")
    if tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu") == NP - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(sync_ptr + 1, 1, sem="release", scope="gpu")
    else:
        while tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu") == gen:
            pass
    tl.debug_barrier()


@triton.jit
def barrier_kernel(sync_ptr, n, GENERATION: tl.constexpr):
    """n grid barriers; the last program to finish resets the counters for the next launch."""
    NP = tl.num_programs(0)
    for i in range(n):
        if GENERATION:
            _generation_sync(sync_ptr, NP)
        else:
            _grid_sync(sync_ptr + 2, (i + 1) * NP)
    if tl.atomic_add(sync_ptr + 3, 1, sem="acq_rel", scope="gpu") == NP - 1:
        tl.atomic_xchg(sync_ptr + 3, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(sync_ptr + 2, 0, sem="relaxed", scope="gpu")


def time_launch(sync: torch.Tensor, n: int, programs: int, generation: bool, warps: int) -> float:
    """Milliseconds per replay of one launch with n barriers."""
    return float(triton.testing.do_bench_cudagraph(
        lambda: barrier_kernel[(programs,)](sync, n, GENERATION=generation, num_warps=warps), rep=50))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--barriers", type=int, default=60, help="barriers per launch (GPT-2's step has 61)")
    parser.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sync = torch.zeros(4, dtype=torch.int32, device="cuda")
    rows: list[dict[str, Any]] = []
    for generation in (False, True):
        for warps in args.warps:
            for programs in (sms, sms // 2, 32):
                t0, tn = (time_launch(sync, n, programs, generation, warps) for n in (0, args.barriers))
                rows.append({"barrier": "generation counter" if generation else "legolm (arrival count)",
                             "warps": warps, "programs": programs, "launch us": f"{1000 * t0:.1f}",
                             "per barrier us": f"{1000 * (tn - t0) / args.barriers:.2f}"})
    print(f"\nGrid barrier, {args.barriers} per launch, CUDA-graph replays, {device_info()['device']}")
    print_table(rows, ["barrier", "warps", "programs", "launch us", "per barrier us"])
    print(f"wrote {write_result('grid-barrier', {**device_info(), 'rows': rows})}")


if __name__ == "__main__":
    main()
