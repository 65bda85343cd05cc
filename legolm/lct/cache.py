"""The lagged state cache of Lagged Cache Training.

For every training window it keeps the states s_t (B, T, C) that the model produced the last time
it saw that window, detached. The next visit feeds them as the context of positions t+1, so the
whole window runs in one parallel forward instead of T sequential steps; the states are only one
visit (one epoch) old. Entries are keyed by the window's stable sample id, and the window's tokens
are stored beside its states so that feeding one window's states to another is caught, not
silently trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from legolm.errors import ConfigError


@dataclass
class LCTCacheConfig:
    """Where the lagged states live, and how fresh they are kept.

    Attributes:
        device: auto (the training device when the budget allows, else CPU RAM), cuda or cpu.
        budget_mb: Largest cache allowed on the training device, in MiB (CPU RAM when it does not fit).
        cpu_budget_mb: Largest cache allowed in CPU RAM, in MiB.
        dtype: Storage dtype of the states.
        refresh_passes: No-grad parallel passes that bring a window's cached states up to the current
            weights before its training forward (each pass feeds the states it computed to the next: a
            Jacobi iteration towards the exact recurrence, whose first p positions are exact after p
            passes). 0 trains on the states of the last visit, an epoch old (the method as published);
            each pass costs one forward of the batch without gradients.
        grad_passes: Of the refresh passes, how many of the last ones keep their graph, so the gradient also
            flows through that many steps of the recurrence (truncated backpropagation through time over
            `grad_passes` steps; with grad_passes = refresh_passes = window the gradient is exact BPTT's). Each
            costs a forward and a backward of the batch.
    """

    device: Literal["auto", "cuda", "cpu"] = "auto"
    budget_mb: float = 2048.0
    cpu_budget_mb: float = 8192.0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    refresh_passes: int = 0
    grad_passes: int = 0


def cache_bytes(n_samples: int, window: int, width: int, dtype: torch.dtype) -> int:
    """Bytes of the states plus the stored tokens (int32) of ``n_samples`` windows."""
    return n_samples * window * (width * dtype.itemsize + 4)


def choose_device(config: LCTCacheConfig, nbytes: int, train_device: torch.device) -> torch.device:
    """The training device if the budget allows (and it is asked for), else CPU; refuse if neither fits."""
    mib = nbytes / 2**20
    on_train = config.device in ("auto", "cuda") and mib <= config.budget_mb
    if config.device == "cuda" and not on_train:
        raise ConfigError(f"the LCT cache needs {mib:,.1f} MiB but budget_mb is {config.budget_mb:,.1f}; "
                          "raise --lct.budget-mb, use --lct.device cpu, or train on fewer windows")
    if on_train:
        return train_device
    if mib > config.cpu_budget_mb:
        raise ConfigError(f"the LCT cache needs {mib:,.1f} MiB, more than budget_mb={config.budget_mb:,.1f} and "
                          f"cpu_budget_mb={config.cpu_budget_mb:,.1f}; raise a budget, store bfloat16 "
                          "(--lct.dtype bfloat16) or train on fewer windows")
    return torch.device("cpu")


class LaggedStateCache:
    """States of each training window from its previous visit.

    Args:
        n_samples: Windows in the training set (sample ids are 0..n_samples-1).
        window: Tokens per window T.
        width: State width C.
        dtype: Storage dtype.
        device: Storage device (see `choose_device`).
    """

    def __init__(self, n_samples: int, window: int, width: int, dtype: torch.dtype, device: torch.device) -> None:
        self.window, self.width = window, width
        self.states = torch.zeros(n_samples, window, width, dtype=dtype, device=device)
        self.tokens = torch.full((n_samples, window), -1, dtype=torch.int32, device=device)
        self.filled = torch.zeros(n_samples, dtype=torch.bool, device=device)

    @property
    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size() + self.tokens.numel() * 4

    def check(self, sample_ids: Tensor, input_ids: Tensor) -> None:
        """Refuse a batch whose shape or sample ids do not fit this cache."""
        if input_ids.shape[1] != self.window:
            raise ConfigError(f"LCT cache holds {self.window}-token windows but the batch has "
                              f"{input_ids.shape[1]}; rebuild the cache for this window length")
        if int(sample_ids.min()) < 0 or int(sample_ids.max()) >= len(self.states):
            raise ConfigError(f"sample id {int(sample_ids.max())} is outside the LCT cache of {len(self.states)} "
                              "windows; the cache was built for another data set")

    def missing(self, sample_ids: Tensor) -> Tensor:
        """(B,) True where a window has no cached states yet."""
        return ~self.filled[sample_ids.to(self.filled.device)]

    def get(self, sample_ids: Tensor, input_ids: Tensor, device: torch.device) -> Tensor:
        """Cached states (B, T, C) of these windows; the stored tokens must match ``input_ids``."""
        ids = sample_ids.to(self.states.device)
        stored = self.tokens[ids].to(input_ids.device)
        if not torch.equal(stored, input_ids.to(stored.dtype)):
            raise ConfigError("LCT cache entry does not belong to this window (its tokens differ): batch "
                              "identity changed between epochs; keep a fixed window order per sample id")
        return self.states[ids].to(device, non_blocking=True)

    def put(self, sample_ids: Tensor, input_ids: Tensor, states: Tensor) -> None:
        """Store the (detached) states (B, T, C) of these windows."""
        ids = sample_ids.to(self.states.device)
        self.states[ids] = states.detach().to(self.states.device, self.states.dtype)
        self.tokens[ids] = input_ids.to(self.tokens.device, torch.int32)
        self.filled[ids] = True
