"""Calibrating the routing threshold τ on validation text.

Confidence is the shallow exit's max softmax probability. τ is the `target_ratio` quantile of
the validation tokens' confidences: that fraction of tokens falls below it and counts as "hard"
(the upper layers train on them and run for them at generation).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from legolm.errors import ConfigError
from legolm.lego.model import LegoLM, confidence, rewind
from legolm.train.batches import Batch


def check_target_ratio(target_ratio: float) -> None:
    """Raise `ConfigError` unless 0 < target_ratio < 1."""
    if not 0.0 < target_ratio < 1.0:
        raise ConfigError(f"target_ratio must be in (0, 1) (the fraction of validation tokens made hard), "
                          f"got {target_ratio}; e.g. 0.5 makes the least confident half hard")


@torch.no_grad()
def shallow_confidences(model: LegoLM, batches: Iterable[Batch], max_batches: int | None = None,
                        progress: bool = False) -> Tensor:
    """Shallow-exit confidence of every input position of ``batches`` (``input_ids`` (B, T)), flat fp32 on CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[Tensor] = []
    rewind(batches)
    for i, batch in enumerate(tqdm(batches, desc="confidence", unit="batch", disable=not progress)):
        if max_batches is not None and i >= max_batches:
            break
        logits = model.shallow_head(model.lower(batch["input_ids"].to(device)))  # (B, T, V)
        out.append(confidence(logits).flatten().cpu())
    model.train(was_training)
    if not out:
        raise ConfigError("no validation batches to calibrate the threshold on; give the corpus validation text")
    return torch.cat(out)


def quantile_threshold(conf: Tensor, target_ratio: float) -> float:
    """The value with ``floor(target_ratio · N)`` of the N confidences strictly below it (ties aside)."""
    check_target_ratio(target_ratio)
    ordered = conf.flatten().sort().values
    k = min(int(target_ratio * ordered.numel()), ordered.numel() - 1)
    return float(ordered[k])


def compute_confidence_threshold(model: LegoLM, val_data: Iterable[Batch], target_ratio: float,
                                 max_batches: int | None = None) -> float:
    """τ under which ``target_ratio`` of the validation tokens' shallow confidences fall.

    Args:
        model: A LEGO model (shallow or extended: the shallow exit is the same).
        val_data: Validation batches with ``input_ids`` (e.g. `WindowBatches` of the val split).
        target_ratio: Fraction of tokens to call hard, in (0, 1).
        max_batches: Use only the first batches.

    Raises:
        ConfigError: ``target_ratio`` outside (0, 1), or no batches.
    """
    check_target_ratio(target_ratio)
    return quantile_threshold(shallow_confidences(model, val_data, max_batches), target_ratio)
