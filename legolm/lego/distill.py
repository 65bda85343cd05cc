"""Phase 3 of LEGO (optional): exit distillation, the shallow exit trained towards the deep model.

Phase 1 trains the shallow exit on the ground truth; phase 2 then changes the deep model above it.
As the drafter of self-speculative decoding (LayerSkip, Elhoushi et al. 2024, arXiv 2404.16710) the
shallow exit is only useful where its greedy token equals the deep model's, so phase 3 trains the
exit's own parameters (norm, head, lens; never a head it shares with the deep model) on the deep
model's distribution, everything else frozen::

    h_s = lower(ids)                      (no grad, once)
    p_d = softmax(upper(h_s))             (no grad: the frozen verifier)
    p_s = softmax(shallow_exit(h_s))      (the only trained part)
    loss = α · KL(p_d ‖ p_s) + (1 - α) · CE(labels, p_s)      (token mean)

``lego.distill_into`` picks the trained exit. ``draft`` (the default) trains a separate draft exit
(`LegoLM.add_draft_exit`, a copy of the shallow exit's own parameters at the same split) and leaves
the shallow exit, τ and everything else as they were: threshold early exit keeps its exit, and
self-speculative decoding drafts with the distilled one, the draft heads kept apart from the model's
own exits as in Medusa and EAGLE. ``exit`` distils the shallow exit itself (τ is then re-calibrated).

This is draft-head distillation as in Kangaroo (Liu et al. 2024, arXiv 2404.18911: a shallow
sub-network plus an adapter trained to match the full model) and the draft heads of Medusa (Cai et
al. 2024, arXiv 2401.10774) and EAGLE (Li et al. 2024, arXiv 2401.15077), trained on the target
model's own outputs. The trade-off of ``exit``: threshold early exit keeps the shallow token where it
is confident, and that token now follows the deep model rather than the truth.

`exit_agreement` measures what it is for: the fraction of validation tokens where the trained exit's
argmax equals the deep argmax (the acceptance rate of greedy drafts, token by token).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from legolm.errors import ConfigError
from legolm.model.lego import ExitName, LegoLM
from legolm.train.batches import Batch, rewind
from legolm.train.fit import LossOutput
from legolm.train.head_loss import IGNORE_INDEX
from legolm.utils.finite import safe_exp


def distill_loss(shallow_logits: Tensor, deep_logits: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """α · KL(p_deep ‖ p_shallow) + (1 - α) · CE(labels, p_shallow), the mean over the scored tokens.

    Args:
        shallow_logits: (..., V), the trained exit's logits.
        deep_logits: (..., V), the target's (no gradient flows into them).
        labels: (...) next-token ids; ``IGNORE_INDEX`` positions are not scored.
        alpha: Weight of the KL term, in [0, 1].
    """
    mask = labels != IGNORE_INDEX
    logp_s = shallow_logits[mask].float().log_softmax(-1)  # (n, V)
    logp_d = deep_logits[mask].detach().float().log_softmax(-1)
    kl = F.kl_div(logp_s, logp_d, reduction="none", log_target=True).sum(-1)  # (n,) Σ p_d (log p_d - log p_s)
    ce = -logp_s.gather(-1, labels[mask][:, None])[:, 0]  # (n,)
    return (alpha * kl + (1.0 - alpha) * ce).mean()


def _lego(module: nn.Module) -> LegoLM:
    model = module if isinstance(module, LegoLM) else getattr(module, "module", module)  # DDP wraps it
    assert isinstance(model, LegoLM)
    return model


class DistillLoss:
    """Phase-3 loss of a `LegoLM` on windows (``input_ids``/``labels``): `distill_loss` of the trained exit
    against the deep exit.

    The lower layers run once; the upper layers and deep exit run without gradient on their output.

    Args:
        alpha: Weight of KL(p_deep ‖ p_shallow) against the label cross-entropy, in [0, 1].
        target: The trained exit: the shallow exit or the draft exit.
    """

    def __init__(self, alpha: float = 1.0, target: ExitName = "shallow_exit") -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"lego.distill_weight must be in [0, 1], got {alpha}")
        self.alpha, self.target = alpha, target

    def __call__(self, module: nn.Module, batch: Batch) -> LossOutput:
        model = _lego(module)
        labels = batch["labels"]  # (B, T)
        with torch.no_grad():
            h_s = model.lower(batch["input_ids"])  # (B, T, C)
            deep = model.forward_upper_layers(h_s)  # (B, T, V)
        loss = distill_loss(model.exit_head(self.target)(h_s), deep, labels, self.alpha)
        return loss, (labels != IGNORE_INDEX).sum(), {}


@dataclass
class ExitAgreement:
    """An exit (the shallow or the draft exit) against the deep exit over validation windows.

    Attributes:
        agreement: Fraction of tokens whose argmax of the exit equals the deep argmax.
        shallow_ppl: Perplexity of the exit on the labels.
        tokens: Tokens measured.
    """

    agreement: float
    shallow_ppl: float
    tokens: int


@torch.no_grad()
def exit_agreement(model: LegoLM, batches: Iterable[Batch], max_batches: int | None = None,
                   progress: bool = False, target: ExitName = "shallow_exit") -> ExitAgreement:
    """`ExitAgreement` of exit ``target`` of an extended model over ``batches`` (the first ``max_batches``)."""
    if not model.extended:
        raise ConfigError("exit agreement needs both exits; extend() the model first")
    head = model.exit_head(target)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    same = nll = 0.0
    n = 0
    rewind(batches)
    for i, batch in enumerate(tqdm(batches, desc="exit agreement", unit="batch", disable=not progress)):
        if max_batches is not None and i >= max_batches:
            break
        labels = batch["labels"].to(device)
        h_s = model.lower(batch["input_ids"].to(device))  # (B, T, C)
        logits, deep = head(h_s), model.forward_upper_layers(h_s)  # (B, T, V) each
        mask = labels != IGNORE_INDEX
        same += float((logits.argmax(-1) == deep.argmax(-1))[mask].sum())
        logp = logits.float().log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        nll, n = nll - float(logp[mask].double().sum()), n + int(mask.sum())
    model.train(was_training)
    if n == 0:
        raise ConfigError("no validation tokens to measure the exits' agreement on; give the corpus validation text")
    return ExitAgreement(same / n, safe_exp(nll / n), n)


@dataclass
class DistillReport:
    """What phase 3 changed, on the validation windows (the ``phase3`` block of the summary).

    Attributes:
        into: The trained exit: ``draft`` (a separate draft exit) or ``exit`` (the shallow exit).
        distill_weight: α of the loss.
        agreement_before: Drafter/deep argmax agreement after phase 2 (the drafter then: the shallow exit,
            which a new draft exit starts as a copy of).
        agreement_after: The same after phase 3 (the drafter now: the trained exit).
        drafter_ppl_before: The drafter's perplexity after phase 2 (the shallow exit's).
        drafter_ppl_after: The trained exit's perplexity after phase 3.
        shallow_ppl_before: The shallow exit's perplexity after phase 2.
        shallow_ppl_after: The same after phase 3 (unchanged with ``draft``: that exit is not trained).
        threshold_before: τ after phase 2.
        threshold: τ after phase 3: re-calibrated on the distilled exit's confidences (the same rule) with
            ``exit``, unchanged with ``draft``.
        shallow_ratio_before: Validation tokens exiting at the old τ, old confidences.
        shallow_ratio: Validation tokens exiting at the new τ, new confidences (unchanged with ``draft``).
        tokens: Validation tokens measured.
        rule: How τ was found.
    """

    into: str
    distill_weight: float
    agreement_before: float
    agreement_after: float
    drafter_ppl_before: float
    drafter_ppl_after: float
    shallow_ppl_before: float
    shallow_ppl_after: float
    threshold_before: float
    threshold: float
    shallow_ratio_before: float
    shallow_ratio: float
    tokens: int
    rule: str

    def line(self) -> str:
        """One printed line of the numbers above."""
        if self.into == "draft":
            return (f"phase 3 (exit distillation into a draft exit, α={self.distill_weight:g}): drafter agreement "
                    f"with the deep exit {self.agreement_before:.3f} -> {self.agreement_after:.3f}, "
                    f"drafter PPL {self.drafter_ppl_before:.2f} -> {self.drafter_ppl_after:.2f}; shallow exit, "
                    f"τ {self.threshold:.4f} and shallow ratio {self.shallow_ratio:.3f} unchanged "
                    f"({self.tokens:,} validation tokens)")
        return (f"phase 3 (exit distillation into the shallow exit, α={self.distill_weight:g}): agreement with the "
                f"deep exit {self.agreement_before:.3f} -> {self.agreement_after:.3f}, "
                f"shallow PPL {self.shallow_ppl_before:.2f} -> {self.shallow_ppl_after:.2f}, "
                f"τ {self.threshold_before:.4f} -> {self.threshold:.4f} ({self.rule}), "
                f"shallow ratio {self.shallow_ratio_before:.3f} -> {self.shallow_ratio:.3f} "
                f"({self.tokens:,} validation tokens)")
