"""A whole training step as one CUDA graph (`RunConfig.cuda_graph`, `legolm.train.fit.TrainStep`).

Where a step's GPU work is small, the host launching its kernels sets the pace: a cached Skip2-LoRA epoch on
GPT-2 runs 4.8 ms of GPU work a step against about 6 ms of host time (H200, docs/results/skip2lora.md, "Where a
cached GPT-2 epoch goes now"). Captured once and replayed, the step is one launch ("whole-network capture" in
PyTorch's CUDA graphs notes; NVIDIA's MLPerf training submissions capture whole steps the same way)::

    steps 1..w    eager, on a side stream: lazy set-up (cuBLAS workspaces, AdamW's state, compiled code)
    step  w+1     its batch copied into static buffers ─ capture (records, runs nothing) ─ replay
    steps w+2..   batch ─▶ static buffers (same shapes and dtypes) ─ replay;   other shapes: an eager step

The learning rate is a tensor per parameter group that the schedule fills before each step, and AdamW runs
``capturable``, so a replay trains at its own step's rate. A loss opts in with ``graph_safe(batch) -> bool``:
host-side work inside it (a Skip-Cache still filling) runs at capture only, never at replay, so such steps stay
eager.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from legolm.train.batches import Batch

Out = TypeVar("Out")


def graph_capable(loss_fn: Any) -> bool:
    """Whether ``loss_fn`` says when its steps may be captured (a ``graph_safe`` method)."""
    return callable(getattr(loss_fn, "graph_safe", None))


def graph_safe(loss_fn: Any, batches: Sequence[Batch]) -> bool:
    """Whether a step over ``batches`` may be captured: ``loss_fn.graph_safe`` says so for each."""
    return graph_capable(loss_fn) and all(loss_fn.graph_safe(b) for b in batches)


def capturable_(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make ``optimizer`` replayable in a graph: each group's learning rate a device tensor (the schedule fills
    it, `legolm.train.optim.LRSchedule.apply`), its step ``capturable``. Idempotent."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        # compared by type: `cuda` and `cuda:0` are one device here, and a captured graph keeps reading the
        # tensor it saw (a new one each step would leave it reading freed memory)
        if not (isinstance(lr, Tensor) and lr.device.type == device.type):
            group["lr"] = torch.tensor(float(lr), device=device, dtype=torch.float32)
        group["capturable"] = True


def on_side_stream(fn: Callable[[], Out]) -> Out:
    """``fn()`` on a fresh stream that waits for the current one and is waited for (a warm-up step)."""
    main = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = fn()
    main.wait_stream(side)
    for t in _tensors(out):  # made on the side stream, used on the main one: keep their memory until then
        t.record_stream(main)
    return out


class StepGraph(Generic[Out]):
    """``body(batches)`` captured once on static copies of ``batches``; `replay` feeds new batches of the same
    shapes and returns the captured outputs, refreshed in place."""

    def __init__(self, body: Callable[[list[Batch]], Out], batches: Sequence[Batch]) -> None:
        self.static = [{k: v.clone() for k, v in b.items()} for b in batches]
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = body(self.static)

    def fits(self, batches: Sequence[Batch]) -> bool:
        """Whether ``batches`` have the captured keys, shapes, dtypes and devices."""
        if len(batches) != len(self.static):
            return False
        return all(b.keys() == s.keys() and all(_same(b[k], s[k]) for k in s)
                   for b, s in zip(batches, self.static, strict=True))

    def replay(self, batches: Sequence[Batch]) -> Out:
        for b, s in zip(batches, self.static, strict=True):
            for k, v in b.items():
                s[k].copy_(v, non_blocking=True)
        self.graph.replay()
        return self.out


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []
