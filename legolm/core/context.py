"""What every layer of one forward pass shares: positions, attention bias and cache slots."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LayerContext:
    """Per-forward inputs computed once by the model and read by each layer.

    Attributes:
        cos: RoPE's cosines (B or 1, T, 1, R) in the activation dtype (for (B, T, H, D) heads;
            `legolm.core.rope.rope_operands`), None without RoPE.
        sin: RoPE's signed sines, same shape.
        attn_bias: Additive attention mask (B or 1, 1, T, S) in the activation dtype, 0 where a query may attend and
            -inf where not (`attention_bias`); None = plain causal.
        input_pos: Cache slots (T,) the new tokens are written to; None without a cache.
    """

    cos: Tensor | None
    sin: Tensor | None
    attn_bias: Tensor | None
    input_pos: Tensor | None


def attention_bias(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """The additive mask of a boolean one (True = may attend): 0 there, -inf elsewhere, in ``dtype``.

    Built once per forward: handed a boolean mask, `scaled_dot_product_attention` converts it in every layer (two
    kernels each, in every step of the non-fused decoders and in each prefill). The sums are the same.
    """
    return torch.full(allowed.shape, float("-inf"), dtype=dtype, device=allowed.device).masked_fill_(allowed, 0.0)
