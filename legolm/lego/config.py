"""``legolm lego`` settings: two training phases on `fit`, the LEGO knobs and the decode measurement.

YAML sections and dotted flags as in ``legolm pretrain``::

    window: 128                     --window 128
    model: {preset: pythia-14m, layers: [pythia, pythia]}        (the shallow model)
    phase1: {max_steps: 1500, eval: {every: 100, patience: 3}}
    phase2: {max_steps: 1500, optim: {lr: 1.0e-3}}
    phase3: {max_steps: 400}                                     (optional exit distillation; 0 = off)
    lego: {num_layers: 6, target_ratio: 0.5}                     --lego.target-ratio 0.4
    decode: {prompts: 8, max_new_tokens: 64}
    run: {out_dir: runs/lego, device: cpu}

Two ways into a LEGO model:

* grown (default): ``model`` is the shallow model; phase 1 trains it, ``extend`` adds the upper
  layers up to ``lego.num_layers``;
* from a pretrained model: ``model.init`` names it and ``lego.split`` (or ``lego.split_candidates``,
  chosen by a measured curve) is where the shallow exit sits; phase 1 trains only that exit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from legolm.core.config import MAX_LAYERS
from legolm.data.tokenized import DataConfig
from legolm.errors import ConfigError
from legolm.generation.early_exit import KVMode
from legolm.generation.fused import FUSED_BLOCKS, FusedBlocks
from legolm.model.lego import check_target_ratio
from legolm.train.config import EvalConfig, FitConfig, ModelSpec, OptimConfig, RunConfig, ScheduleConfig

StoreDtype = Literal["float32", "bfloat16", "float16"]
DistillInto = Literal["draft", "exit"]
DISTILL_INTO = ("draft", "exit")
PHASE_OFF = 0  # phase3.max_steps that skips phase 3
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PhaseConfig:
    """The training loop of one phase (window and run settings are the command's).

    Attributes:
        batch_size: Windows per micro-batch.
        grad_accum: Micro-batches per optimizer step.
        max_steps: Optimizer steps (None = as many as epochs gives).
        epochs: Passes over the phase's data (None = as many as max_steps gives).
        optim: AdamW settings.
        schedule: Learning-rate schedule.
        eval: Validation and early stopping (patience > 0 stops early; the best weights are restored).
    """

    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int | None = 1000
    epochs: int | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(every=100, patience=3))

    def fit_config(self, window: int, run: RunConfig, out_dir: Path) -> FitConfig:
        """The `FitConfig` of this phase, writing its run into ``out_dir``."""
        return FitConfig(window=window, batch_size=self.batch_size, grad_accum=self.grad_accum,
                         max_steps=self.max_steps, epochs=self.epochs, optim=self.optim, schedule=self.schedule,
                         eval=self.eval, run=dataclasses.replace(run, out_dir=str(out_dir), overwrite=False))


@dataclass
class LegoSettings:
    """The LEGO method's own settings.

    Attributes:
        num_layers: Depth after extend (the shallow model's depth is that of model.layers); grown route only.
        split: Pretrained route: the shallow exit sits after this many blocks of model.init (None = grown route).
        split_candidates: Pretrained route: train an exit after each of these block counts in phase 1 (jointly)
            and keep the smallest whose routed perplexity at target_ratio, with the model's own upper layers,
            is within split_tolerance of the full model's (the measured curve is saved); overrides split.
        split_tolerance: Relative perplexity increase allowed over the unmodified model when choosing the split from
            split_candidates, and by calibrate: quality.
        split_cost: What "cheapest" means among the split candidates within tolerance: weights (the weights a
            batch-1 decode step reads, projected from the shallow ratio) or decode (measured: a copy of the
            model split at each candidate decodes the decode section's prompts with its decoder at full depth,
            always exiting and never exiting; `legolm.lego.split.decode_costs`).
        joint_exit_weight: Pretrained route with split_candidates: 0 trains the exits alone on the frozen model
            in phase 1 (tuned lenses); w > 0 trains the whole model with them, loss = CE(deep) + w · mean
            CE(exits), the early-exit loss of LayerSkip (Elhoushi et al. 2024, arXiv 2404.16710), so that
            lower blocks learn to predict early. Tolerances stay relative to the unmodified model.
        exit_lr_scale: With joint_exit_weight > 0: the exits train at this multiple of phase 1's learning rate
            (they start new, the model fine-tunes: on SmolLM2 one rate of 1e-4 left them worse than exits trained
            alone at 1e-3; docs/results/lego.md, "The exits' own learning rate").
        calibrate: How τ is calibrated: ratio (target_ratio of the validation tokens fall below it) or quality
            (pretrained route: the most exits whose soft-routed validation perplexity, with the model's own upper
            layers, stays within split_tolerance of the unmodified model's; each split candidate gets its own).
        quality_grid: calibrate: quality tries the confidences' quantiles at 0, 1/quality_grid, 2/quality_grid, ...
        phase1: Train the shallow model (or exit) first (false: model.init must be a trained shallow checkpoint).
        threshold: Routing threshold in [0, 1] to use instead of calibrating one (None = calibrate).
        target_ratio: Fraction of validation tokens below the calibrated threshold (hard), in (0, 1).
        routing_temperature: T of the routing weight sigmoid((conf - threshold) / T), > 0.
        freeze_lower: Freeze embeddings and lower layers in phase 2 (required: it trains on their stored outputs).
        identity_init: The grown route's new blocks start as the identity (residual output projections zero): the
            deep exit starts equal to the shallow one.
        train_deep_head: Phase 2 also trains the deep exit's head (off: the upper blocks and the final norm train
            under a head that starts calibrated and stays so).
        phase2_loss: routed (NLL of the soft-routed mixture, as evaluated) or deep (deep exit alone) on hard tokens.
        phase2_easy_weight: Weight of the easy tokens of the stored windows in the phase-2 loss, relative to the
            hard ones (0: hard tokens only, the LEGO method; > 0 keeps the deep exit good everywhere, which raises
            self-speculative acceptance).
        store_dtype: dtype of the stored lower-layer states (bfloat16/float16 halve their memory).
        calib_batches: Validation batches for calibration and evaluation (None = all).
        collect_batches: Training batches scanned for hard examples (None = all of the training split).
        phase2_fraction: Fraction of the training tokens (the end of the stream, cut after a document) that phase 1
            never trains on and phase 2 collects its hard examples from (0 = both phases use all of it). Hard
            tokens of text phase 1 trained on are not like those of new text: trained on them, the upper layers
            got worse on held-out hard tokens in every run (docs/results/lego.md, "Why phase 2 failed").
        curve_ratios: Further thresholds for the quality/speed curve, as fractions of validation tokens below them.
        distill_weight: Phase 3 (exit distillation): weight α of KL(p_deep ‖ p_shallow) in the loss
            α · KL + (1 - α) · CE(labels, p_shallow), in [0, 1] (1: match the deep model alone, which is what
            self-speculative acceptance needs).
        distill_into: Phase 3's trained exit: draft (a separate draft exit at the split, a copy of the shallow
            exit's own parameters: speculative decoding drafts with it, threshold early exit keeps the shallow
            exit and τ unchanged) or exit (the shallow exit itself, τ re-calibrated on its new confidences).
    """

    num_layers: int = 6
    split: int | None = None
    split_candidates: list[int] = field(default_factory=list)
    split_tolerance: float = 0.03
    split_cost: Literal["weights", "decode"] = "weights"
    joint_exit_weight: float = 0.0
    exit_lr_scale: float = 1.0
    calibrate: Literal["ratio", "quality"] = "ratio"
    quality_grid: int = 100
    phase1: bool = True
    threshold: float | None = None
    target_ratio: float = 0.5
    routing_temperature: float = 0.05
    freeze_lower: bool = True
    identity_init: bool = True
    train_deep_head: bool = False
    phase2_loss: Literal["routed", "deep"] = "routed"
    phase2_easy_weight: float = 0.0
    store_dtype: StoreDtype = "float32"
    calib_batches: int | None = None
    collect_batches: int | None = None
    phase2_fraction: float = 0.3
    curve_ratios: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.7, 0.9])
    distill_weight: float = 1.0
    distill_into: DistillInto = "draft"


@dataclass
class DecodeSettings:
    """The LEGO decode measurement (batch 1, greedy, real validation-text prompts).

    Every setting is timed as whole `generate` calls against the fastest full-depth decoder of the
    same model: the fused one on a GPU (``fused``), the static-cache decoder on a CPU.

    Attributes:
        prompts: Prompts, cut from the validation split at evenly spaced offsets.
        prompt_len: Tokens per prompt.
        max_new_tokens: Tokens generated per prompt (no EOS stop, so every threshold decodes as many).
        kv_mode: How exited tokens enter the upper KV cache along the threshold sweep: fill (exact), skip or propagate.
        compare_kv_modes: Further kv modes measured at the calibrated threshold.
        score_windows: Validation windows scored along the decode path (teacher forcing, batch 1).
        score_len: Tokens scored per window (after prompt_len tokens of context).
        dtype: Weights dtype while decoding (bfloat16 on a GPU; the perplexities of full forward passes stay fp32).
        repeats: Timed rounds; the median round is reported (settings interleaved in each round).
        warmup: Untimed rounds first.
        draft_tokens: Self-speculative rows, one per draft length (empty: none).
        fused: Decode through the fused Triton decoders on a CUDA GPU (threshold kv modes fill/skip and
            speculative; the eager loop for propagate); off a GPU the torch decoders run.
        fused_kernel: The fused blocks of every fused row: ``blocks`` (five launches per block), ``splitk``
            (three) or ``splitk-exact`` (three, exact sums; the default; `GenerationConfig.fused_kernel`);
            self-speculative rows on split-K blocks always sum exactly.
        if_node_kv_modes: Kv modes (fill, skip) timed again at the calibrated threshold with each token's branch
            as an IF node of the captured graphs (`GenerationConfig.fused_if_nodes`); the other rows read each
            decision on the host.
        kv_tolerance: The saved model's kv mode (generation's default for it, `LegoMeta.kv_mode`) is skip where skip
            was measured faster at the calibrated threshold and its decode-path PPL is within this relative margin of
            fill's (exact), else fill (`legolm.lego.report.choose_kv_mode`).
    """

    prompts: int = 8
    prompt_len: int = 32
    max_new_tokens: int = 64
    kv_mode: KVMode = "fill"
    compare_kv_modes: list[KVMode] = field(default_factory=lambda: ["skip", "propagate"])
    score_windows: int = 8
    score_len: int = 64
    dtype: StoreDtype = "float32"
    repeats: int = 3
    warmup: int = 1
    draft_tokens: list[int] = field(default_factory=lambda: [2, 3, 4])
    fused: bool = True
    fused_kernel: FusedBlocks = "splitk-exact"
    if_node_kv_modes: list[KVMode] = field(default_factory=list)
    kv_tolerance: float = 0.01


@dataclass
class LegoConfig:
    """``legolm lego``: phase 1, calibration, extension, phase 2, evaluation and early-exit decoding.

    Attributes:
        window: Tokens per training/evaluation window (both phases).
        model: The shallow model (preset and overrides; model.layers sets its depth).
        data: Corpus, tokenizer and split.
        phase1: Training of the shallow model on all data.
        phase2: Training of the upper layers on the stored hard examples.
        phase3: Optional exit distillation after phase 2: only a draft exit (or the shallow exit, as
            ``lego.distill_into`` says) trains, towards the deep model's distribution (``max_steps: 0``,
            the default, skips it).
        lego: Depth, threshold calibration, routing and storage.
        decode: The decode-speed measurement.
        run: Run directory, device, seed, progress (shared by both phases).
    """

    window: int = 128
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    phase1: PhaseConfig = field(default_factory=PhaseConfig)
    phase2: PhaseConfig = field(default_factory=PhaseConfig)
    phase3: PhaseConfig = field(default_factory=lambda: PhaseConfig(max_steps=PHASE_OFF))
    lego: LegoSettings = field(default_factory=LegoSettings)
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/lego"))

    @property
    def distills(self) -> bool:
        """Phase 3 (exit distillation) runs: ``phase3.max_steps`` is not 0."""
        return self.phase3.max_steps != PHASE_OFF

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad setting and its fix."""
        out = Path(self.run.out_dir)
        if self.run.cuda_graph:
            raise ConfigError("run.cuda_graph: LEGO's phase losses (hard tokens, exits) do not say when their steps "
                              "may be captured in a CUDA graph; leave run.cuda_graph off")
        if self.phase3.max_steps is not None and self.phase3.max_steps < PHASE_OFF:
            raise ConfigError(f"phase3.max_steps must be >= 0 (0 skips phase 3), got {self.phase3.max_steps}")
        phases = [("phase1", self.phase1), ("phase2", self.phase2)]
        for name, phase in phases + ([("phase3", self.phase3)] if self.distills else []):
            try:
                phase.fit_config(self.window, self.run, out).validate()
            except ConfigError as err:  # name the phase's own setting: phase2.optim.lr, not optim.lr
                message = str(err)
                section = message.split(".", 1)[0]
                if section in ("optim", "schedule", "eval") and "." in message.split(" ", 1)[0]:
                    message = f"{name}.{message}"
                raise ConfigError(message) from None
        self.data.validate()
        check_target_ratio(self.lego.target_ratio)
        for r in self.lego.curve_ratios:
            check_target_ratio(r)
        shallow = len(self.model.layers) if self.model.layers else None
        d, lg = self.decode, self.lego
        pretrained = lg.split is not None or bool(lg.split_candidates)
        checks = [
            (pretrained or shallow is None or lg.num_layers > shallow,
             f"lego.num_layers={lg.num_layers} must exceed the shallow model's {shallow} layers (model.layers)"),
            (pretrained or lg.num_layers <= MAX_LAYERS,
             f"lego.num_layers={lg.num_layers:,} exceeds the limit of {MAX_LAYERS:,} layers"),
            (not pretrained or self.model.init is not None,
             "lego.split / lego.split_candidates split a pretrained model: give model.init (a checkpoint, .gguf "
             "or hub name)"),
            (all(k >= 1 for k in [*lg.split_candidates, *([lg.split] if lg.split is not None else [])]),
             "lego.split and lego.split_candidates must be >= 1 (blocks below the shallow exit)"),
            (lg.split_tolerance >= 0, f"lego.split_tolerance must be >= 0, got {lg.split_tolerance}"),
            (lg.split_cost == "weights" or bool(lg.split_candidates),
             "lego.split_cost decode measures each of lego.split_candidates: give them, or leave lego.split_cost "
             "weights"),
            (lg.joint_exit_weight >= 0, f"lego.joint_exit_weight must be >= 0, got {lg.joint_exit_weight}"),
            (lg.joint_exit_weight == 0 or bool(lg.split_candidates),
             "lego.joint_exit_weight trains a pretrained model with exits at lego.split_candidates: give them "
             "(e.g. --lego.split-candidates K) or set lego.joint_exit_weight 0"),
            (lg.exit_lr_scale > 0, f"lego.exit_lr_scale must be > 0, got {lg.exit_lr_scale}"),
            (lg.exit_lr_scale == 1 or lg.joint_exit_weight > 0,
             "lego.exit_lr_scale scales the exits' rate against the model's, which trains only with "
             "lego.joint_exit_weight > 0: set that, or leave lego.exit_lr_scale 1"),
            (lg.calibrate == "ratio" or pretrained,
             "lego.calibrate: quality bounds the routed perplexity by the unmodified model's, which only the "
             "pretrained route has (lego.split / lego.split_candidates); use lego.calibrate ratio"),
            (lg.calibrate == "ratio" or lg.threshold is None,
             "lego.calibrate: quality calibrates τ itself; drop lego.threshold or use lego.calibrate ratio"),
            (lg.quality_grid >= 2, f"lego.quality_grid must be >= 2, got {lg.quality_grid}"),
            (lg.collect_batches is None or lg.collect_batches >= 1,
             f"lego.collect_batches must be >= 1, got {lg.collect_batches}"),
            (lg.phase2_easy_weight >= 0, f"lego.phase2_easy_weight must be >= 0, got {lg.phase2_easy_weight}"),
            (0.0 <= lg.distill_weight <= 1.0,
             f"lego.distill_weight must be in [0, 1] (the weight of KL(deep ‖ shallow) against the label loss in "
             f"phase 3), got {lg.distill_weight}"),
            (lg.distill_into in DISTILL_INTO,
             f"lego.distill_into must be one of {'|'.join(DISTILL_INTO)} (the exit phase 3 trains), "
             f"got {lg.distill_into!r}"),
            (0.0 <= lg.phase2_fraction < 1.0, f"lego.phase2_fraction must be in [0, 1), got {lg.phase2_fraction}"),
            (self.lego.threshold is None or 0.0 <= self.lego.threshold <= 1.0,
             f"lego.threshold must be in [0, 1] (a max softmax probability), got {self.lego.threshold}; "
             "leave it unset to calibrate one from lego.target_ratio"),
            (self.lego.phase1 or self.model.init is not None,
             "lego.phase1 is false but model.init is unset: extend() needs a trained shallow model; give "
             "model.init (a trained checkpoint) or run phase 1"),
            (self.lego.routing_temperature > 0,
             f"lego.routing_temperature must be > 0, got {self.lego.routing_temperature}"),
            (self.lego.freeze_lower, "lego.freeze_lower must stay true: phase 2 trains on the lower layers' stored "
                                     "outputs, so they cannot change"),
            (self.lego.calib_batches is None or self.lego.calib_batches >= 1,
             f"lego.calib_batches must be >= 1, got {self.lego.calib_batches}"),
            (d.prompts >= 1 and d.prompt_len >= 1 and d.max_new_tokens >= 1,
             "decode.prompts, decode.prompt_len and decode.max_new_tokens must be >= 1"),
            (d.score_windows >= 1 and d.score_len >= 1, "decode.score_windows and decode.score_len must be >= 1"),
            (d.repeats >= 1 and d.warmup >= 0, "decode.repeats must be >= 1 and decode.warmup >= 0"),
            (all(k >= 1 for k in d.draft_tokens), f"decode.draft_tokens must be >= 1, got {d.draft_tokens}"),
            (d.fused_kernel in FUSED_BLOCKS,
             f"decode.fused_kernel must be {' or '.join(FUSED_BLOCKS)} (LEGO decodes through fused blocks), got "
             f"{d.fused_kernel!r}"),
            (all(m in ("fill", "skip") for m in d.if_node_kv_modes),
             f"decode.if_node_kv_modes takes fill and skip (the fused decoder's kv modes), got {d.if_node_kv_modes}"),
            (d.kv_tolerance >= 0, f"decode.kv_tolerance must be >= 0 (a relative PPL margin), got {d.kv_tolerance}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
