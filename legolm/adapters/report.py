"""Trainable-parameter report: every adapted module with its shapes, grouped by kind, and totals.

The totals line is peft's ``print_trainable_parameters`` line (its "all params" counts the
adapters too), followed by the base model's own size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from legolm.adapters.base import adapter_layers
from legolm.adapters.inject import hf_family, hf_module_names
from legolm.adapters.lora import LoRALinear


@dataclass
class AdapterRow:
    """One adapted module."""

    name: str
    hf_name: str
    r: int
    alpha: float
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    params: int

    @property
    def kind(self) -> str:
        """The name with layer indices replaced by ``*`` (``blocks.*.attn.proj``)."""
        return re.sub(r"\.\d+(?=\.)", ".*", self.name)


@dataclass
class TrainableReport:
    """Counts of a model with adapters.

    Attributes:
        rows: One row per adapted module, in model order.
        trainable: Parameters with requires_grad (adapters, plus unfrozen biases / modules).
        total: Every parameter, adapters included (peft's "all params").
        adapter: Parameters of the adapter layers.
    """

    rows: list[AdapterRow]
    trainable: int
    total: int
    adapter: int

    @property
    def base(self) -> int:
        """Parameters of the model without its adapters."""
        return self.total - self.adapter

    def summary(self) -> str:
        """peft's line, then the base size."""
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
                f"trainable%: {100 * self.trainable / self.total:.4f}\n"
                f"base model params: {self.base:,d} (trainable = {100 * self.trainable / self.base:.2f}% of it)")

    def format(self, per_module: bool = True) -> str:
        """A table of module kinds (with counts), optionally every module, and the totals."""
        lines = [f"{'adapted modules (Hugging Face name)':<64} {'n':>3} {'r':>3} {'A':>12} {'B':>12} {'params':>10}"]
        kinds: dict[str, list[AdapterRow]] = {}
        for row in self.rows:
            kinds.setdefault(row.kind, []).append(row)
        for kind, rows in kinds.items():
            hf = re.sub(r"\.\d+(?=\.)", ".*", rows[0].hf_name)
            label = f"{kind} ({hf})" if hf else kind
            lines.append(f"{label:<64} {len(rows):>3} {_rs(rows):>3} {_shape(rows[0].shape_a):>12} "
                         f"{_shape(rows[0].shape_b):>12} {sum(r.params for r in rows):>10,d}")
        if per_module:
            lines.append("")
            lines += [f"  {r.name:<40} {r.hf_name:<44} r={r.r:<3} alpha={r.alpha:g} A {_shape(r.shape_a)} "
                      f"B {_shape(r.shape_b)}" for r in self.rows]
        lines.append(self.summary())
        return "\n".join(lines)


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _rs(rows: list[AdapterRow]) -> str:
    ranks = sorted({r.r for r in rows})
    return str(ranks[0]) if len(ranks) == 1 else "mix"


def _unique_count(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count ``model``'s parameters and describe every `LoRALinear` in it."""
    config = getattr(model, "config", None)
    family = hf_family(config) if config is not None else None
    rows = []
    for name, layer in adapter_layers(model).items():
        if isinstance(layer, LoRALinear):
            hf = hf_module_names(name, family)
            rows.append(AdapterRow(name, hf[0] if hf else "", layer.r, layer.alpha, tuple(layer.lora_A.shape),
                                   tuple(layer.lora_B.shape), layer.lora_A.numel() + layer.lora_B.numel()))
    params = list(model.parameters())
    adapter = [p for layer in adapter_layers(model).values() for p in layer.adapter_parameters()]
    return TrainableReport(rows, _unique_count([p for p in params if p.requires_grad]), _unique_count(params),
                           _unique_count(adapter))
