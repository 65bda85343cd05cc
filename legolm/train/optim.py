"""AdamW over the trainable parameters, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from legolm.train.config import OptimConfig, ScheduleConfig

LR_SCALE = "lr_scale"  # the attribute a parameter may carry: it trains at lr_scale x the schedule's rate


def scale_lr(params: Iterable[nn.Parameter], scale: float) -> None:
    """Train ``params`` at ``scale`` times the learning rate of the schedule (`build_optimizer` reads it), e.g.
    new layers beside a pretrained model that fine-tunes at a small rate."""
    for p in params:
        setattr(p, LR_SCALE, float(scale))


def lr_scales(params: Iterable[nn.Parameter]) -> list[float]:
    """Each parameter's learning-rate scale (1 where none was set by `scale_lr`)."""
    return [float(getattr(p, LR_SCALE, 1.0)) for p in params]


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig, device: torch.device,
                    scales: Sequence[float] | None = None) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only.

    Parameters of 2 or more dimensions (linear and embedding weights) decay; biases and norm
    gains do not, as in GPT-2/nanoGPT. The fused kernel is used on CUDA unless ``cfg.fused`` says
    otherwise. Each group keeps its parameters' learning-rate scale (`scale_lr`; ``scales`` gives them in
    the order of ``params`` where the parameters are copies that lost the attribute, as FSDP2's are), which
    `LRSchedule.apply` multiplies in.
    """
    params = list(params)
    scales = lr_scales(params) if scales is None else list(scales)
    if len(scales) != len(params):
        raise ValueError(f"{len(scales)} learning-rate scales for {len(params)} parameters")
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for p, scale in zip(params, scales, strict=True):
        groups.setdefault((p.ndim >= 2, scale), []).append(p)
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW([{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, LR_SCALE: scale,
                               "lr": cfg.lr * scale} for (decay, scale), ps in groups.items()],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def plain_rates(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict whose groups' rates are numbers: a CUDA-graphed step keeps them as tensors
    (`legolm.train.step_graph.capturable_`); a checkpoint stores the number, and a graphed resume makes the tensor
    again."""
    groups = state.get("param_groups", [])
    return {**state, "param_groups": [{**g, "lr": float(g["lr"])} if isinstance(g.get("lr"), torch.Tensor) else g
                                      for g in groups]}


class LRSchedule:
    """Linear warmup, then cosine (or linear, or no) decay to ``min_lr_ratio · lr``.

    ::

        lr ▲      ____
           │     /    ‾‾‾‾‾‾‾‾──__
           │    /                 ‾‾──__
           │   /                        ‾‾‾‾── min_lr
           └──┴───────────────────────────────┴──▶ step
              0  warmup                      total

    Step ``s`` (0-based) trains with ``lr·(s+1)/warmup`` during warmup, then with
    ``min + (lr − min)·½(1 + cos(π·p))``, ``p = (s − warmup)/(total − warmup)`` (Loshchilov &
    Hutter 2017, SGDR, without restarts).

    Args:
        lr: Peak learning rate.
        cfg: Warmup steps, decay shape and floor.
        total_steps: Steps of the whole run (the decay ends there).
    """

    def __init__(self, lr: float, cfg: ScheduleConfig, total_steps: int) -> None:
        self.lr, self.cfg, self.total = lr, cfg, total_steps

    def __call__(self, step: int) -> float:
        warmup, floor = self.cfg.warmup_steps, self.lr * self.cfg.min_lr_ratio
        if step < warmup:
            return self.lr * (step + 1) / warmup
        if self.cfg.decay == "constant":
            return self.lr
        progress = min(1.0, (step - warmup) / max(1, self.total - warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.cfg.decay == "cosine" else 1.0 - progress
        return floor + (self.lr - floor) * shape

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set the learning rate of every parameter group for ``step`` (times the group's `LR_SCALE`); return
        the schedule's rate."""
        lr = self(step)
        for group in optimizer.param_groups:
            rate = lr * group.get(LR_SCALE, 1.0)
            if isinstance(group["lr"], torch.Tensor):  # a CUDA-graphed step reads it there (`step_graph.capturable_`)
                group["lr"].fill_(rate)
            else:
                group["lr"] = rate
        return lr
