"""AdamW over the trainable parameters, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from legolm.train.config import OptimConfig, ScheduleConfig


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only.

    Parameters of 2 or more dimensions (linear and embedding weights) decay; biases and norm
    gains do not, as in GPT-2/nanoGPT. The fused kernel is used on CUDA unless ``cfg.fused`` says
    otherwise.
    """
    params = list(params)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=fused)


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
        """Set the learning rate of every parameter group for ``step``; return it."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
