"""Lagged Cache Training vs exact sequential training of `ContextPythia`, both through `fit`.

Exact training (``sequential``) runs each window one position at a time and backpropagates
through the whole recurrent chain: T forward steps per batch. Lagged Cache Training (``lct``)
runs the window in one parallel forward whose position t reads the state s_{t-1} cached from the
previous visit of the same window (detached), then stores the new states::

    epoch e:   prev = cache[sample_ids]            (states from epoch e-1; no-grad forward at first visit)
               out  = model(input_ids, prev)      (all T positions at once)
               loss = CE(out.logits, labels);  cache[sample_ids] = out.states.detach()

Both are evaluated the same way, by the exact recurrence (`exact_eval`): the model is recurrent,
so that is its true held-out perplexity. `LagMonitor` measures after each epoch how far the cache
is from the exact states of the current weights, mean |cache - exact|.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from legolm.data.tokenized import DataConfig
from legolm.errors import ConfigError
from legolm.lct.cache import LaggedStateCache, LCTCacheConfig
from legolm.lct.context_pythia import ContextPythia
from legolm.train.batches import Batch, BatchSource
from legolm.train.callbacks import EpochTimer
from legolm.train.config import FitConfig, ModelSpec
from legolm.train.distributed import all_gather_cat
from legolm.train.fit import LossOutput, autocast_for
from legolm.train.head_loss import token_cross_entropy
from legolm.utils.finite import safe_exp


class SequentialLoss:
    """Exact training: the recurrence unrolled over the window, gradients through every step."""

    def __call__(self, model: nn.Module, batch: Batch) -> LossOutput:
        assert isinstance(model, ContextPythia)
        out = model.forward_sequential(batch["input_ids"])
        return token_cross_entropy(out.logits, batch["labels"]), batch["labels"].numel(), {}


class LCTLoss:
    """Lagged Cache Training: one parallel forward reading the states cached at the last visit.

    Args:
        cache: The per-window state cache (filled lazily: a window seen for the first time gets
            its states from one no-grad forward with an empty context).
        refresh_passes: Parallel passes over the cached states with the current weights before the
            training forward (`LCTCacheConfig.refresh_passes`).
        grad_passes: The last of them that keep their graph (`LCTCacheConfig.grad_passes`).
    """

    def __init__(self, cache: LaggedStateCache, refresh_passes: int = 0, grad_passes: int = 0) -> None:
        self.cache = cache
        self.refresh_passes = refresh_passes
        self.grad_passes = grad_passes

    def __call__(self, model: nn.Module, batch: Batch) -> LossOutput:
        assert isinstance(model, ContextPythia)
        ids, sids = batch["input_ids"], batch["sample_ids"]
        self.cache.check(sids, ids)
        new = self.cache.missing(sids)
        if bool(new.any()):
            with torch.no_grad():
                rows = new.to(ids.device)
                self.cache.put(sids[new.cpu()], ids[rows], model(ids[rows]).states)
        prev = self.cache.get(sids, ids, ids.device)
        for i in range(self.refresh_passes):  # Jacobi steps towards the exact states of these weights
            with torch.set_grad_enabled(i >= self.refresh_passes - self.grad_passes and torch.is_grad_enabled()):
                prev = model(ids, prev).states
        out = model(ids, prev)
        self.cache.put(*all_gather_cat(sids, ids, out.states.detach()))  # every rank's windows, as one process
        return token_cross_entropy(out.logits, batch["labels"]), batch["labels"].numel(), {}


@torch.no_grad()
def exact_eval(model: ContextPythia, batches: BatchSource, max_batches: int | None, device: torch.device,
               precision: str) -> dict[str, float]:
    """Token-weighted mean loss and perplexity of the exact recurrence over validation windows."""
    was_training = model.training
    model.eval()
    batches.set_epoch(0)
    total, count = 0.0, 0
    with autocast_for(device, precision):
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            out = model.forward_sequential(batch["input_ids"].to(device))
            total += float(token_cross_entropy(out.logits, batch["labels"].to(device))) * batch["labels"].numel()
            count += batch["labels"].numel()
    model.train(was_training)
    mean = total / max(count, 1)
    return {"val_loss": mean, "val_ppl": safe_exp(mean), "val_tokens": count}


class LagMonitor(EpochTimer):
    """`EpochTimer` plus, per epoch, how far the LCT cache lags the exact states of the current weights.

    Args:
        probe: Training windows whose cached states are compared with the exact ones:
            ``(sample_ids (K,), input_ids (K, T))``.
        cache: The LCT cache (None for sequential training: no lag to measure).
        device: Where the probe runs.
    """

    def __init__(self, probe: tuple[Tensor, Tensor], cache: LaggedStateCache | None, device: torch.device) -> None:
        super().__init__(device)
        self.probe, self.cache = probe, cache

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict[str, float]:
        """mean |cache - exact| over the probe windows, and that over mean |exact|."""
        if self.cache is None:
            return {}
        assert isinstance(model, ContextPythia)
        sids, ids = self.probe
        was_training = model.training
        model.eval()
        exact = model.forward_sequential(ids.to(self.device)).states.float()
        model.train(was_training)
        cached = self.cache.get(sids, ids, self.device).float()
        diff = (cached - exact).abs().mean().item()
        return {"lag_abs": diff, "lag_rel": diff / max(exact.abs().mean().item(), 1e-12)}


@dataclass
class LCTConfig(FitConfig):
    """``legolm lct``: train `ContextPythia` by LCT and/or exact sequential training on the same data.

    Attributes:
        methods: Which trainings to run, in order (lct, sequential).
        model: Model preset and overrides (a Pythia preset; the context path is added).
        data: Corpus, tokenizer and split.
        lct: Where the lagged states are stored.
        max_train_windows: Use only the first this many training windows (None = all).
        lag_windows: Training windows whose cached states are compared with the exact ones each epoch.
    """

    methods: list[str] = field(default_factory=lambda: ["lct", "sequential"])
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    lct: LCTCacheConfig = field(default_factory=LCTCacheConfig)
    max_train_windows: int | None = None
    lag_windows: int = 8

    def validate(self) -> None:
        super().validate()
        unknown = sorted(set(self.methods) - {"lct", "sequential"})
        if unknown or not self.methods:
            raise ConfigError(f"methods must be a non-empty list of lct / sequential, got {self.methods}")
        if self.max_train_windows is not None and self.max_train_windows < self.batch_size:
            raise ConfigError(f"max_train_windows={self.max_train_windows} is fewer than one batch "
                              f"(batch_size={self.batch_size})")
        if self.lag_windows < 1:
            raise ConfigError(f"lag_windows must be >= 1, got {self.lag_windows}")
        if self.run.cuda_graph:
            raise ConfigError("run.cuda_graph: LCT's steps read and write the lagged state cache on the host side; "
                              "leave run.cuda_graph off")
        if self.run.strategy == "fsdp2":
            raise ConfigError("legolm lct evaluates and probes the whole model outside the training forward, which "
                              "FSDP2 shards; use --run.strategy ddp")
        if self.lct.refresh_passes < 0 or self.lct.refresh_passes > self.window:
            raise ConfigError(f"lct.refresh_passes must be in [0, window={self.window}] (after `window` passes the "
                              f"states are exact), got {self.lct.refresh_passes}")
        if "sequential" in self.methods and self.run.activation_checkpointing != "none":
            raise ConfigError("exact sequential training writes a growing key/value cache in each block's forward, "
                              "which activation checkpointing would write again when it recomputes the block; run "
                              "--methods lct alone or use --run.activation-checkpointing none")
        if not 0 <= self.lct.grad_passes <= self.lct.refresh_passes:
            raise ConfigError(f"lct.grad_passes must be in [0, lct.refresh_passes={self.lct.refresh_passes}] (the last "
                              f"refresh passes keep their graph), got {self.lct.grad_passes}")
        if self.lct.budget_mb <= 0 or self.lct.cpu_budget_mb < 0:
            raise ConfigError("lct.budget_mb must be > 0 and lct.cpu_budget_mb >= 0")
