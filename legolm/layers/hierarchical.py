"""Hierarchical memory block: ``num_memories`` levels, from a fine memory of recent segments to coarse ones.

Built on Infini-attention (Munkhdalai et al. 2024, arXiv 2404.07143; see `legolm.layers.memory`).
Every segment is written into level 0, the fine memory. Every ``coarse_every`` segments level 0
is consolidated into level 1 (M₁ += M₀, z₁ += z₀) and emptied; every ``coarse_every²`` segments
level 1 (which then holds level 0 too) goes into level 2, and so on: level i holds whole blocks of
``coarse_every^i`` segments, and the top level N − 1 keeps everything older and is never emptied.
With ``num_memories=2`` (the default) this is one fine and one coarse memory::

    segments   s0 s1 s2 s3 | s4 s5 s6 s7 | s8              num_memories=2, coarse_every=4
    level 0    +  +  +  +  ┐ +  +  +  +  ┐ +
    level 1                └─▶ += level 0 └─▶ += level 0

    num_memories=3, coarse_every=2:     after   level 0   level 1   level 2
                                        s0      s0        ·         ·
                                        s1      ·         s0-s1     ·          (2 segments written)
                                        s2      s2        s0-s1     ·
                                        s3      ·         ·         s0-s3      (4 = 2²: levels 0, 1 fold)
                                        s4      s4        ·         s0-s3
                                        s5      ·         s4-s5     s0-s3
                                        s6      s6        s4-s5     s0-s3

A read takes every level and lets learned, query-dependent expansion gates decide how much finer
detail to add to the coarser summary, from the top down (stick-breaking from the fine end)::

    g_i   = sigmoid(q · w_i + b_h,i)                          (B, Hm, L, 1), i < N − 1; w, b start at 0
    A     = read(level N−1);  for i = N−2 … 0:  A = g_i · read(level i) + (1 − g_i) · A

so level i gets weight g_i · Π_{j<i} (1 − g_j) and the top Π_{j<N−1} (1 − g_j) (at init 1/2, 1/4, …).
For two levels that is A_mem = g · read(fine) + (1 − g) · read(coarse). The state holds N
memories of the same size as one ``infini`` memory, like a ``multi_memory`` layer with N memories.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from legolm.core.config import ModelConfig
from legolm.errors import ConfigError
from legolm.layers.memory import (
    CompressiveMemory,
    MemoryBlock,
    MemoryOptions,
    State,
    elu_plus_one,
    memory_block,
)

LAYER_TYPE = "hierarchical"
FINE = 0
MIN_LEVELS = 2  # a fine and a coarse memory


@dataclass
class HierarchicalOptions(MemoryOptions):
    """Options of the ``hierarchical`` layer (``config.extra["hierarchical"]``).

    Attributes:
        segment_len: Tokens per segment (local attention span; memory is written once per segment).
        use_delta_rule: Write the fine memory with the delta rule (else the plain linear rule).
        memory_heads: Memory heads; each is n_head·head_dim / memory_heads wide (1 = one head of width n_embd).
        eps: Lower clamp of the read denominator σ(Q) z.
        num_memories: Levels of the hierarchy, fine to coarse (>= 2; 2 = one fine and one coarse memory).
        coarse_every: Segments between consolidations of a level into the next one (level i every coarse_every^(i+1)).
    """

    num_memories: int = MIN_LEVELS
    coarse_every: int = 4

    def _positive(self) -> list[str]:
        return [*super()._positive(), "num_memories", "coarse_every"]

    def validate(self, config: ModelConfig, layer_type: str) -> None:
        super().validate(config, layer_type)
        if self.num_memories < MIN_LEVELS:
            raise ConfigError(f"{layer_type} layer: num_memories must be >= {MIN_LEVELS} (a fine and a coarse "
                              f"memory), got {self.num_memories}; use the infini layer for a single memory")


def folded_levels(segment: int, coarse_every: int, levels: int) -> int:
    """After writing segment ``segment`` (0-based), the levels 0..k-1 that fold into level k; returns k (0: none).

    k is the largest i <= levels - 1 with (segment + 1) divisible by coarse_every^i.
    """
    written, k = segment + 1, 0
    while k < levels - 1 and written % coarse_every ** (k + 1) == 0:
        k += 1
    return k


class HierarchicalMemory(CompressiveMemory):
    """``levels`` memories (slot 0 = fine, slot levels-1 = coarsest) with learned expansion gates.

    Args:
        heads: Memory heads Hm.
        head_dim: Dk of each memory head.
        levels: Memories N (>= 2).
        coarse_every: Segments between consolidations of one level into the next.
        delta: Use the delta rule for the fine memory.
        eps: Read denominator clamp.
    """

    def __init__(self, heads: int, head_dim: int, levels: int, coarse_every: int, delta: bool, eps: float) -> None:
        super().__init__(levels, delta, eps)
        self.coarse_every = coarse_every
        # The gate of level 0 keeps the two-level layer's names and shapes (its checkpoints load as they are);
        # levels 1 .. N-2 have their own gates beside it.
        self.gate_weight = nn.Parameter(torch.zeros(heads, head_dim))
        self.gate_bias = nn.Parameter(torch.zeros(heads))
        self.level_gate_weight = nn.Parameter(torch.zeros(levels - MIN_LEVELS, heads, head_dim)) \
            if levels > MIN_LEVELS else None
        self.level_gate_bias = nn.Parameter(torch.zeros(levels - MIN_LEVELS, heads)) if levels > MIN_LEVELS else None

    def gates(self) -> tuple[Tensor, Tensor]:
        """Weights (N-1, Hm, Dk) and biases (N-1, Hm) of the expansion gates of levels 0 .. N-2, fp32."""
        w, b = self.gate_weight[None], self.gate_bias[None]
        if self.level_gate_weight is not None and self.level_gate_bias is not None:
            w, b = torch.cat([w, self.level_gate_weight]), torch.cat([b, self.level_gate_bias])
        return w.float(), b.float()

    def level_weights(self, q: Tensor) -> Tensor:
        """Weight of each level's read for raw queries q (B, Hm, L, Dk): (B, N, Hm, L, 1), summing to 1."""
        w, b = self.gates()
        logit = torch.einsum("bhld,nhd->bnhl", q, w) + b[None, :, :, None]
        g = torch.sigmoid(logit).unsqueeze(-1)  # (B, N-1, Hm, L, 1): take level i's detail
        rest = torch.cumprod(1 - g, dim=1)  # what is left for the levels above i
        left = torch.cat([torch.ones_like(g[:, :1]), rest[:, :-1]], dim=1)
        return torch.cat([g * left, rest[:, -1:]], dim=1)

    def read(self, q: Tensor, state: State, segment: int) -> Tensor:
        reads = self.read_slots(elu_plus_one(q), state)  # (B, N, Hm, L, Dv)
        return (self.level_weights(q) * reads).sum(dim=1)

    def write(self, k: Tensor, v: Tensor, state: State, segment: int) -> State:
        state = self.write_slot(state, FINE, elu_plus_one(k), v)
        top = folded_levels(segment, self.coarse_every, self.slots)
        if top == 0:
            return state
        return {**state, "M": self._fold(state["M"], top), "z": self._fold(state["z"], top)}

    @staticmethod
    def _fold(t: Tensor, top: int) -> Tensor:
        """Levels 0..top-1 of ``t`` (B, N, ...) added into level ``top`` and emptied (out of place)."""
        merged = t[:, : top + 1].sum(dim=1, keepdim=True)
        return torch.cat([torch.zeros_like(t[:, :top]), merged, t[:, top + 1:]], dim=1)


def build(config: ModelConfig, layer_idx: int) -> MemoryBlock:
    o = HierarchicalOptions.from_config(config, LAYER_TYPE)
    head_dim = config.n_head * config.hd // o.memory_heads
    memory = HierarchicalMemory(o.memory_heads, head_dim, o.num_memories, o.coarse_every, o.use_delta_rule, o.eps)
    return memory_block(config, memory, o, LAYER_TYPE)
