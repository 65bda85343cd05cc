"""Layer types: each is a builder ``(config, layer_idx) -> nn.Module`` registered by name.

A new layer type is one new file with a ``build`` function plus one line in `_REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from legolm.model.config import ModelConfig

_REGISTRY: dict[str, str] = {
    "gpt2": "legolm.layers.gpt2",
    "pythia": "legolm.layers.pythia",
    "llama": "legolm.layers.llama",
    "infini": "legolm.layers.infini",
    "multi_memory": "legolm.layers.multi_memory",
    "hierarchical": "legolm.layers.hierarchical",
}


def registered_layers() -> list[str]:
    """Names usable in ``ModelConfig.layers``."""
    return sorted(_REGISTRY)


def build_layer(name: str, config: ModelConfig, layer_idx: int) -> nn.Module:
    """Build layer ``layer_idx`` of type ``name`` from the config."""
    import importlib

    builder: Callable[[ModelConfig, int], nn.Module] = importlib.import_module(_REGISTRY[name]).build
    return builder(config, layer_idx)
