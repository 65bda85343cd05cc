"""The LEGO training phases (two, and an optional third), all on the one loop `fit`.

::

    grown:       phase 1   fit(shallow model, all windows, next-token loss, early stopping)   → mark_trained
                 calibrate τ = quantile of validation confidences at target_ratio
                 extend    copy + upper layers, freeze embeddings / lower layers / shallow exit
    pretrained:  phase 1   fit(new exit(s) after block k of a frozen real model, exit loss)     → mark_trained
                           (candidates: one exit per k, the split chosen by a measured curve, `lego.split`)
                 calibrate τ, freeze embeddings / lower layers / shallow exit (upper = the model's own)
    both:        collect   lower-layer states of windows with hard tokens (train and val), once
                 phase 2   fit(LegoLM, stored states, loss on hard tokens, early stopping on val hard tokens)
    optional:    phase 3   fit(LegoLM, phase-1 windows, α·KL(deep ‖ drafter) + (1-α)·CE, only the drafter's
                           own parameters train, early stopping on val windows)
                           draft (default): a new draft exit, a copy of the shallow exit; shallow exit and τ kept
                           exit: the shallow exit itself   → re-calibrate τ (same rule)

Phase 3 (`legolm.lego.distill`) trains the drafter of self-speculative decoding towards its
verifier (draft-head distillation, Kangaroo, arXiv 2404.18911). By default that is a separate draft
exit and threshold early exit keeps its shallow exit and τ; with ``lego.distill_into: exit`` the
shallow confidences move, so τ is calibrated again by the rule the run used.

Phase 2's loss (`HardTokenLoss`) runs only the upper layers and the deep exit on the stored
states; the shallow log-probability and confidence were stored with them. With
``kind="routed"`` it is the NLL of the same soft-routed mixture that evaluation reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from legolm.checkpoints.loader import load_pretrained
from legolm.data.tokenized import TokenizedCorpus, check_fits
from legolm.errors import ConfigError
from legolm.lego.config import STORE_DTYPES, DistillInto, LegoConfig
from legolm.lego.distill import DistillLoss, DistillReport, exit_agreement
from legolm.lego.evaluate import TokenScores, score_tokens
from legolm.lego.hard_examples import (
    HardExamples,
    collect_hard_examples,
    create_hard_example_loader,
)
from legolm.lego.report import val_windows
from legolm.lego.split import (
    ExitLoss,
    ExitProbe,
    ExitProbeLoss,
    SplitPoint,
    calibrated_threshold,
    choose_split,
    decode_costs,
    measure_splits,
)
from legolm.lego.threshold import shallow_confidences
from legolm.model.lego import ExitName, LegoLM, LegoMeta, exits, quantile_threshold, routed_log_probs
from legolm.model.transformer import TransformerLM
from legolm.train.batches import Batch, BatchSource, WindowBatches, rewind
from legolm.train.config import FitConfig
from legolm.train.distributed import init_distributed
from legolm.train.fit import Callback, FitResult, FitState, LossFn, LossOutput, fit
from legolm.utils.device import resolve_device
from legolm.utils.finite import safe_exp


class RestoreBest(Callback):
    """Keep the trainable weights of the best validation perplexity and load them back at the end.

    Args:
        start: The model before training and its validation perplexity: training that never beats
            them gives the starting weights back.
    """

    def __init__(self, start: tuple[nn.Module, float] | None = None) -> None:
        self.best = math.inf
        self.weights: dict[str, Tensor] | None = None
        if start is not None:
            model, ppl = start
            self.best, self.weights = ppl, _trainable_copy(model)

    def on_eval(self, state: FitState, model: nn.Module, metrics: dict[str, float]) -> None:
        ppl = metrics.get("val_ppl", math.nan)
        if ppl < self.best:
            self.best = ppl
            self.weights = _trainable_copy(model)

    def on_train_end(self, state: FitState, model: nn.Module) -> None:
        if self.weights is None:
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.weights.items():
                params[name].copy_(value)
        tqdm.write(f"restored the weights of the best validation perplexity {self.best:.4g}")


def _trainable_copy(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_phase1(model: LegoLM, train: BatchSource, val: BatchSource, cfg: FitConfig) -> FitResult:
    """Phase 1: train the shallow model on all windows (next-token loss, early stopping), then mark it trained."""
    if model.extended:
        raise ConfigError("phase 1 trains the shallow model, but this LEGO model is already extended")
    result = fit(model, train, cfg, val=val, callbacks=[RestoreBest()])
    model.mark_trained()
    return result


class HardTokenLoss:
    """Phase-2 loss on the hard tokens of stored lower-layer states.

    Args:
        kind: ``routed``: -log(w · p_s + (1 - w) · p_d) with the continuous routing weight w of the
            stored shallow confidence (what evaluation reports); ``deep``: -log p_d alone.
        easy_weight: Weight λ of the other (easy) tokens of the same windows: the loss is
            (Σ_hard ℓ + λ · Σ_easy ℓ) / (n_hard + λ · n_easy). 0 trains on the hard tokens alone (the LEGO
            method); λ > 0 keeps the deep exit a whole model, agreeing with the shallow one where that one
            is sure (what self-speculative drafts need).
    """

    def __init__(self, kind: Literal["routed", "deep"] = "routed", easy_weight: float = 0.0) -> None:
        self.kind = kind
        self.easy_weight = easy_weight

    def __call__(self, module: nn.Module, batch: Batch) -> LossOutput:
        model = cast(LegoLM, module)
        hard, labels = batch["hard"], batch["labels"]  # (B, W)
        mask = torch.ones_like(hard) if self.easy_weight > 0 else hard  # the tokens the head runs on
        dtype = next(model.blocks[model.split].parameters()).dtype
        h_top = model.upper_hidden(batch["hidden"].to(dtype))  # (B, W, C) with full causal context
        logp_d = model.project(h_top[mask]).float().log_softmax(-1)  # (n, V): the head on those tokens only
        lp_d = logp_d.gather(-1, labels[mask][:, None])[:, 0]  # (n,)
        if self.kind == "deep":
            lp = lp_d
        else:
            lp = routed_log_probs(batch["shallow_logp"][mask], lp_d, batch["conf"][mask], model.threshold,
                                  model.meta.routing_temperature)
        weight = torch.where(hard[mask], 1.0, self.easy_weight)  # (n,)
        return -(weight * lp).sum() / weight.sum(), hard.sum(), {}


def _val_ppl(model: LegoLM, batches: BatchSource, loss_fn: LossFn, max_batches: int | None = None) -> float:
    """Validation perplexity of ``loss_fn`` (token-weighted) over the first ``max_batches``, as ``fit`` evaluates it."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    rewind(batches)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            loss, n, _ = loss_fn(model, {k: v.to(device) for k, v in batch.items()})
            total, count = total + float(loss) * int(n), count + int(n)
    model.train(was_training)
    return safe_exp(total / max(count, 1))


def check_phase2(model: LegoLM) -> None:
    """Phase 2 needs an extended model whose embeddings, lower layers and shallow exit are frozen."""
    if not model.extended:
        raise ConfigError("phase 2 trains the upper layers of an extended model; call extend() first")
    frozen = model.lower_modules()
    if any(p.requires_grad for m in frozen for p in m.parameters()):
        raise ConfigError("phase 2 trains on the lower layers' stored outputs, so they must stay frozen; "
                          "extend with freeze_lower=True")


def run_phase2(model: LegoLM, train: HardExamples, val: HardExamples, cfg: FitConfig,
               loss: Literal["routed", "deep"] = "routed", easy_weight: float = 0.0) -> FitResult:
    """Phase 2: train the upper layers and deep exit on stored hard examples, early stopping on ``val``.

    In a distributed run every rank holds all the examples and trains on its shard of them.
    The model before training counts as the first evaluation (the hard tokens' perplexity under the
    same loss): phase 2 keeps the upper layers it starts with unless training beats them on ``val``.
    """
    check_phase2(model)
    shard = init_distributed(cfg.run).shard()
    train_batches = create_hard_example_loader(train, cfg.batch_size, shuffle=True, seed=cfg.run.seed, **shard)
    eval_batch = cfg.eval_batch_size
    val_batches = create_hard_example_loader(val, eval_batch, shuffle=False)
    loss_fn = HardTokenLoss(loss, easy_weight)
    before = _val_ppl(model, val_batches, loss_fn)  # the start, measured as fit measures every evaluation
    tokens = "the hard tokens" if easy_weight == 0 else f"the hard tokens (easy ones weighted {easy_weight:g})"
    tqdm.write(f"phase 2 starts at validation {loss} perplexity {before:.4g} on {tokens}")
    return fit(model, train_batches, cfg, val=val_batches, loss_fn=loss_fn,
               callbacks=[RestoreBest(start=(model, before))])


