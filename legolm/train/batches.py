"""Batch sources: what `fit` iterates over.

A batch source yields dicts of tensors (at least ``input_ids`` and ``labels``, plus stable ids),
knows how many batches make an epoch, and can save and restore its position so that a resumed
run sees exactly the batches an uninterrupted one would. `WindowBatches` is the one for
pretraining on a token stream::

    ids   t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 t10 t11 | t12 ...     window W = 4
    x     t0 t1 t2 t3   t4 t5 t6 t7   t8 t9 t10 t11
    y     t1 t2 t3 t4   t5 t6 t7 t8   t9 t10 t11 t12               (x shifted by one, no padding)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from legolm.errors import ConfigError

Batch = dict[str, Tensor]
HASH_TOKENS = 1 << 20  # tokens hashed at a time by `token_fingerprint`


@runtime_checkable
class BatchSource(Protocol):
    """What `fit` needs from its data: batches, an epoch length, and a resumable position."""

    def __iter__(self) -> Iterator[Batch]:
        """Batches of the current epoch, from the saved position on."""
        ...

    def __len__(self) -> int:
        """Batches per epoch."""
        ...

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (its order) from its first batch."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The position (epoch, and how far into it) as JSON-serialisable values."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by `state_dict`."""
        ...


def resume_position(windows: int, batch_size: int, world_size: int) -> int:
    """Batches per rank that cover ``windows`` consumed by all ranks; a `ConfigError` when they cannot."""
    per_step = batch_size * world_size
    if windows % per_step:
        raise ConfigError(f"cannot resume: the checkpoint stopped after {windows:,} windows of its epoch, not a "
                          f"multiple of batch_size x ranks = {batch_size} x {world_size}; resume with a batch_size "
                          "and rank count whose product divides it (e.g. those of the saved run)")
    return windows // per_step


def token_fingerprint(ids: np.ndarray) -> str:
    """sha256 of a token stream's values (the same for any integer dtype), read in slices."""
    h = hashlib.sha256()
    for start in range(0, len(ids), HASH_TOKENS):
        h.update(np.asarray(ids[start:start + HASH_TOKENS], dtype=np.int64).tobytes())
    return h.hexdigest()


