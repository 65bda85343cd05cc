"""Parameters shared by every report and optimiser: counts (the training loop's line, the adapters'
summaries) and the trainable list `fit` optimises."""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of ``model``; a tensor shared by several modules counts once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters `fit` optimises: those with ``requires_grad`` (callers freeze the rest)."""
    return [p for p in model.parameters() if p.requires_grad]