def distilled_exit(into: DistillInto) -> ExitName:
    """The exit phase 3 trains for ``lego.distill_into``."""
    return "draft_exit" if into == "draft" else "shallow_exit"


def run_phase3(model: LegoLM, train: BatchSource, val: BatchSource, cfg: FitConfig,
               distill_weight: float = 1.0, into: DistillInto = "draft") -> FitResult:
    """Phase 3: exit distillation, only one exit's own parameters trained towards the deep model.

    ``into``: ``draft`` makes a new draft exit (`LegoLM.add_draft_exit`, a copy of the shallow exit)
    and trains it, ``exit`` trains the shallow exit. Loss `DistillLoss` (α = ``distill_weight``) on
    ``train`` windows, early stopping on ``val``; the model before training counts as the first
    evaluation (as in phase 2), so the exit it ends with is never worse on ``val`` than the one it
    started with. Every other parameter stays bit-for-bit as it was, and the trainable flags are
    given back as they were (a new draft exit's own parameters end frozen, like the shallow exit).
    """
    if not model.extended:
        raise ConfigError("phase 3 distils an exit towards the deep one; extend() the model first")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    target = distilled_exit(into)
    if target == "draft_exit":
        model.add_draft_exit()
    model.freeze_for_distillation(target)
    loss_fn = DistillLoss(distill_weight, target)
    try:
        before = _val_ppl(model, val, loss_fn, cfg.eval.max_batches)
        tqdm.write(f"phase 3 starts at validation distillation loss {math.log(before):.4g} (α={distill_weight:g}, "
                   f"into the {target.replace('_', ' ')})")
        return fit(model, train, cfg, val=val, loss_fn=loss_fn, callbacks=[RestoreBest(start=(model, before))])
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, False))


@dataclass
class LegoTraining:
    """What `train_lego` produced.

    Attributes:
        model: The phase-2-trained model with both exits (eval mode).
        threshold: Calibrated τ.
        phase1: Phase 1's `FitResult` (None when it was skipped).
        phase2: Phase 2's `FitResult`.
        hard_train: Stored training hard examples.
        hard_val: Stored validation hard examples.
        val_batches: The validation windows (shuffle off), for evaluation.
        splits: Pretrained route with candidates: each candidate's measured point (else empty).
        reference_ppl: Pretrained route: the unmodified model's validation perplexity (else None).
        phase3: Phase 3's `FitResult` (None when it was off).
        distill: What phase 3 changed (None when it was off).
    """

    model: LegoLM
    threshold: float
    phase1: FitResult | None
    phase2: FitResult
    hard_train: HardExamples
    hard_val: HardExamples
    val_batches: WindowBatches
    splits: list[SplitPoint] = field(default_factory=list)
    reference_ppl: float | None = None
    phase3: FitResult | None = None
    distill: DistillReport | None = None


def shallow_model(cfg: LegoConfig, corpus: TokenizedCorpus) -> LegoLM:
    """The grown route's phase-1 model: new (untrained) from the preset, or ``model.init`` (trained).

    A LEGO checkpoint keeps its own trained flag; any other checkpoint (e.g. from ``legolm
    pretrain``) counts as trained.
    """
    if cfg.model.init is None:
        torch.manual_seed(cfg.run.seed)
        return LegoLM(cfg.model.model_config(corpus.vocab_size, corpus.eos_id, corpus.tokenizer.bos_id))
    model = _init_checkpoint(cfg)
    if isinstance(model, LegoLM):
        if model.extended:
            raise ConfigError(f"model.init {cfg.model.init} is already extended; give the shallow (phase-1) model")
        return model
    lego = LegoLM.adopt(model)
    lego.mark_trained()
    return lego


def _init_checkpoint(cfg: LegoConfig) -> TransformerLM:
    assert cfg.model.init is not None
    if cfg.model.overrides():
        raise ConfigError(f"model.init starts from a checkpoint whose sizes are fixed; drop the overrides "
                          f"{sorted(cfg.model.overrides())}")
    return load_pretrained(cfg.model.init).float().train()


