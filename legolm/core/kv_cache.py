"""Static key/value caches.

Every layer's buffer is allocated once at its full length (B, H_kv, max_len, D) and written in
place at the slots ``input_pos``: no re-allocation while decoding, which is what lets a decode
step be captured in a CUDA graph. A `KVCache` may hold any subset of the layers, so LEGO's early
exit can keep separate lower and upper caches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import Tensor

from legolm.core.config import ModelConfig
from legolm.errors import ConfigError


class KVStore(Protocol):
    """What an attention layer needs of a cache: write new keys/values, get all of them back."""

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


class LayerKVCache:
    """Keys and values of one attention layer."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (B, H_kv, T, D) at slots ``input_pos`` (T,); return the full buffers."""
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


class KVCache:
    """Per-layer static caches for a batch of sequences.

    Args:
        config: The model's config (heads and head size).
        batch: Sequences decoded together.
        max_len: Slots per sequence (prompt + new tokens).
        layers: Which layer indices get a cache (default: all).
        dtype: Storage dtype (usually the model's).
        device: Where the buffers live.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, *, layers: Iterable[int] | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if max_len > config.block_size and config.positions == "learned":
            raise ConfigError(
                f"cache length {max_len} exceeds the model's {config.block_size} learned positions; "
                "generate fewer tokens or shorten the prompt"
            )
        self.batch, self.max_len = batch, max_len
        ids = range(config.n_layer) if layers is None else layers
        self.layers = {i: LayerKVCache(batch, config.kv_heads, max_len, config.hd, dtype, device) for i in ids}

    def get(self, layer: int) -> LayerKVCache | None:
        return self.layers.get(layer)

    def nbytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self.layers.values())
