"""Perplexities of the shallow, deep and routed predictions over validation windows.

One pass stores three numbers per scored token (log p_shallow(label), log p_deep(label), shallow
confidence); every perplexity below, at any threshold, follows from them without another
forward pass. Windows are the training ones (disjoint, every position scored), so training and
evaluation see the same conditions.

* routed (soft): p = w · p_s + (1 - w) · p_d with w = sigmoid((conf - τ) / T), the phase-2 loss.
* routed (hard): p_s where conf >= τ else p_d, the rule generation applies.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from legolm.errors import ConfigError
from legolm.model.lego import LegoLM, exits, routed_log_probs
from legolm.train.batches import Batch, rewind
from legolm.utils.finite import safe_exp


@dataclass
class TokenScores:
    """Per-token scores of a validation pass (flat fp32 CPU tensors of equal length)."""

    shallow_logp: Tensor
    deep_logp: Tensor
    conf: Tensor

    def __len__(self) -> int:
        return self.conf.numel()

    @staticmethod
    def _ppl(logp: Tensor) -> float:
        return safe_exp(-float(logp.double().mean()))

    def shallow_ppl(self) -> float:
        return self._ppl(self.shallow_logp)

    def deep_ppl(self) -> float:
        return self._ppl(self.deep_logp)

    def routed_ppl(self, threshold: float, temperature: float) -> float:
        """Perplexity of the soft-routed mixture (training's weights)."""
        return self._ppl(routed_log_probs(self.shallow_logp, self.deep_logp, self.conf, threshold, temperature))

    def hard_routed_ppl(self, threshold: float) -> float:
        """Perplexity under generation's rule: the shallow exit where conf >= τ, else the deep one."""
        return self._ppl(torch.where(exits(self.conf, threshold), self.shallow_logp, self.deep_logp))

    def quality_threshold(self, reference_ppl: float, tolerance: float, temperature: float, grid: int) -> float:
        """The lowest τ (most exits) whose soft-routed perplexity is within ``tolerance`` of ``reference_ppl``.

        Candidates are the confidences' quantiles at 0, 1/grid, 2/grid, ..., and 1.0 (no token exits on the
        hard rule); 1.0 when no candidate holds the bound.
        """
        bound = (1.0 + tolerance) * reference_ppl
        ordered = self.conf.flatten().sort().values
        picks = [ordered[min(i * len(ordered) // grid, len(ordered) - 1)] for i in range(grid)]
        candidates = sorted({*(float(t) for t in picks), 1.0})
        return min((t for t in candidates if self.routed_ppl(t, temperature) <= bound), default=1.0)

    def shallow_ratio(self, threshold: float) -> float:
        """Fraction of tokens that would exit at the shallow exit."""
        return float(exits(self.conf, threshold).float().mean())


@torch.no_grad()
def score_tokens(model: LegoLM, batches: Iterable[Batch], max_batches: int | None = None,
                 progress: bool = False) -> TokenScores:
    """Both exits over ``batches`` (``input_ids``/``labels`` (B, W)): per-token log-probs and confidence."""
    if not model.extended:
        raise ConfigError("scoring both exits needs an extended LEGO model; extend() it first")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: dict[str, list[Tensor]] = {"shallow_logp": [], "deep_logp": [], "conf": []}
    rewind(batches)
    for i, batch in enumerate(tqdm(batches, desc="evaluate", unit="batch", disable=not progress)):
        if max_batches is not None and i >= max_batches:
            break
        labels = batch["labels"].to(device)[..., None]
        out = model.forward_exits(batch["input_ids"].to(device))
        assert out.deep_logits is not None
        parts["shallow_logp"].append(out.shallow_logits.float().log_softmax(-1).gather(-1, labels).flatten().cpu())
        parts["deep_logp"].append(out.deep_logits.float().log_softmax(-1).gather(-1, labels).flatten().cpu())
        parts["conf"].append(out.conf.flatten().cpu())
    model.train(was_training)
    if not parts["conf"]:
        raise ConfigError("no validation batches to evaluate; give the corpus validation text")
    return TokenScores(**{k: torch.cat(v) for k, v in parts.items()})