class WindowBatches:
    """Fixed-length windows of a 1-D token array, batched, optionally shuffled, sharded by rank.

    Window ``i`` is ``ids[i·W : i·W + W + 1]``: inputs are its first W tokens, labels its last W.
    Windows do not overlap and nothing is padded; the few tokens after the last full window are
    not used. With ``shuffle``, the window order is a permutation drawn from ``seed`` and the epoch
    (``reshuffle=False`` keeps the epoch-0 order every epoch, so a ``batch_id`` names the same
    windows in every epoch, as per-batch caches need). Ranks take disjoint interleaved slices of
    the order, each the same length (up to ``world_size - 1`` windows of an epoch go unused), so
    batch b of every rank together is batch b of one process with a ``world_size`` times larger
    batch::

        order      w0 w1 w2 w3 w4 w5 w6 w7 …      world_size 2, batch_size 2
        rank 0     w0    w2  | w4    w6  | …       batch 0 of both ranks = w0..w3
        rank 1        w1    w3 |   w5    w7 | …

    The saved position counts the windows consumed by all ranks together, so a run resumes on
    any number of ranks whose ``batch_size × world_size`` divides it. It also records the window
    length and a fingerprint of the token stream: resuming on other data (another source, tokenizer,
    split or window) is refused, since the saved position would name other windows.

    Each batch: ``input_ids`` (B, W) and ``labels`` (B, W) int64, ``sample_ids`` (B,) window
    indices, ``batch_id`` () position of the batch in the epoch.

    Args:
        ids: Token ids, documents joined by EOS (a numpy memmap is read lazily).
        window: Tokens per sequence W.
        batch_size: Sequences per batch B.
        shuffle: Visit windows in a seeded random order.
        seed: Seed of the order.
        drop_last: Drop the last, smaller batch of an epoch.
        rank: This process's shard.
        world_size: Number of shards.
        reshuffle: Draw a new order each epoch (only with ``shuffle``).
    """

    def __init__(self, ids: np.ndarray, window: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1, reshuffle: bool = True) -> None:
        if window < 1 or batch_size < 1:
            raise ConfigError(f"window and batch_size must be >= 1, got window={window}, batch_size={batch_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        n_windows = (len(ids) - 1) // window
        per_rank = n_windows // world_size
        if per_rank < 1 or (drop_last and per_rank < batch_size):
            need = (batch_size if drop_last else 1) * world_size * window + 1
            raise ConfigError(f"{len(ids):,} tokens are too few for batches of {batch_size} x {window}-token windows "
                              f"on {world_size} rank(s) (need >= {need:,}); use more text or a smaller window/batch")
        self.ids, self.window, self.batch_size = ids, window, batch_size
        self.shuffle, self.seed, self.drop_last, self.reshuffle = shuffle, seed, drop_last, reshuffle
        self.rank, self.world_size = rank, world_size
        self.n_windows, self.per_rank = n_windows, per_rank
        self.epoch, self.position = 0, 0
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """`token_fingerprint` of the token stream (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = token_fingerprint(self.ids)
        return self._fingerprint

    def __len__(self) -> int:
        full, rest = divmod(self.per_rank, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    @property
    def tokens_per_epoch(self) -> int:
        """Label tokens this rank sees in one epoch."""
        return min(len(self) * self.batch_size, self.per_rank) * self.window

    def order(self, epoch: int) -> np.ndarray:
        """Window indices of this rank for ``epoch``, in visiting order."""
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch if self.reshuffle else 0])
            order = rng.permutation(self.n_windows)
        else:
            order = np.arange(self.n_windows)
        return order[: self.per_rank * self.world_size][self.rank :: self.world_size]

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "windows": self.position * self.batch_size * self.world_size,
                "window": self.window, "tokens": len(self.ids), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_same_data(state)
        self.epoch, self.position = int(state["epoch"]), resume_position(int(state["windows"]), self.batch_size,
                                                                         self.world_size)

    def check_same_data(self, state: dict[str, Any]) -> None:
        """Raise `ConfigError` unless ``state`` (from `state_dict`) was saved on these tokens and windows."""
        if "window" in state and int(state["window"]) != self.window:
            raise ConfigError(f"cannot resume: the run trained on {state['window']}-token windows, this one asks for "
                              f"{self.window}; resume with --window {state['window']} (or start a new run)")
        if "tokens" in state and int(state["tokens"]) != len(self.ids):
            raise ConfigError(f"cannot resume: the run trained on {int(state['tokens']):,} tokens, this data has "
                              f"{len(self.ids):,} (another source, tokenizer or split?); resume with the run's own "
                              "data settings (its config.yaml) or start a new run")
        if "fingerprint" in state and state["fingerprint"] != self.fingerprint:
            raise ConfigError("cannot resume: the training tokens differ from the run's (another source, tokenizer "
                              "or split?); resume with the run's own data settings (its config.yaml) or start a new "
                              "run")

    def __iter__(self) -> Iterator[Batch]:
        order = self.order(self.epoch)
        offsets = np.arange(self.window + 1)
        for b in range(self.position, len(self)):
            windows = order[b * self.batch_size : (b + 1) * self.batch_size]
            rows = np.asarray(self.ids[(windows * self.window)[:, None] + offsets], dtype=np.int64)  # (B, W+1)
            rows_t = torch.from_numpy(rows)
            self.position = b + 1  # consumed once yielded: a checkpoint taken after this step skips it
            yield {"input_ids": rows_t[:, :-1], "labels": rows_t[:, 1:],
                   "sample_ids": torch.from_numpy(windows.astype(np.int64)), "batch_id": torch.tensor(b)}


def rewind(batches: object) -> None:
    """Start a batch source (`WindowBatches`, ...) from its first batch: a previous pass may have stopped early."""
    set_epoch = getattr(batches, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(0)
