"""The names of the registered layer types, and the module that builds each (imported only when built).

A new layer type is one new file in `legolm.layers` with a ``build(config, layer_idx)`` function
plus one line in `LAYER_MODULES`. `ModelConfig` checks its ``layers`` against these names;
`legolm.layers` imports the builders.
"""

from __future__ import annotations

CUSTOM_PREFIX = "custom:"  # config.layers name of an unregistered layer object

LAYER_MODULES: dict[str, str] = {
    "gpt2": "legolm.layers.gpt2",
    "pythia": "legolm.layers.pythia",
    "llama": "legolm.layers.llama",
    "infini": "legolm.layers.infini",
    "multi_memory": "legolm.layers.multi_memory",
    "hierarchical": "legolm.layers.hierarchical",
}


def registered_layers() -> list[str]:
    """Names usable in ``ModelConfig.layers``."""
    return sorted(LAYER_MODULES)
