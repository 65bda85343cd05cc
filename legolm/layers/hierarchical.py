"""Hierarchical memory block: a fine memory of recent segments and a coarse one of older ones.

Built on Infini-attention (Munkhdalai et al. 2024, arXiv 2404.07143; see `legolm.layers.memory`).
Every segment is written into the fine memory; every ``coarse_every`` segments the fine memory
is consolidated into the coarse one (M_c += M_f, z_c += z_f) and emptied. A read takes both and
lets a learned, query-dependent expansion gate decide how much fine detail to add to the coarse
summary::

    segments   s0 s1 s2 s3 | s4 s5 s6 s7 | s8              coarse_every=4
    fine       +  +  +  +  ┐ +  +  +  +  ┐ +
    coarse                 └─▶ += fine   └─▶ += fine
    g     = sigmoid(q · w_h + b_h)                                       (B, Hm, L, 1), w, b start at 0
    A_mem = g · read(fine) + (1 − g) · read(coarse)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from legolm.layers.memory import (
    CompressiveMemory,
    MemoryBlock,
    MemoryOptions,
    State,
    elu_plus_one,
    memory_block,
)
from legolm.model.config import ModelConfig

LAYER_TYPE = "hierarchical"
FINE, COARSE = 0, 1


@dataclass
class HierarchicalOptions(MemoryOptions):
    """Options of the ``hierarchical`` layer (``config.extra["hierarchical"]``).

    Attributes:
        segment_len: Tokens per segment (local attention span; memory is written once per segment).
        use_delta_rule: Write the fine memory with the delta rule (else the plain linear rule).
        memory_heads: Memory heads; each is n_head·head_dim / memory_heads wide (1 = one head of width n_embd).
        eps: Lower clamp of the read denominator σ(Q) z.
        coarse_every: Segments between consolidations of the fine memory into the coarse one.
    """

    coarse_every: int = 4

    def _positive(self) -> list[str]:
        return [*super()._positive(), "coarse_every"]


class HierarchicalMemory(CompressiveMemory):
    """Fine (slot 0) and coarse (slot 1) memories with a learned expansion gate.

    Args:
        heads: Memory heads Hm.
        head_dim: Dk of each memory head.
        coarse_every: Segments between consolidations.
        delta: Use the delta rule for the fine memory.
        eps: Read denominator clamp.
    """

    def __init__(self, heads: int, head_dim: int, coarse_every: int, delta: bool, eps: float) -> None:
        super().__init__(2, delta, eps)
        self.coarse_every = coarse_every
        self.gate_weight = nn.Parameter(torch.zeros(heads, head_dim))
        self.gate_bias = nn.Parameter(torch.zeros(heads))

    def read(self, q: Tensor, state: State, segment: int) -> Tensor:
        reads = self.read_slots(elu_plus_one(q), state)  # (B, 2, Hm, L, Dv)
        logit = torch.einsum("bhld,hd->bhl", q, self.gate_weight.float()) + self.gate_bias.float()[:, None]
        g = torch.sigmoid(logit).unsqueeze(-1)  # (B, Hm, L, 1)
        return g * reads[:, FINE] + (1 - g) * reads[:, COARSE]

    def write(self, k: Tensor, v: Tensor, state: State, segment: int) -> State:
        state = self.write_slot(state, FINE, elu_plus_one(k), v)
        if (segment + 1) % self.coarse_every:
            return state
        M, z = state["M"], state["z"]
        return {**state, "M": torch.stack([torch.zeros_like(M[:, FINE]), M[:, COARSE] + M[:, FINE]], 1),
                "z": torch.stack([torch.zeros_like(z[:, FINE]), z[:, COARSE] + z[:, FINE]], 1)}


def build(config: ModelConfig, layer_idx: int) -> MemoryBlock:
    o = HierarchicalOptions.from_config(config, LAYER_TYPE)
    head_dim = config.n_head * config.hd // o.memory_heads
    memory = HierarchicalMemory(o.memory_heads, head_dim, o.coarse_every, o.use_delta_rule, o.eps)
    return memory_block(config, memory, o, LAYER_TYPE)
