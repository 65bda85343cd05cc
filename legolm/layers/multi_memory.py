"""Multi-memory block: several independent compressive memories, chosen per query by attention.

Built on Infini-attention (Munkhdalai et al. 2024, arXiv 2404.07143; see `legolm.layers.memory`).
Segment s is written into memory s mod ``num_memories`` (round robin), so each memory holds its
own share of the past. A query selects among the memories written so far with softmax weights
from its match with each memory's mean key k̄_m = z_m / (tokens written into m)::

    score_m = σ(Q) · k̄_m / √Dk          w = softmax_m(score)           (B, Hm, L, M)
    A_mem   = Σ_m w_m · σ(Q) M_m / (σ(Q) z_m)

With one memory this is the ``infini`` layer with one bank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from legolm.core.config import ModelConfig
from legolm.layers.memory import (
    CompressiveMemory,
    MemoryBlock,
    MemoryOptions,
    State,
    elu_plus_one,
    memory_block,
    written_slots,
)

LAYER_TYPE = "multi_memory"


@dataclass
class MultiMemoryOptions(MemoryOptions):
    """Options of the ``multi_memory`` layer (``config.extra["multi_memory"]``).

    Attributes:
        segment_len: Tokens per segment (local attention span; memory is written once per segment).
        use_delta_rule: Write with the delta rule (else the plain linear rule).
        memory_heads: Memory heads; each is n_head·head_dim / memory_heads wide (1 = one head of width n_embd).
        eps: Lower clamp of the read denominator σ(Q) z.
        num_memories: Independent memories, written round robin one segment each.
    """

    num_memories: int = 4

    def _positive(self) -> list[str]:
        return [*super()._positive(), "num_memories"]


class SelectedMemories(CompressiveMemory):
    """Round-robin written memories mixed by query-dependent softmax selection.

    The state adds ``tokens`` (B, num_memories): keys written into each memory (for the mean key).

    Args:
        num_memories: Memories (slots of the state).
        delta: Use the delta rule.
        eps: Read denominator clamp.
    """

    def __init__(self, num_memories: int, delta: bool, eps: float) -> None:
        super().__init__(num_memories, delta, eps)

    def extra_state(self, batch: int, device: torch.device | str) -> State:
        return {"tokens": torch.zeros(batch, self.slots, dtype=torch.float32, device=device)}

    def read(self, q: Tensor, state: State, segment: int) -> Tensor:
        n = written_slots(segment, self.slots, 1)
        if n == 0:
            return q.new_zeros(*q.shape[:-1], state["M"].shape[-1])
        sq = elu_plus_one(q)  # (B, Hm, L, Dk)
        reads = self.read_slots(sq, state)[:, :n]  # (B, n, Hm, L, Dv)
        mean_key = state["z"][:, :n] / state["tokens"][:, :n, None, None]  # (B, n, Hm, Dk)
        scores = torch.einsum("bhld,bnhd->bnhl", sq, mean_key) / math.sqrt(sq.shape[-1])  # (B, n, Hm, L)
        weights = scores.softmax(dim=1).unsqueeze(-1)  # (B, n, Hm, L, 1)
        return (weights * reads).sum(dim=1)

    def write(self, k: Tensor, v: Tensor, state: State, segment: int) -> State:
        slot = segment % self.slots
        state = self.write_slot(state, slot, elu_plus_one(k), v)
        added = torch.zeros_like(state["tokens"])
        added[:, slot] = k.shape[-2]
        return {**state, "tokens": state["tokens"] + added}


def build(config: ModelConfig, layer_idx: int) -> MemoryBlock:
    o = MultiMemoryOptions.from_config(config, LAYER_TYPE)
    return memory_block(config, SelectedMemories(o.num_memories, o.use_delta_rule, o.eps), o, LAYER_TYPE)
