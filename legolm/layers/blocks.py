"""Residual wirings. A block is built by passing its parts in.

Sequential (GPT-2, Llama)::

    x ──┬─ norm_1 ─ attn ─(+)──┬─ norm_2 ─ mlp ─(+)── out
        └──────────────────────┘└───────────────┘

Parallel (GPT-NeoX / Pythia): attention and MLP both read the block input::

    x ──┬─ norm_1 ─ attn ──(+)── out
        ├─ norm_2 ─ mlp  ───┤
        └───────────────────┘
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from legolm.core.context import LayerContext
from legolm.core.kv_cache import KVStore
from legolm.layers.attention import CausalSelfAttention


class SequentialBlock(nn.Module):
    """Pre-norm block: x + attn(norm_1(x)), then + mlp(norm_2(·))."""

    def __init__(self, norm_1: nn.Module, attn: CausalSelfAttention, norm_2: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.norm_1, self.attn, self.norm_2, self.mlp = norm_1, attn, norm_2, mlp

    def forward(self, x: Tensor, ctx: LayerContext, cache: KVStore | None = None) -> Tensor:
        x = x + self.attn(self.norm_1(x), ctx, cache)  # (B, T, C)
        return x + self.mlp(self.norm_2(x))


class ParallelBlock(nn.Module):
    """GPT-NeoX block: x + attn(norm_1(x)) + mlp(norm_2(x)).

    ``attn`` is any attention module called as ``attn(x, ctx, cache)``; ``cache`` is whatever it
    keeps (a `KVStore`, or a memory layer's ``SegmentCache``, see `legolm.layers.memory.MemoryBlock`).
    """

    def __init__(self, norm_1: nn.Module, attn: nn.Module, norm_2: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.norm_1, self.attn, self.norm_2, self.mlp = norm_1, attn, norm_2, mlp

    def forward(self, x: Tensor, ctx: LayerContext, cache: Any = None) -> Tensor:
        return x + self.attn(self.norm_1(x), ctx, cache) + self.mlp(self.norm_2(x))  # (B, T, C)
