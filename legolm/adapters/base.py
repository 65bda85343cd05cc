"""The adapter protocol: a layer that wraps a frozen ``base_layer`` and adds trainable parameters.

Everything that trains, saves or merges adapters finds them through this class, never by
matching parameter names::

    trainable = [p for m in model.modules() if isinstance(m, AdapterLayer) for p in m.adapter_parameters()]
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator

from torch import nn


class AdapterLayer(nn.Module):
    """A module holding a frozen ``base_layer`` plus adapter weights (peft's ``BaseTunerLayer``).

    Subclasses implement `adapter_parameters`, `merge` and `unmerge`; `merged` says whether the
    adapter currently lives inside the base weight.

    Args:
        base_layer: The wrapped module; its parameters are frozen.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged = False
        base_layer.requires_grad_(False)

    @abstractmethod
    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the adapter adds (those that train)."""

    @abstractmethod
    def merge(self) -> None:
        """Fold the adapter into ``base_layer``'s weight; forward then runs the base layer alone."""

    @abstractmethod
    def unmerge(self) -> None:
        """Take the adapter back out of ``base_layer``'s weight (the inverse of `merge`)."""


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every adapter layer of ``model``."""
    return [p for layer in adapter_layers(model).values() for p in layer.adapter_parameters()]
