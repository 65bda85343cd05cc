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


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``cos.size(-1)`` dims of ``x``.

    Args:
        x: (B, T, H, D) queries or keys, as the projection lays them out: rotated before the heads move to dim 1,
            the transposes stay views (rotating (B, H, T, D) made torch.compile write a heads-first copy).
        cos: (B, T, 1, R) or (1, T, 1, R), R <= D, already in ``x``'s dtype.
        sin: same shape as ``cos``.
    """
    r = cos.size(-1)
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat([out, x_pass], dim=-1) if x_pass.size(-1) else out
