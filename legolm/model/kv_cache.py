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

from legolm.errors import ConfigError
from legolm.model.config import ModelConfig


class KVStore(Protocol):
    """What an attention layer needs of a cache: write new keys/values, get all of them back."""

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


class LayerKVCache:
    """Keys and values of one attention layer, in one buffer (2, B, H_kv, S, D): ``k`` and ``v`` are its halves,
    so a step writes both with one copy (one kernel per layer when the decode step is compiled)."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.kv = torch.zeros((2, batch, n_kv_head, max_len, head_dim), dtype=dtype, device=device)
        self.k, self.v = self.kv[0], self.kv[1]  # (B, H_kv, S, D) views

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (B, H_kv, T, D) at slots ``input_pos`` (T,); return the full buffers."""
        self.kv.index_copy_(3, input_pos, torch.stack((k, v)).to(self.kv.dtype))
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
        return sum(c.kv.numel() * c.kv.element_size() for c in self.layers.values())
