"""Reusable `fit` callbacks."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from legolm.train.fit import Callback, FitState, peak_memory_mb


@dataclass
class EpochRecord:
    """One epoch of a run.

    Attributes:
        epoch: 1-based epoch number.
        train_seconds: Wall time of the epoch's training steps (evaluation excluded).
        val_ppl: Validation perplexity of the evaluation at the epoch's end (NaN without one).
        peak_memory_mb: Peak device memory so far (CUDA allocated, else process RSS).
        extra: Whatever a subclass measures per epoch.
    """

    epoch: int
    train_seconds: float
    val_ppl: float = math.nan
    peak_memory_mb: float = math.nan
    extra: dict[str, float] = field(default_factory=dict)


class EpochTimer(Callback):
    """Records each epoch's training time (evaluation and this callback's own work excluded) and
    the validation perplexity evaluated at its end; subclasses add measurements in `measure`.

    Run with ``eval.every`` = steps per epoch so that every epoch ends with an evaluation. The
    last epoch is closed at the end of training even when the run stops exactly at its end.

    Args:
        device: Where peak memory is read.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.records: list[EpochRecord] = []
        self.mark, self.eval_mark, self.step_mark = 0.0, 0.0, 0
        self.pending_ppl = math.nan

    def on_train_start(self, state: FitState, model: nn.Module) -> None:
        self._restart(state)

    def on_eval(self, state: FitState, model: nn.Module, metrics: dict[str, float]) -> None:
        self.pending_ppl = metrics.get("val_ppl", math.nan)

    def on_epoch_end(self, state: FitState, model: nn.Module) -> None:
        self._close(state, model)

    def on_train_end(self, state: FitState, model: nn.Module) -> None:
        if state.step > self.step_mark:
            self._close(state, model)
        elif self.records and math.isnan(self.records[-1].val_ppl):
            self.records[-1].val_ppl = self.pending_ppl

    def measure(self, model: nn.Module) -> dict[str, float]:
        """Extra per-epoch figures (not timed); none by default."""
        return {}

    def _close(self, state: FitState, model: nn.Module) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self.mark - (state.eval_s - self.eval_mark)
        record = EpochRecord(len(self.records) + 1, seconds, self.pending_ppl, peak_memory_mb(self.device))
        record.extra = self.measure(model)
        self.records.append(record)
        self.pending_ppl = math.nan
        self._restart(state)

    def _restart(self, state: FitState) -> None:
        self.mark, self.eval_mark, self.step_mark = time.perf_counter(), state.eval_s, state.step