def uses_pretrained_split(cfg: LegoConfig) -> bool:
    """The pretrained route: ``lego.split`` or ``lego.split_candidates`` is set."""
    return cfg.lego.split is not None or bool(cfg.lego.split_candidates)


def _phase1_grown(cfg: LegoConfig, corpus: TokenizedCorpus, train: BatchSource, val: BatchSource,
                  fit_cfg: FitConfig) -> tuple[LegoLM, FitResult | None]:
    model = shallow_model(cfg, corpus)
    check_fits(corpus, model.config, cfg.window)
    if cfg.lego.num_layers <= model.n_layer:
        raise ConfigError(f"lego.num_layers={cfg.lego.num_layers} must exceed the shallow model's "
                          f"{model.n_layer} layers")
    phase1 = run_phase1(model, train, val, fit_cfg) if cfg.lego.phase1 else None
    return model, phase1


def _phase1_split(cfg: LegoConfig, corpus: TokenizedCorpus, train: BatchSource, val: BatchSource,
                  fit_cfg: FitConfig) -> tuple[LegoLM, FitResult | None, list[SplitPoint], float | None]:
    """Pretrained route: train the exit(s) (and with ``lego.joint_exit_weight`` the model with them), choose the
    split from the candidates' measured curve; the unmodified model's perplexity where the model trained."""
    base = _init_checkpoint(cfg)
    check_fits(corpus, base.config, cfg.window)
    if not cfg.lego.split_candidates:
        assert cfg.lego.split is not None
        model = LegoLM.from_pretrained_split(base, cfg.lego.split)
        model.freeze_for_exit_training()
        result = fit(model, train, fit_cfg, val=val, loss_fn=ExitLoss(), callbacks=[RestoreBest()]) \
            if cfg.lego.phase1 else None
        model.mark_trained()
        return model, result, [], None
    joint = cfg.lego.joint_exit_weight > 0 and cfg.lego.phase1
    probe = ExitProbe(base, cfg.lego.split_candidates, train_model=joint, exit_lr_scale=cfg.lego.exit_lr_scale)
    reference = _unmodified_ppl(cfg, probe, val) if joint else None
    result = fit(probe, train, fit_cfg, val=val, loss_fn=ExitProbeLoss(cfg.lego.joint_exit_weight),
                 callbacks=[RestoreBest()]) if cfg.lego.phase1 else None
    probe.to(resolve_device(cfg.run.device))
    points = measure_splits(probe, val, cfg.lego, cfg.lego.calib_batches, cfg.run.progress, reference)
    if cfg.lego.split_cost == "decode":
        d = cfg.decode
        points = decode_costs(probe, points, val_windows(corpus.val, d.prompts, d.prompt_len), d, cfg.run.progress)
    best = choose_split(points)
    unmodified = "" if reference is None else f" (unmodified model {reference:.2f})"
    tqdm.write("split curve" + unmodified + ": "
               + "; ".join(f"k={p.split}: shallow {p.shallow_ppl:.2f}, routed {p.routed_ppl:.2f} "
                           f"(full {p.full_ppl:.2f}) at shallow ratio {p.shallow_ratio:.3f}, "
                           f"cost {p.cost:.3f}"
                           + ("" if p.decode_cost is None else f", decode cost {p.decode_cost:.3f}") for p in points)
               + f"; chosen k={best.split}" + ("" if best.within_tolerance else
                                              f" (none within {100 * cfg.lego.split_tolerance:g}%)"))
    model = LegoLM.adopt(base.requires_grad_(False), LegoMeta(split=best.split, exit_lens=True),
                         probe.exit(best.split))
    model.mark_trained()
    return model, result, points, reference


def _unmodified_ppl(cfg: LegoConfig, probe: ExitProbe, val: BatchSource) -> float:
    """The validation perplexity of the probe's model before anything trains (the reference of the tolerances)."""
    probe.to(resolve_device(cfg.run.device))
    ppl = measure_splits(probe, val, cfg.lego, cfg.lego.calib_batches, cfg.run.progress)[0].full_ppl
    tqdm.write(f"unmodified model: validation perplexity {ppl:.4f}")
    return ppl


