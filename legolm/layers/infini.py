"""Infini-attention block (Munkhdalai et al. 2024, "Leave No Context Behind", arXiv 2404.07143).

Segment-local causal attention plus one compressive memory read and written per segment (see
`legolm.layers.memory`), gated per head by a learned β; no position encoding in this layer;
Pythia's parallel residual and GELU MLP around it.

Memory banks (an option beyond the paper; one bank is the paper's layer): segments are written
``segments_per_bank`` at a time into bank 0, then bank 1, ..., wrapping around (a bank keeps
what it holds). A read normalises each written bank on its own and mixes them with learned
softmax weights, so segments far apart are not blended in one normaliser::

    segments  s0 s1 s2 s3 | s4 s5 s6 s7 | s8 ...        num_memory_banks=2, segments_per_bank=4
    bank      0  0  0  0  | 1  1  1  1  | 0  ...
    A_mem = Σ_b softmax(w)_b · σ(Q) M_b / (σ(Q) z_b)     over the banks written so far
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

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

LAYER_TYPE = "infini"


@dataclass
class InfiniOptions(MemoryOptions):
    """Options of the ``infini`` layer (``config.extra["infini"]``).

    Attributes:
        segment_len: Tokens per segment (local attention span; memory is written once per segment).
        use_delta_rule: Write with the delta rule (else the plain linear rule).
        memory_heads: Memory heads; each is n_head·head_dim / memory_heads wide (1 = one head of width n_embd).
        eps: Lower clamp of the read denominator σ(Q) z.
        num_memory_banks: Memory banks (1 = the paper's single memory).
        segments_per_bank: Consecutive segments written into one bank before moving to the next.
    """

    num_memory_banks: int = 1
    segments_per_bank: int = 4

    def _positive(self) -> list[str]:
        return [*super()._positive(), "num_memory_banks", "segments_per_bank"]


class BankedMemory(CompressiveMemory):
    """``num_banks`` memories filled in turn, read each on its own and mixed by learned weights.

    Args:
        num_banks: Banks (slots of the state).
        segments_per_bank: Segments written into a bank before the next one.
        delta: Use the delta rule.
        eps: Read denominator clamp.
    """

    def __init__(self, num_banks: int, segments_per_bank: int, delta: bool, eps: float) -> None:
        super().__init__(num_banks, delta, eps)
        self.segments_per_bank = segments_per_bank
        self.bank_logits = nn.Parameter(torch.zeros(num_banks))

    def read(self, q: Tensor, state: State, segment: int) -> Tensor:
        n = written_slots(segment, self.slots, self.segments_per_bank)
        if n == 0:
            return q.new_zeros(*q.shape[:-1], state["M"].shape[-1])  # nothing written yet: reads 0
        reads = self.read_slots(elu_plus_one(q), state)[:, :n]  # (B, n, Hm, L, Dv)
        weights = self.bank_logits[:n].float().softmax(0).view(1, n, 1, 1, 1)
        return (weights * reads).sum(dim=1)

    def write(self, k: Tensor, v: Tensor, state: State, segment: int) -> State:
        bank = segment // self.segments_per_bank % self.slots
        return self.write_slot(state, bank, elu_plus_one(k), v)


def build(config: ModelConfig, layer_idx: int) -> MemoryBlock:
    o = InfiniOptions.from_config(config, LAYER_TYPE)
    memory = BankedMemory(o.num_memory_banks, o.segments_per_bank, o.use_delta_rule, o.eps)
    return memory_block(config, memory, o, LAYER_TYPE)
