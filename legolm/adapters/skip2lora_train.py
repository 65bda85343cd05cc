"""Skip2-LoRA on the one training loop: the loss (reading the Skip-Cache), the cache's set-up and flushing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from legolm.adapters.skip2lora import AUTO_LOW_RANK_RATIO, HeadGrad, Skip2LoRAModel
from legolm.adapters.skip_cache import (
    DTYPES,
    SkipCache,
    SkipCacheConfig,
    cache_nbytes,
    choose_storage,
    fingerprint,
)
from legolm.data.sources import cache_root
from legolm.errors import ConfigError
from legolm.train.batches import Batch
from legolm.train.config import AUTO_LOSS_CHUNK
from legolm.train.fit import Callback, FitState, LossOutput
from legolm.train.head_loss import IGNORE_INDEX, LossKernel, head_cross_entropy
from legolm.train.low_rank_head import low_rank_head_cross_entropy


class Skip2LoRALoss:
    """Next-token cross-entropy of a `Skip2LoRAModel`, with the backbone skipped for cached windows.

    In training, a window's features come from the cache (stored at its first visit, so every
    epoch sees exactly the same features); in evaluation (``model.training`` False) the backbone
    runs, as at inference.

    Args:
        cache: The Skip-Cache, or None to run the backbone every step.
        chunk_tokens: Score this many positions at a time (`head_cross_entropy`; 0 = all at once). None: the
            way measured fastest for cached epochs (H200, 2026-11-30; docs/results/benchmarks.md, "The
            softmax step on real logits"): the low-rank way scores a whole batch at once (0.083 s an epoch on
            GPT-2 against 0.104 in chunks of 8,192); the chain scores `AUTO_LOSS_CHUNK` at a time where
            ``kernel`` is the Triton step (0.097 s against 0.113 for the whole-logits loss), else all at once.
        kernel: The chunks' softmax step: torch ops or the Triton kernel.
        vocab_chunk: The head weight's gradient by vocabulary chunks (`head_cross_entropy`; 0 = accumulated).
        head_grad: How the adapters' gradients go through the head (the same gradients either way):
            ``chain``, through the head-input gradient dx = G W (a full-size GEMM); ``low-rank``, through the
            head projected onto the adapters' R = K·r directions (`legolm.train.low_rank_head`: two products of
            rank R instead; needs a frozen bias-free head, no head LoRA); ``auto``, low-rank where it is clearly
            less work (4R <= n_embd: the two narrow products at most half the FLOPs of dx, which they run at
            a lower efficiency; a frozen head), else chain.
    """

    def __init__(self, cache: SkipCache | None, chunk_tokens: int | None = 0, kernel: LossKernel = "torch",
                 vocab_chunk: int = 0, head_grad: HeadGrad = "auto") -> None:
        self.cache, self.chunk_tokens, self.kernel, self.vocab_chunk = cache, chunk_tokens, kernel, vocab_chunk
        self.head_grad = head_grad

    def __call__(self, model: nn.Module, batch: Batch) -> LossOutput:
        assert isinstance(model, Skip2LoRAModel)
        labels = batch["labels"]
        loss = self.head_loss(model, self.features(model, batch), labels)
        return loss, (labels != IGNORE_INDEX).sum(), {}

    def head_loss(self, model: Skip2LoRAModel, feats: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of the head on features (B, K+1, T, C) (`Skip2LoRAModel.features`)."""
        if self.low_rank(model):
            h, z, b = model.head_parts(feats)
            chunk = 0 if self.chunk_tokens is None else self.chunk_tokens
            return low_rank_head_cross_entropy(model.base.lm_head.weight, h, z, b, labels, chunk, self.kernel)
        auto = AUTO_LOSS_CHUNK if self.kernel == "triton" else 0
        chunk = auto if self.chunk_tokens is None else self.chunk_tokens
        return head_cross_entropy(model.base.lm_head, model.head_input(feats), labels, chunk, self.kernel,
                                  self.vocab_chunk)

    def graph_safe(self, batch: Batch) -> bool:
        """Whether a training step may be captured in a CUDA graph (`legolm.train.step_graph`): without a cache
        (the backbone runs every step), or once the cache holds every window on the GPU (each step then only
        gathers its rows there). A cache still filling, or kept in host memory, does host-side work per step."""
        cache = self.cache
        return cache is None or (cache.data.device.type == "cuda" and bool(cache.filled.all()))

    def low_rank(self, model: Skip2LoRAModel) -> bool:
        """Whether the head's gradient goes the low-rank way for ``model`` (``head_grad``)."""
        if self.head_grad == "chain":
            return False
        if self.head_grad == "low-rank" and not model.frozen_linear_head():
            raise ConfigError("head_grad low-rank needs a frozen bias-free LM head; with skip2lora.lora_head the "
                              "head trains: use head_grad auto or chain")
        small = AUTO_LOW_RANK_RATIO * model.rank <= model.config.n_embd
        return model.frozen_linear_head() and (self.head_grad == "low-rank" or small)

    @torch.compiler.disable
    def features(self, model: Skip2LoRAModel, batch: Batch) -> Tensor:
        """The backbone's features (B, K+1, T, C), from the cache where stored.

        Runs outside `torch.compile` (host-side cache bookkeeping): the compiled step is the adapters,
        the head and the loss, one graph for the filling first epoch and the cached later ones alike.
        """
        ids = batch["input_ids"]
        if self.cache is None or not model.training:
            return model.features(ids)
        sids = batch["sample_ids"]
        new = self.cache.missing(sids)
        if bool(new.any()):
            self.cache.put(sids[new], model.features(ids[new.to(ids.device)]))
        return self.cache.get(sids, ids.device)