def _threshold(cfg: LegoConfig, model: LegoLM, conf: Tensor, val: WindowBatches,
               unmodified_ppl: float | None) -> tuple[float, float | None, str]:
    """τ (given, or calibrated by ``lego.calibrate``), the unmodified model's perplexity (pretrained route) and
    how τ was found.

    On the pretrained route the deep exit before phase 2 is the unmodified model, so its validation
    perplexity is the reference that ``calibrate: quality`` bounds the routed perplexity by; where phase 1
    trained the model with its exits, ``unmodified_ppl`` (measured before) is.
    """
    reference_ppl = None
    scores = None
    if model.extended:
        scores = score_tokens(model, val, cfg.lego.calib_batches, progress=cfg.run.progress)
        reference_ppl = scores.deep_ppl() if unmodified_ppl is None else unmodified_ppl
    threshold, rule = _calibrate(cfg, model, conf, val, reference_ppl, scores)
    return threshold, reference_ppl, rule


def _calibrate(cfg: LegoConfig, model: LegoLM, conf: Tensor, val: WindowBatches, reference_ppl: float | None,
               scores: TokenScores | None = None) -> tuple[float, str]:
    """τ by the run's rule (given, target-ratio quantile of ``conf``, or ``calibrate: quality`` against
    ``reference_ppl``) and how it was found; ``scores`` of the current model, else measured here if needed."""
    lg = cfg.lego
    if lg.threshold is not None:
        return lg.threshold, "given"
    if lg.calibrate == "quality":
        assert reference_ppl is not None  # LegoConfig.validate: quality needs the pretrained route
        scores = scores or score_tokens(model, val, lg.calib_batches, progress=cfg.run.progress)
        return (calibrated_threshold(scores, lg, reference_ppl),
                f"quality: routed within {100 * lg.split_tolerance:g}% of the unmodified {reference_ppl:.4g}")
    return quantile_threshold(conf, lg.target_ratio), f"target ratio {lg.target_ratio}"


def _store_threshold(cfg: LegoConfig, model: LegoLM, threshold: float, conf: Tensor) -> float:
    """Record τ, the ratio it was calibrated at and the quantiles of ``conf`` in the model; the hard ratio."""
    hard_ratio = float((conf < threshold).float().mean())
    model.calibrate(threshold, hard_ratio if cfg.lego.threshold is None and 0 < hard_ratio < 1 else None, conf)
    return hard_ratio


def distill_exit(cfg: LegoConfig, model: LegoLM, train_ids: np.ndarray, val: WindowBatches,
                 reference_ppl: float | None, out: Path) -> tuple[FitResult, DistillReport]:
    """Phase 3 on the phase-1 training windows into ``lego.distill_into``'s exit; ``exit``: then τ
    re-calibrated by the run's rule on the new confidences, ``draft``: the shallow exit and τ unchanged.

    The phase-1 windows (not phase 2's): the upper layers never trained on them, so the deep model's
    predictions there are like those on new text, which is what the drafter meets when decoding.
    """
    lg = cfg.lego
    p3 = cfg.phase3.fit_config(cfg.window, cfg.run, out / "phase3")
    shard = init_distributed(cfg.run).shard()
    train = WindowBatches(train_ids, cfg.window, p3.batch_size, shuffle=True, seed=cfg.run.seed, **shard)
    tau_before, conf_before = model.threshold, shallow_confidences(model, val, lg.calib_batches)
    before = exit_agreement(model, val, lg.calib_batches, progress=cfg.run.progress)  # the shallow exit
    result = run_phase3(model, train, val, p3, lg.distill_weight, lg.distill_into)
    model.eval()
    target = distilled_exit(lg.distill_into)
    after = exit_agreement(model, val, lg.calib_batches, progress=cfg.run.progress, target=target)
    if target == "draft_exit":  # the shallow exit did not train: its numbers and τ stay
        shallow_after, conf, threshold, rule = before, conf_before, tau_before, "unchanged"
    else:
        shallow_after, conf = after, shallow_confidences(model, val, lg.calib_batches)
        threshold, rule = _calibrate(cfg, model, conf, val, reference_ppl)
        _store_threshold(cfg, model, threshold, conf)
    report = DistillReport(
        into=lg.distill_into, distill_weight=lg.distill_weight, agreement_before=before.agreement,
        agreement_after=after.agreement, drafter_ppl_before=before.shallow_ppl, drafter_ppl_after=after.shallow_ppl,
        shallow_ppl_before=before.shallow_ppl, shallow_ppl_after=shallow_after.shallow_ppl,
        threshold_before=tau_before, threshold=threshold,
        shallow_ratio_before=float(exits(conf_before, tau_before).float().mean()),
        shallow_ratio=float(exits(conf, threshold).float().mean()), tokens=after.tokens, rule=rule)
    return result, report


