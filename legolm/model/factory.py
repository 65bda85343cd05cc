"""`create_model`: one special layer among Pythia layers, by name, with its options.

::

    create_model("infini", special_position=0, segment_len=128)
        layers = [infini, pythia, pythia, pythia, pythia, pythia]     (base preset pythia-70m:
        extra  = {"infini": {"segment_len": 128}}                       512 wide, 8 heads, MLP 2,048)

Keyword options are sorted by name: `ModelConfig` fields (``n_embd``, ``block_size``,
``vocab_size``, ...) override the preset, the special layer's own options (see
`layer_options`) go to ``config.extra[kind]``; anything else is an error. A custom ``layers``
list replaces the one-special-layer layout (give the options of its memory layers in ``extra``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from legolm.core.config import ModelConfig
from legolm.errors import ConfigError
from legolm.layers.hierarchical import HierarchicalOptions
from legolm.layers.infini import InfiniOptions
from legolm.layers.memory import MemoryOptions
from legolm.layers.multi_memory import MultiMemoryOptions
from legolm.model.transformer import TransformerLM

KINDS = ("pythia", "infini", "multi_memory", "hierarchical")
LAYER_OPTIONS: dict[str, type[MemoryOptions]] = {
    "infini": InfiniOptions,
    "multi_memory": MultiMemoryOptions,
    "hierarchical": HierarchicalOptions,
}
BASE_PRESET = "pythia-70m"  # 6 layers, n_embd 512, 8 heads, intermediate 2,048
BASE_LAYER = "pythia"


def layer_options(kind: str) -> list[str]:
    """Option names of layer type ``kind`` (empty for layers without options)."""
    cls = LAYER_OPTIONS.get(kind)
    return [f.name for f in dataclasses.fields(cls)] if cls is not None else []


def layer_list(kind: str, num_layers: int, special_position: int) -> list[str]:
    """``num_layers`` Pythia layers with ``kind`` at ``special_position`` (negative: from the top)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; choose one of {list(KINDS)} or pass layers=[...]")
    if num_layers < 1:
        raise ConfigError(f"num_layers must be >= 1, got {num_layers}")
    if not -num_layers <= special_position < num_layers:
        raise ConfigError(f"special_position {special_position} is outside the {num_layers} layers "
                          f"(use 0..{num_layers - 1}, or negative to count from the top)")
    layers = [BASE_LAYER] * num_layers
    layers[special_position] = kind
    return layers


def model_config(kind: str = "pythia", *, layers: list[str] | None = None, num_layers: int = 6,
                 special_position: int = 0, base: str = BASE_PRESET, **options: Any) -> ModelConfig:
    """The `ModelConfig` that `create_model` builds (see the module docstring)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"layers"}
    overrides = {k: v for k, v in options.items() if k in fields}
    special = {k: v for k, v in options.items() if k not in fields}
    unknown = sorted(set(special) - set(layer_options(kind)))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for a {kind} model; valid: ModelConfig fields and "
                          f"{layer_options(kind) or 'no layer options'}")
    if layers is None:
        layers = layer_list(kind, num_layers, special_position)
    if special:
        overrides["extra"] = {**overrides.get("extra", {}), kind: special}
    config = ModelConfig.from_name(base, layers=layers, **overrides)
    for name in set(config.layers) & set(LAYER_OPTIONS):
        LAYER_OPTIONS[name].from_config(config, name)  # options are checked before any weight is made
    return config


def create_model(kind: str = "pythia", *, layers: list[str] | None = None, num_layers: int = 6,
                 special_position: int = 0, base: str = BASE_PRESET, **options: Any) -> TransformerLM:
    """Build a `TransformerLM`: ``kind`` at ``special_position`` among ``num_layers - 1`` Pythia layers.

    Args:
        kind: ``pythia`` (all Pythia layers), ``infini``, ``multi_memory`` or ``hierarchical``.
        layers: A custom layer list instead (``kind``/``num_layers``/``special_position`` unused).
        num_layers: Layers in the model.
        special_position: Index of the special layer (negative counts from the top).
        base: ModelConfig preset giving the sizes.
        **options: ModelConfig fields, and the options of ``kind`` (see `layer_options`).

    Raises:
        ConfigError: Unknown kind or option, or an invalid value.
    """
    return TransformerLM(model_config(kind, layers=layers, num_layers=num_layers, special_position=special_position,
                                      base=base, **options))
