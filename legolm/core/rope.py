"""Rotary position embeddings (Su et al. 2021, "RoFormer", arXiv 2104.09864).

Half-split ("rotate_half") layout as in GPT-NeoX and Hugging Face Llama: the first
``rotary_dim`` dims of each head rotate, pairs are (i, i + rotary_dim/2); the rest pass through
(Pythia rotates 25% of each head).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_tables(rotary_dim: int, max_len: int, base: float, device: torch.device | None = None) -> Tensor:
    """cos/sin for positions 0..max_len-1, stacked as (2, max_len, rotary_dim), fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim))
    freqs = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)  # (L, R/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, R)
    return torch.stack([emb.cos(), emb.sin()])


def rope_operands(tables: Tensor) -> tuple[Tensor, Tensor]:
    """The multipliers of `apply_rope` from cos/sin tables (2, ..., R): cos, and sin with rotate_half's sign (its
    first half negated), so that ``x_rot·cos + swap(x_rot)·sin`` rotates the R dims."""
    cos, sin = tables[0], tables[1]
    half = cos.size(-1) // 2
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first R dims of every head of ``x``: ``x_rot·cos + swap(x_rot)·sin``, swap exchanging the two
    halves of x_rot; the other D - R dims pass through. Three kernels in eager mode (four where R < D), where the
    half-split formula ``cat(x_rot·cos + rotate_half(x_rot)·sin, x_pass)`` takes six per tensor; all of it on the
    R dims only, with static slices that torch.compile fuses into one kernel.

    Args:
        x: (B, T, H, D) queries and/or keys, as the projection lays them out: rotated before the heads move to
            dim 1, the transposes stay views (rotating (B, H, T, D) made torch.compile write a heads-first copy).
            The attention layer rotates q and k in one call (they are adjacent in its projection).
        cos: (B or 1, T, 1, R) from `rope_operands`, already in ``x``'s dtype.
        sin: same shape as ``cos`` (signed).
    """
    r = cos.size(-1)
    half = r // 2
    x_rot = x[..., :r]
    rotated = torch.addcmul(x_rot * cos, torch.cat([x[..., half:r], x[..., :half]], dim=-1), sin)
    return torch.cat([rotated, x[..., r:]], dim=-1) if r < x.size(-1) else rotated
