"""Layer types: each is a builder ``(config, layer_idx) -> nn.Module`` registered by name.

A new layer type is one new file with a ``build`` function plus one line in
`legolm.core.layer_types.LAYER_MODULES` (the names `ModelConfig` accepts).

A model can also be assembled from layer objects, without registering anything first
(`stack_config` and `build_blocks`, what ``TransformerLM(config, layers=[...])`` runs): each entry of ``layers`` is

- a registered name (``"pythia"``): built from the config, as ``config.layers`` does;
- a builder ``(config, layer_idx) -> nn.Module``: called with the model's config (a registered
  type's own ``build``, e.g. ``legolm.layers.infini.build``, keeps its registered name);
- a module instance: used as it is (the model's initialisation then re-initialises its linear,
  embedding and norm weights like every other layer's).

A block's forward is ``block(x, ctx, cache) -> x`` (see `legolm.layers.blocks`). Unregistered
entries are recorded in ``config.layers`` as ``custom:<ClassName>``: such a config still saves and
describes the model, but cannot rebuild it (load the weights into a model built with the same
``layers=[...]``, or register the type).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from torch import nn

from legolm.core.layer_types import CUSTOM_PREFIX, LAYER_MODULES, registered_layers
from legolm.errors import ConfigError

if TYPE_CHECKING:
    from legolm.core.config import ModelConfig

LayerBuilder = Callable[["ModelConfig", int], nn.Module]
LayerSpec = str | nn.Module | LayerBuilder


def _builder(name: str) -> LayerBuilder:
    if name.startswith(CUSTOM_PREFIX):
        raise ConfigError(f"layer type {name!r} was an unregistered layer object: this config cannot rebuild it. "
                          "Build the model with TransformerLM(config, layers=[...]) and the same objects, then load "
                          "the weights; or register the type (one file + one line in legolm/core/layer_types.py)")
    builder: LayerBuilder = importlib.import_module(LAYER_MODULES[name]).build
    return builder


def build_layer(name: str, config: ModelConfig, layer_idx: int) -> nn.Module:
    """Build layer ``layer_idx`` of type ``name`` from the config."""
    return _builder(name)(config, layer_idx)


def layer_name(spec: LayerSpec) -> str:
    """The ``config.layers`` name of a `LayerSpec`: its registered name, else ``custom:<ClassName>``."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, nn.Module):
        return CUSTOM_PREFIX + type(spec).__name__
    for name, module in LAYER_MODULES.items():
        if getattr(spec, "__module__", None) == module and getattr(spec, "__name__", None) == "build":
            return name
    return CUSTOM_PREFIX + getattr(spec, "__name__", type(spec).__name__)


def stack_config(config: ModelConfig, layers: Sequence[LayerSpec] | None = None) -> ModelConfig:
    """``config`` with ``layers`` naming the given stack (``config`` itself when ``layers`` is None).

    Raises:
        ConfigError: An unknown name, an entry that is none of the three, or one module instance given twice.
    """
    if layers is None:
        return config
    bad = [i for i, s in enumerate(layers) if not isinstance(s, (str, nn.Module)) and not callable(s)]
    if bad:
        raise ConfigError(f"layers[{bad[0]}] is a {type(layers[bad[0]]).__name__}: give a registered name "
                          f"{registered_layers()}, a builder (config, layer_idx) -> nn.Module, or an nn.Module")
    instances = [id(s) for s in layers if isinstance(s, nn.Module)]
    if len(instances) != len(set(instances)):
        raise ConfigError("the same layer module appears twice in layers=[...]: blocks would share weights; "
                          "pass a separate instance (or a builder) for each block")
    return dataclasses.replace(config, layers=[layer_name(s) for s in layers])  # checks the names


def build_blocks(config: ModelConfig, layers: Sequence[LayerSpec] | None = None) -> list[nn.Module]:
    """The blocks of ``layers`` (default: ``config.layers``), bottom to top; ``config`` from `stack_config`."""
    specs: Sequence[LayerSpec] = config.layers if layers is None else layers
    return [_build(s, config, i) for i, s in enumerate(specs)]


def _build(spec: LayerSpec, config: ModelConfig, layer_idx: int) -> nn.Module:
    if isinstance(spec, nn.Module):
        return spec
    builder = _builder(spec) if isinstance(spec, str) else spec
    return builder(config, layer_idx)
