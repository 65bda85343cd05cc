"""What every layer of one forward pass shares: positions, mask and cache slots."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class LayerContext:
    """Per-forward inputs computed once by the model and read by each layer.

    Attributes:
        cos: RoPE cosines (B or 1, T, 1, R) in the activation dtype (for (B, T, H, D) heads), None without RoPE.
        sin: RoPE sines, same shape.
        mask: Boolean attention mask (B or 1, 1, T, S), True = may attend; None = plain causal.
        input_pos: Cache slots (T,) the new tokens are written to; None without a cache.
    """

    cos: Tensor | None
    sin: Tensor | None
    mask: Tensor | None
    input_pos: Tensor | None
