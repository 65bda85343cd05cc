"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling."""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set logits outside the top-k / top-p nucleus to -inf (0 / 1.0 disable each filter).

    Args:
        logits: (B, V), already divided by the temperature.
        top_k: Keep the k largest logits of each row.
        top_p: Keep the smallest set of tokens whose probability sums to at least ``top_p``
            (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration").
    """
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: Tensor, greedy: bool, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None = None) -> Tensor:
    """(B, V) logits -> (B,) token ids."""
    if greedy or temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
