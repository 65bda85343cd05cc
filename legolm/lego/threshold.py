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
from legolm.model.lego import LegoLM, check_target_ratio, confidence, quantile_threshold
from legolm.train.batches import Batch, rewind


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
