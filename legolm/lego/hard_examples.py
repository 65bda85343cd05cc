"""Hard examples: the lower layers' outputs of every window that holds a hard token, stored once.

Phase 2 trains the upper layers on these states and never runs the lower layers again. A window
is kept whole (not just its hard tokens), so the upper layers attend over the full context as
they do at generation; the loss reads only the hard positions::

    window   t0  t1  t2  t3  t4  t5  t6  t7          conf < τ ?  ·  H  ·  ·  H  H  ·  ·
    stored   h_s (W, C) of all 8, hard mask (W,), next-token labels (W,),
             shallow confidence (W,) and log p_s(label) (W,) for the routed loss
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from legolm.errors import ConfigError
from legolm.model.lego import LegoLM, check_threshold, confidence, routed_log_probs
from legolm.train.batches import Batch, resume_position, rewind
from legolm.utils.finite import safe_exp


@dataclass
class HardExamples:
    """Stored phase-2 data: N windows of W tokens (CPU tensors).

    Attributes:
        hidden: (N, W, C) outputs of the lower layers h_s (in the storage dtype).
        hard: (N, W) True where the shallow confidence is below the threshold.
        labels: (N, W) next-token targets.
        conf: (N, W) shallow confidence, fp32.
        shallow_logp: (N, W) log p_shallow(label), fp32.
        threshold: τ used to mark hard tokens.
        windows_seen: Windows scanned (kept or not).
        tokens_seen: Tokens scanned.
    """

    hidden: Tensor
    hard: Tensor
    labels: Tensor
    conf: Tensor
    shallow_logp: Tensor
    threshold: float
    windows_seen: int
    tokens_seen: int

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @property
    def n_hard(self) -> int:
        return int(self.hard.sum())

    @property
    def hard_ratio(self) -> float:
        """Hard tokens / tokens scanned."""
        return self.n_hard / max(self.tokens_seen, 1)

    def nbytes(self) -> int:
        tensors = (self.hidden, self.hard, self.labels, self.conf, self.shallow_logp)
        return sum(t.numel() * t.element_size() for t in tensors)

    def summary(self) -> str:
        return (f"{len(self):,} of {self.windows_seen:,} windows hold hard tokens; {self.n_hard:,} hard tokens "
                f"({100 * self.hard_ratio:.1f}% of {self.tokens_seen:,}); {self.nbytes() / 2**20:.1f} MiB stored")


@torch.no_grad()
def collect_hard_examples(model: LegoLM, batches: Iterable[Batch], threshold: float, *,
                          store_dtype: torch.dtype = torch.float32, max_batches: int | None = None,
                          progress: bool = False) -> HardExamples:
    """Run the lower layers and the shallow exit once over ``batches``; keep windows with hard tokens.

    Args:
        model: The LEGO model (its lower layers and shallow exit are frozen from here on).
        batches: ``input_ids`` and ``labels`` (B, W), e.g. `WindowBatches`.
        threshold: τ: tokens with shallow confidence < τ are hard.
        store_dtype: dtype of the stored hidden states (bf16/fp16 halve the memory).
        max_batches: Scan only the first batches.
        progress: Show a tqdm bar.

    Raises:
        ConfigError: τ outside [0, 1], or no hard token at all.
    """
    check_threshold(threshold)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: dict[str, list[Tensor]] = {k: [] for k in ("hidden", "hard", "labels", "conf", "shallow_logp")}
    windows = tokens = 0
    rewind(batches)
    for i, batch in enumerate(tqdm(batches, desc="hard examples", unit="batch", disable=not progress)):
        if max_batches is not None and i >= max_batches:
            break
        idx, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        h_s = model.lower(idx)  # (B, W, C)
        logits = model.shallow_head(h_s)  # (B, W, V)
        logp, conf = logits.float().log_softmax(-1), confidence(logits)  # the one confidence everywhere
        hard = conf < threshold
        keep = hard.any(dim=1)  # (B,)
        windows, tokens = windows + idx.shape[0], tokens + idx.numel()
        for key, value in (("hidden", h_s.to(store_dtype)), ("hard", hard), ("labels", labels), ("conf", conf),
                           ("shallow_logp", logp.gather(-1, labels[..., None])[..., 0])):
            parts[key].append(value[keep].cpu())
    model.train(was_training)
    stored = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
    if not stored["hidden"].numel():
        raise ConfigError(f"no token has shallow confidence below the threshold {threshold:.4g}: no hard examples "
                          "to train on; raise lego.target_ratio, check lego.threshold, or (lego.calibrate: quality, "
                          "where every token exits within tolerance) lower lego.split_tolerance")
    return HardExamples(threshold=threshold, windows_seen=windows, tokens_seen=tokens, **stored)


class HardExampleBatches:
    """A `BatchSource` over `HardExamples` for `fit` (seeded shuffle, resumable position, sharded by rank).

    Ranks take disjoint interleaved slices of the order, each the same length, as `WindowBatches` does.

    Each batch: ``hidden`` (B, W, C), ``hard`` (B, W), ``labels`` (B, W), ``conf`` (B, W),
    ``shallow_logp`` (B, W), ``sample_ids`` (B,) and ``batch_id`` ().
    """

    def __init__(self, examples: HardExamples, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.per_rank = len(examples) // world_size
        if self.per_rank < (batch_size if drop_last else 1):
            raise ConfigError(f"{len(examples)} hard-example windows are fewer than one batch of {batch_size} on "
                              f"each of {world_size} rank(s); lower the batch size or collect more windows")
        self.examples, self.batch_size, self.shuffle, self.seed, self.drop_last = (
            examples, batch_size, shuffle, seed, drop_last)
        self.rank, self.world_size = rank, world_size
        self.epoch = self.position = 0

    def __len__(self) -> int:
        n = self.per_rank / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "windows": self.position * self.batch_size * self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = resume_position(int(state["windows"]), self.batch_size, self.world_size)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.examples)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        order = order[: self.per_rank * self.world_size][self.rank :: self.world_size]
        ex = self.examples
        for b in range(self.position, len(self)):
            rows = torch.from_numpy(order[b * self.batch_size : (b + 1) * self.batch_size].astype(np.int64))
            self.position = b + 1
            yield {"hidden": ex.hidden[rows], "hard": ex.hard[rows], "labels": ex.labels[rows],
                   "conf": ex.conf[rows], "shallow_logp": ex.shallow_logp[rows], "sample_ids": rows,
                   "batch_id": torch.tensor(b)}


def create_hard_example_loader(examples: HardExamples, batch_size: int, shuffle: bool = True, seed: int = 0,
                               drop_last: bool = False, rank: int = 0, world_size: int = 1) -> HardExampleBatches:
    """Batches of stored hard examples (see `HardExampleBatches`)."""
    return HardExampleBatches(examples, batch_size, shuffle, seed, drop_last, rank, world_size)


@torch.no_grad()
def evaluate_on_hard_examples(model: LegoLM, examples: HardExamples, batch_size: int = 16) -> dict[str, float]:
    """Shallow, deep and routed perplexity on the hard tokens of stored examples (upper layers only).

    Returns:
        ``hard_tokens`` and ``{shallow,deep,routed}_{nll,ppl}``; routed uses the model's τ and
        temperature, the same continuous weights as the phase-2 loss.
    """
    if not model.extended:
        raise ConfigError("evaluate_on_hard_examples needs the deep exit; extend() the model first")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.blocks[model.split].parameters()).dtype
    sums = {"shallow": 0.0, "deep": 0.0, "routed": 0.0}
    n = 0
    for batch in create_hard_example_loader(examples, batch_size, shuffle=False):
        mask = batch["hard"].to(device)
        h_top = model.upper_hidden(batch["hidden"].to(device, dtype))  # (B, W, C)
        lp_d = model.project(h_top[mask]).float().log_softmax(-1)  # (n, V)
        lp_d = lp_d.gather(-1, batch["labels"].to(device)[mask][:, None])[:, 0]
        lp_s, conf = batch["shallow_logp"].to(device)[mask], batch["conf"].to(device)[mask]
        lp_r = routed_log_probs(lp_s, lp_d, conf, model.threshold, model.meta.routing_temperature)
        for key, lp in (("shallow", lp_s), ("deep", lp_d), ("routed", lp_r)):
            sums[key] -= float(lp.double().sum())
        n += int(mask.sum())
    model.train(was_training)
    out: dict[str, float] = {"hard_tokens": n}
    for key, total in sums.items():
        out[f"{key}_nll"] = total / n
        out[f"{key}_ppl"] = safe_exp(total / n)
    return out