def split_training_tokens(ids: np.ndarray, eos_id: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The training stream for phase 1 and the one phase 2 collects hard examples from.

    ``fraction`` > 0 reserves the end of the stream (cut after a document's EOS) for phase 2: phase 1
    never trains on it, so its hard tokens are hard the way unseen text is, not the residue of what
    phase 1 memorised. 0: both phases use the whole stream.
    """
    if fraction <= 0:
        return ids, ids
    at = int(len(ids) * (1.0 - fraction))
    ends = np.flatnonzero(np.asarray(ids[at:]) == eos_id)
    cut = at + int(ends[0]) + 1 if len(ends) else at
    if cut <= 0 or cut >= len(ids):
        raise ConfigError(f"lego.phase2_fraction={fraction} leaves one of the phases no training text; "
                          "give a fraction that keeps whole documents on both sides")
    return ids[:cut], ids[cut:]


def train_lego(cfg: LegoConfig, corpus: TokenizedCorpus) -> LegoTraining:
    """Phase 1, calibration, extension (grown route), hard-example collection, phase 2 and (``phase3.max_steps``
    > 0) exit distillation with τ re-calibrated, as ``cfg`` says."""
    out = Path(cfg.run.out_dir)
    p1 = cfg.phase1.fit_config(cfg.window, cfg.run, out / "phase1")
    shard = init_distributed(cfg.run).shard()  # training batches are sharded; calibration reads all of val
    val = WindowBatches(corpus.val, cfg.window, p1.eval_batch_size, shuffle=False, drop_last=False)
    phase1_ids, phase2_ids = split_training_tokens(corpus.train, corpus.eos_id, cfg.lego.phase2_fraction)
    train = WindowBatches(phase1_ids, cfg.window, p1.batch_size, shuffle=True, seed=cfg.run.seed, **shard)
    points: list[SplitPoint] = []
    unmodified: float | None = None
    if uses_pretrained_split(cfg):
        model, phase1, points, unmodified = _phase1_split(cfg, corpus, train, val, p1)
    else:
        model, phase1 = _phase1_grown(cfg, corpus, train, val, p1)
    model.to(resolve_device(cfg.run.device)).eval()
    conf = shallow_confidences(model, val, cfg.lego.calib_batches)
    threshold, reference_ppl, rule = _threshold(cfg, model, conf, val, unmodified)
    if model.extended:  # pretrained route: the upper layers are the model's own
        model.freeze(cfg.lego.freeze_lower, cfg.lego.train_deep_head)
    else:
        model.extend(cfg.lego.num_layers, threshold, freeze_lower=cfg.lego.freeze_lower,
                     identity_init=cfg.lego.identity_init, train_deep_head=cfg.lego.train_deep_head)
    hard_ratio = _store_threshold(cfg, model, threshold, conf)
    model.meta.routing_temperature = cfg.lego.routing_temperature
    store = STORE_DTYPES[cfg.lego.store_dtype]
    scan = WindowBatches(phase2_ids, cfg.window, p1.batch_size, shuffle=False, drop_last=False)
    hard_train = collect_hard_examples(model, scan, threshold, store_dtype=store, max_batches=cfg.lego.collect_batches,
                                       progress=cfg.run.progress)
    hard_val = collect_hard_examples(model, val, threshold, store_dtype=store, max_batches=cfg.lego.calib_batches,
                                     progress=cfg.run.progress)
    tqdm.write(f"threshold {threshold:.4f} ({rule}; {hard_ratio:.3f} of validation tokens hard); train: "
               f"{hard_train.summary()}; val: {hard_val.summary()}")
    phase2 = run_phase2(model, hard_train, hard_val, cfg.phase2.fit_config(cfg.window, cfg.run, out / "phase2"),
                        cfg.lego.phase2_loss, cfg.lego.phase2_easy_weight)
    phase3, distill = None, None
    if cfg.distills:
        phase3, distill = distill_exit(cfg, model.eval(), phase1_ids, val, reference_ppl, out)
        threshold = distill.threshold
    return LegoTraining(model.eval(), threshold, phase1, phase2, hard_train, hard_val, val, points, reference_ppl,
                        phase3, distill)
