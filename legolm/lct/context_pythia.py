"""`ContextPythia`: a Pythia model whose position t also reads a state computed at position t-1.

::

    s₋₁ = 0
    x_t ── wte ──(+)── blocks[0..L) ── s_t ── norm ── lm_head ── logits_t
                  ▲                     │
                  └─ W_ctx·tanh(s_{t-1}) ◄┘   (the recurrent context path)

The state s_t is the output of the last block at position t. Because s_{t-1} needs the whole
forward of position t-1, exact training runs the sequence one position at a time
(`forward_sequential`, backpropagating through the chain). Lagged Cache Training instead feeds
states cached from the previous visit of the same window and runs all positions at once
(`forward`); see `legolm.lct.train`. ``W_ctx`` starts at zero, so an untrained context path leaves
the model a plain Pythia.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from legolm.core.config import ModelConfig
from legolm.core.context import LayerContext
from legolm.model.transformer import TransformerLM


@dataclass
class ContextOutput:
    """Logits (B, T, V) and the states s_t (B, T, C) that the next position reads."""

    logits: Tensor
    states: Tensor


class GrowingKV:
    """An autograd-safe cache for sequential training: keys/values are concatenated, never written in place."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)  # (B, H, S, D)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class ContextPythia(nn.Module):
    """Pythia blocks plus a recurrent context path from each position's last-block output to the next.

    Args:
        config: A `ModelConfig` (usually a Pythia preset); every layer type works, the name says
            what the experiments use.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.lm = TransformerLM(config)
        self.ctx_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        nn.init.zeros_(self.ctx_proj.weight)

    def inject(self, idx: Tensor, positions: Tensor, prev: Tensor) -> Tensor:
        """Embeddings plus the context read from ``prev`` (B, T, C), the states of positions t-1."""
        return self.lm.embed(idx, positions) + self.ctx_proj(torch.tanh(prev))  # (B, T, C)

    def forward(self, idx: Tensor, prev_states: Tensor | None = None) -> ContextOutput:
        """All positions at once, position t reading ``prev_states[:, t-1]`` (zeros at t = 0).

        With the exact states this equals `forward_sequential`; with states cached from an earlier
        pass it is the lagged approximation LCT trains with.
        """
        B, T = idx.shape
        positions = torch.arange(T, device=idx.device).expand(B, T)
        prev = torch.zeros(B, T, self.config.n_embd, device=idx.device, dtype=self.lm.wte.weight.dtype)
        if prev_states is not None:
            prev = torch.cat([prev[:, :1], prev_states[:, :-1].to(prev.dtype)], dim=1)  # shift right
        h = self.inject(idx, positions, prev)
        h = self.lm.forward_layers(h, self.lm.make_context(positions, h.dtype, span=T)).hidden  # (B, T, C)
        return ContextOutput(self.lm.project(h), h)

    def forward_sequential(self, idx: Tensor) -> ContextOutput:
        """The exact recurrence: one position per step, each reading the state just computed."""
        B, T = idx.shape
        caches = [GrowingKV() for _ in self.lm.blocks]
        state = torch.zeros(B, 1, self.config.n_embd, device=idx.device, dtype=self.lm.wte.weight.dtype)
        states = []
        for t in range(T):
            pos = torch.full((B, 1), t, device=idx.device)
            h = self.inject(idx[:, t:t + 1], pos, state)  # (B, 1, C)
            base = self.lm.make_context(pos, h.dtype, span=T)
            ctx = LayerContext(base.cos, base.sin,
                               torch.zeros(1, 1, 1, t + 1, dtype=h.dtype, device=idx.device), pos[0])
            for block, cache in zip(self.lm.blocks, caches, strict=True):
                h = block(h, ctx, cache)
            state = h
            states.append(h)
        hidden = torch.cat(states, dim=1)  # (B, T, C)
        return ContextOutput(self.lm.project(hidden), hidden)
