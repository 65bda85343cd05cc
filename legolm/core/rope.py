"""Rotary position embeddings (Su et al. 2021, "RoFormer", arXiv 2104.09864).

Half-split ("rotate_half") layout as in GPT-NeoX and Hugging Face Llama: the first
``rotary_dim`` dims of each head rotate, pairs are (i, i + rotary_dim/2); the rest pass through
(Pythia rotates 25% of each head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rope_tables(rotary_dim: int, max_len: int, base: float, device: torch.device | None = None) -> Tensor:
    """cos/sin for positions 0..max_len-1, stacked as (2, max_len, rotary_dim), fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim))
    freqs = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)  # (L, R/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, R)
    return torch.stack([emb.cos(), emb.sin()])


def rope_operands(tables: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """The multipliers of `apply_rope` from cos/sin tables (2, ..., R): each (..., D).

    cos gets ones on the D - R pass-through dims; sin gets rotate_half's sign (its first half negated) and zeros
    there, so that ``x·cos + swap(x)·sin`` (`apply_rope`) rotates the first R dims and passes the rest through.
    """
    cos, sin = tables[0], tables[1]
    r = cos.size(-1)
    half, pad = r // 2, head_dim - r
    return (F.pad(cos, (0, pad), value=1.0),
            F.pad(torch.cat([-sin[..., :half], sin[..., half:]], dim=-1), (0, pad)))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int) -> Tensor:
    """Rotate the first R = ``rotary_dim`` dims of every head of ``x``: ``x·cos + swap(x)·sin``, where swap exchanges
    the two halves of the rotated dims (three kernels in eager mode, where the half-split formula
    ``cat(x_rot·cos + rotate_half(x_rot)·sin, x_pass)`` takes six per tensor; static slices, which torch.compile
    fuses into one kernel).

    Args:
        x: (B, T, H, D) queries and/or keys, as the projection lays them out: rotated before the heads move to
            dim 1, the transposes stay views (rotating (B, H, T, D) made torch.compile write a heads-first copy).
            The attention layer rotates q and k in one call (they are adjacent in its projection).
        cos: (B or 1, T, 1, D) from `rope_operands`, already in ``x``'s dtype.
        sin: same shape as ``cos``.
        rotary_dim: R (even, <= D); the dims past it pass through (times one, plus zero).
    """
    half = rotary_dim // 2
    swapped = torch.cat([x[..., half:rotary_dim], x[..., :half], x[..., rotary_dim:]], dim=-1)
    return torch.addcmul(x * cos, swapped, sin)