class SkipCacheFlush(Callback):
    """Makes a disk Skip-Cache durable at every epoch end and at the end of training."""

    def __init__(self, cache: SkipCache) -> None:
        self.cache = cache

    def on_epoch_end(self, state: FitState, model: nn.Module) -> None:
        self.cache.flush()

    def on_train_end(self, state: FitState, model: nn.Module) -> None:
        self.cache.flush()


def build_skip_cache(model: Skip2LoRAModel, tokens: np.ndarray, n_windows: int, window: int,
                     config: SkipCacheConfig, device: torch.device, subdir: str = "") -> SkipCache:
    """Size the cache, print the estimate, choose its storage by budget, and open it (reusing a valid disk one).

    A disk cache lives in ``config.dir``, by default ``<LEGOLM_CACHE>/skip_cache/<fingerprint>``, so
    any later run on the same backbone, data and settings (a resumed one included) finds it;
    ``subdir`` keeps the disk caches of the ranks of a distributed run apart.
    """
    config.validate()
    dtype = DTYPES[config.dtype]
    n_features, width = len(model.indices) + 1, model.base.config.n_embd
    nbytes = cache_nbytes(n_windows, n_features, window, width, dtype)
    print(f"Skip-Cache: {n_windows:,} windows x {n_features} features x {window} tokens x {width} {config.dtype} "
          f"= {nbytes / 2**20:,.1f} MiB")
    key = fingerprint(model.base, tokens[: n_windows * window + 1], window, model.indices, dtype,
                      model.skip_config.tap_norm)
    disk_dir = (Path(config.dir) if config.dir else cache_root() / "skip_cache" / key[:24]) / subdir
    storage = choose_storage(config, nbytes, device, disk_dir)
    cache = SkipCache(n_windows, n_features, window, width, dtype, storage, device, key, disk_dir)
    where = f"disk ({disk_dir})" if storage == "disk" else storage
    state = f", reusing {int(cache.filled.sum()):,} stored windows" if cache.reused else ""
    print(f"Skip-Cache on {where}{state}")
    return cache
