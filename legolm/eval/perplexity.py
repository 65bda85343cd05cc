"""Perplexity of a causal LM over a token stream, with sliding or disjoint windows.

Follows Hugging Face's guide "Perplexity of fixed-length models": windows of ``max_length``
tokens start every ``stride`` tokens; in each window only the tokens after the previous window's
end are scored, so each scored token sees ``max_length - stride`` tokens of context or more::

    ids      t0 t1 t2 t3 t4 t5 t6 t7 t8 t9        max_length=4, stride=2
    window 0 [c  s  s  s]                        c: context only (here: nothing before t0)
    window 1       [c  c  s  s]                  s: scored
    window 2             [c  c  s  s]
    window 3                   [c  c  s  s]

Every token but the first is scored exactly once (the first has no context). With
``stride == max_length`` (`disjoint_ppl`) each window's first token has no context and is not
scored either, as in the guide's code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from legolm.core.config import ModelConfig
from legolm.errors import ConfigError
from legolm.utils.finite import safe_exp


class LanguageModel(Protocol):
    """What perplexity needs of a model: its config (context length) and ``model(idx) -> logits (B, T, V)``."""

    config: ModelConfig

    def __call__(self, idx: Tensor) -> Tensor: ...



@dataclass
class PPLResult:
    """Summed negative log-likelihood (nats) of the scored tokens, and what follows from it.

    Attributes:
        nll_sum: Sum of -log p(token | context) over the scored tokens.
        n_tokens: Tokens scored.
        max_length: Window length.
        stride: Window step.
        n_bytes: UTF-8 bytes of the text, for bits per byte (None: unknown).
        n_words: Whitespace-separated words of the text, for word perplexity (None: unknown).
    """

    nll_sum: float
    n_tokens: int
    max_length: int
    stride: int
    n_bytes: int | None = None
    n_words: int | None = None

    @property
    def nll(self) -> float:
        """Mean NLL per scored token (nats)."""
        return self.nll_sum / self.n_tokens

    @property
    def ppl(self) -> float:
        return safe_exp(self.nll)

    @property
    def bits_per_byte(self) -> float | None:
        """Total NLL in bits divided by the text's bytes (tokenizer-independent)."""
        return self.nll_sum / (math.log(2) * self.n_bytes) if self.n_bytes else None

    @property
    def word_ppl(self) -> float | None:
        """exp(total NLL / words): perplexity per whitespace word (tokenizer-independent)."""
        return safe_exp(self.nll_sum / self.n_words) if self.n_words else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "nll": self.nll, "ppl": self.ppl, "bits_per_byte": self.bits_per_byte,
                "word_ppl": self.word_ppl}


def windows(n: int, max_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """``(begin, end, first)`` per window: input ``ids[begin:end]``, scored targets ``first..end-1``."""
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        yield begin, end, max(prev_end, begin + 1)
        prev_end = end
        if end == n:
            break


@torch.inference_mode()
def sliding_window_ppl(model: LanguageModel, ids: np.ndarray | Tensor, max_length: int, stride: int,
                       batch_size: int = 8, device: str | torch.device = "cpu", *, n_bytes: int | None = None,
                       n_words: int | None = None, progress: bool = True) -> PPLResult:
    """Perplexity of ``ids`` (a 1-D token stream) with windows of ``max_length`` moving by ``stride``.

    Args:
        model: Any `LanguageModel` (a `TransformerLM`, a Skip2-LoRA model, ...); ``model(idx)`` gives logits (B, T, V).
        ids: Token ids, e.g. a split of a `TokenizedCorpus` (documents joined by EOS).
        max_length: Window length (<= the model's block_size).
        stride: Window step, 1..max_length.
        batch_size: Windows per forward pass.
        device: Where the windows go (the model must already be there).
        n_bytes: Bytes of the text, for bits per byte.
        n_words: Words of the text, for word perplexity.
        progress: Show a tqdm bar (tokens scored).

    Raises:
        ConfigError: Bad window settings, or fewer than 2 tokens.
    """
    _check(model, len(ids), max_length, stride, batch_size)
    stream = torch.as_tensor(np.asarray(ids, dtype=np.int64) if isinstance(ids, np.ndarray) else ids.long())
    spans = list(windows(len(stream), max_length, stride))
    nll_sum, n_tokens = 0.0, 0
    with tqdm(total=len(stream) - 1, desc="perplexity", unit="tok", disable=not progress) as bar:
        for batch in _batches(spans, batch_size):
            x = torch.stack([stream[b:e] for b, e, _ in batch]).to(device)  # (B, T)
            losses = _token_nll(model, x)  # (B, T-1): loss of target j+1
            for row, (b, e, first) in enumerate(batch):
                nll_sum += float(losses[row, first - b - 1:].double().sum())
                n_tokens += e - first
                bar.update(e - first)
            bar.set_postfix(ppl=f"{safe_exp(nll_sum / max(n_tokens, 1)):.2f}")
    return PPLResult(nll_sum, n_tokens, max_length, stride, n_bytes, n_words)


def disjoint_ppl(model: LanguageModel, ids: np.ndarray | Tensor, max_length: int, batch_size: int = 8,
                 device: str | torch.device = "cpu", **kwargs: Any) -> PPLResult:
    """`sliding_window_ppl` with ``stride == max_length``: non-overlapping windows."""
    return sliding_window_ppl(model, ids, max_length, max_length, batch_size, device, **kwargs)


def _token_nll(model: LanguageModel, x: Tensor) -> Tensor:
    """-log p(x[:, j+1] | x[:, :j+1]) for every j: (B, T) -> (B, T-1), float32."""
    logits = model(x)[:, :-1].float()  # (B, T-1, V)
    return F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")


def _batches(spans: list[tuple[int, int, int]], batch_size: int) -> Iterator[list[tuple[int, int, int]]]:
    """Consecutive windows of equal length, ``batch_size`` at a time (the short last window alone)."""
    batch: list[tuple[int, int, int]] = []
    for span in spans:
        if batch and (len(batch) == batch_size or span[1] - span[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(span)
    if batch:
        yield batch


def _check(model: LanguageModel, n: int, max_length: int, stride: int, batch_size: int) -> None:
    check_windows(model.config.block_size, max_length, stride, batch_size)
    if n < 2:
        raise ConfigError(f"perplexity needs at least 2 tokens, got {n}")


def check_windows(block: int, max_length: int, stride: int, batch_size: int) -> None:
    """Raise `ConfigError` for window settings a model of context ``block`` cannot score."""
    if not 2 <= max_length <= block:
        raise ConfigError(f"max_length {max_length} must be in 2..{block} (the model's block_size)")
    if not 1 <= stride <= max_length:
        raise ConfigError(f"stride {stride} must be in 1..max_length ({max_length}); a larger stride skips tokens")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
