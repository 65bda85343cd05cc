"""`fit`: the one training loop (pretraining, fine-tuning, and the methods built on them).

::

    batches ─▶ [micro-batch ×grad_accum: loss_fn(model, batch) ─ backward] ─ clip ─ AdamW ─ lr(step)
                     │                                                                  │
                     └──────── every eval.every: eval_fn(model) ─ early stop ◀──────────┤
                                          every run.save_every: checkpoint ◀────────────┘

Under ``torchrun`` with ``run.strategy`` ddp or fsdp2 the same loop runs on every rank (see
`legolm.train.distributed`): each rank reads its shard of the batches, the loss runs inside the
DDP / FSDP2 forward, gradients are reduced on the last micro-batch of a step, the logged loss and
tokens and the default evaluation are reduced over ranks, and rank 0 alone writes.

The parts that later methods swap are arguments: the loss (``loss_fn(model, batch) -> (loss,
n_tokens, metrics)``, default next-token cross-entropy), the evaluation (``eval_fn(model) ->
metrics``, default mean validation loss/perplexity over the validation windows under the same
autocast and loss as training), the data (any `BatchSource`), the trained parameters (those with
``requires_grad``; callers freeze the rest) and a few explicit `Callback` hooks.
"""

from __future__ import annotations

import contextlib
import math
import random
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from legolm.config import dump_yaml
from legolm.errors import ConfigError, TrainingDiverged
from legolm.train.batches import Batch, BatchSource
from legolm.train.best import BestWeights
from legolm.train.checkpoint import (
    latest_checkpoint,
    load_latest_checkpoint,
    load_optimizer_checkpoint,
    remove_partial_checkpoints,
    save_training_checkpoint,
)
from legolm.train.config import FitConfig, RunConfig, uses_bf16
from legolm.train.distributed import DistContext, Wrapped, init_distributed
from legolm.train.head_loss import IGNORE_INDEX, LossKernel, head_cross_entropy, token_cross_entropy
from legolm.train.metrics import MetricsLogger, format_loss
from legolm.train.optim import LRSchedule, build_optimizer, lr_scales
from legolm.train.run_dir import open_run_dir, release_run_dir
from legolm.train.step_graph import StepGraph, capturable_, graph_capable, graph_safe, on_side_stream
from legolm.utils.finite import safe_exp
from legolm.utils.io import atomic_write_text
from legolm.utils.params import count_parameters, trainable_parameters

LossOutput = tuple[Tensor, Tensor | int, dict[str, Tensor]]
StepOutput = tuple[Tensor, Tensor | int, Tensor, Tensor]  # mean loss, tokens, gradient norm, finite
LossFn = Callable[[nn.Module, Batch], LossOutput]
EvalFn = Callable[[nn.Module], dict[str, float]]


class NextTokenLoss:
    """Mean next-token cross-entropy over the labels that are not ``IGNORE_INDEX``.

    The batch's ``labels`` are already shifted (label t is the token after input t), so the
    logits of every position are scored. Logits are upcast to fp32 for the softmax.

    Args:
        chunk_tokens: Score this many positions at a time (`head_cross_entropy`; 0 = all at once).
            Needs a model whose forward takes ``logits=False`` and that has an ``lm_head``, unless
            ``head_optional``: then a model without one is scored on its whole logits (the default chunking).
        kernel: The chunks' softmax step: torch ops or the Triton kernel (`head_cross_entropy`).
        vocab_chunk: The head weight's gradient by chunks of this many vocabulary entries, its logits
            recomputed (`head_cross_entropy`; 0 = an fp32 accumulator over token chunks).
    """

    def __init__(self, chunk_tokens: int = 0, kernel: LossKernel = "torch", vocab_chunk: int = 0,
                 head_optional: bool = False) -> None:
        self.chunk_tokens, self.kernel, self.vocab_chunk = chunk_tokens, kernel, vocab_chunk
        self.head_optional = head_optional

    def __call__(self, model: nn.Module, batch: Batch) -> LossOutput:
        labels = batch["labels"]  # (B, T)
        head = getattr(model, "lm_head", None)
        if self.chunk_tokens and (isinstance(head, nn.Module) or not self.head_optional):
            if not isinstance(head, nn.Module):
                raise ConfigError(f"loss_chunk_tokens needs a model with an lm_head (a TransformerLM); "
                                  f"{type(model).__name__} has none: set loss_chunk_tokens to 0")
            x = model(batch["input_ids"], logits=False)  # (B, T, C)
            loss = head_cross_entropy(head, x, labels, self.chunk_tokens, self.kernel, self.vocab_chunk)
        else:
            loss = token_cross_entropy(model(batch["input_ids"]), labels)  # logits (B, T, V)
        return loss, (labels != IGNORE_INDEX).sum(), {}

    def graph_safe(self, batch: Batch) -> bool:
        """Whether a step may be captured in a CUDA graph (`legolm.train.step_graph`): always, but for the
        torch ops' vocabulary-chunk pass (it finds each chunk's labelled rows with a device sync)."""
        return not (self.vocab_chunk and self.kernel == "torch")


@dataclass
class FitState:
    """Where training stands; saved in every checkpoint. A callback sets ``stop`` to end the run."""

    step: int = 0
    epoch: int = 0
    tokens: int = 0
    best_metric: float = math.inf
    bad_evals: int = 0
    elapsed_s: float = 0.0
    eval_s: float = 0.0
    stop: bool = False
    stopped_early: bool = False
    skipped_steps: int = 0


class Callback:
    """Hooks `fit` calls at fixed points; override the ones you need (all default to nothing)."""

    def on_train_start(self, state: FitState, model: nn.Module) -> None:
        """Before the first step (also after a resume)."""

    def on_step_end(self, state: FitState, model: nn.Module) -> None:
        """After each optimizer step (``state.step`` already counts it)."""

    def on_epoch_end(self, state: FitState, model: nn.Module) -> None:
        """After the last batch of an epoch (``state.epoch`` is the epoch about to start)."""

    def on_eval(self, state: FitState, model: nn.Module, metrics: dict[str, float]) -> None:
        """After each evaluation, with its metrics."""

    def on_train_end(self, state: FitState, model: nn.Module) -> None:
        """After the last step and the final evaluation and checkpoint."""


@dataclass
class FitResult:
    """What a run achieved.

    Attributes:
        best_val_ppl: Lowest validation perplexity seen (inf without validation).
        final_val_ppl: Validation perplexity after the last step.
        steps: Optimizer steps done (in total, across resumes).
        tokens: Training label tokens seen.
        seconds: Wall time of the training (across resumes).
        tokens_per_s: Training tokens per second of wall time.
        peak_memory_mb: Peak CUDA memory allocated (GPU) or peak resident memory (CPU).
        trainable_params: Parameters optimised.
        total_params: All parameters of the model.
        stopped_early: Early stopping (or a callback) ended the run before its last step.
        evals: One row per evaluation: step, train_loss (mean since the previous one), val metrics.
        run_dir: The run directory.
        skipped_steps: Steps whose update was dropped for a non-finite loss or gradient (optim.on_nonfinite skip).
    """

    best_val_ppl: float
    final_val_ppl: float
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    peak_memory_mb: float
    trainable_params: int
    total_params: int
    stopped_early: bool
    evals: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None
    skipped_steps: int = 0


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for ``bf16-mixed`` (and ``auto`` on CUDA), else nothing (fp32)."""
    if uses_bf16(device.type, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The seed of rank ``rank`` > 0 from ``step`` on (rank 0 keeps the run's own RNG stream)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def _to_device(batch: Batch, device: torch.device) -> Batch:
    """Host batches go to the GPU through pinned memory, without waiting for the copy; GPU batches stay."""
    if device.type != "cuda":
        return batch
    return {k: v.to(device) if v.is_cuda else v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


class TrainStep:
    """One optimizer step: forward/backward of each micro-batch, clipping, AdamW at the step's lr.

    Nothing here waits for the device: the returned loss and token count stay tensors until the
    caller logs them. ``compile`` wraps the loss call (forward, and through AOTAutograd the
    backward) in `torch.compile`. The loss runs as ``wrapped.runner(loss_fn, batch)``: through
    DDP or FSDP2 in a distributed run, with gradients reduced only on the last micro-batch.

    Args:
        model: The model (its trainable parameters are in ``optimizer``).
        loss_fn: ``(model, batch) -> (loss, n_tokens, metrics)``.
        optimizer: Usually from `build_optimizer`.
        schedule: Learning rate per step.
        grad_clip: Max global gradient norm (0 = off).
        autocast: Context entered around each forward.
        device: Where batches go.
        compile: Compile the loss call.
        compile_mode: The `torch.compile` mode.
        wrapped: The model as a distributed run trains it (default: ``model`` in this process).
        skip_nonfinite: Drop the update of a step whose loss or gradient norm is not finite (over all
            ranks); this waits for the device once per step. Without it the update is applied and
            the caller reads ``finite`` when it syncs anyway (`fit` stops the run).
        cuda_graph: Replay each step as one CUDA graph where ``loss_fn.graph_safe(batch)`` allows it
            (`legolm.train.step_graph`): ``graph_warmup`` eager steps on a side stream first, then one capture;
            steps of other shapes run eagerly. One process on a CUDA device, without ``skip_nonfinite``.
        graph_warmup: Eager steps before the capture.

    Attributes:
        finite: Whether the last step's loss and gradient norm were finite (a bool tensor, not synced).
        grad_norm: The last step's global gradient norm before clipping (a tensor).
        skipped: Whether the last step's update was dropped (only with ``skip_nonfinite``).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, schedule: LRSchedule,
                 grad_clip: float, autocast: contextlib.AbstractContextManager[Any], device: torch.device,
                 compile: bool = False, compile_mode: str = "default", wrapped: Wrapped | None = None,
                 skip_nonfinite: bool = False, cuda_graph: bool = False,
                 graph_warmup: int = RunConfig.cuda_graph_warmup) -> None:
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, got {device}")
        self.wrapped = wrapped if wrapped is not None else Wrapped(model)
        self.model, self.loss_fn, self.optimizer, self.schedule = self.wrapped.model, loss_fn, optimizer, schedule
        self.grad_clip, self.autocast, self.device = grad_clip, autocast, device
        self.skip_nonfinite = skip_nonfinite
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        runner = self.wrapped.runner
        self.run: Callable[..., LossOutput] = torch.compile(runner, mode=compile_mode) if compile else runner
        self.finite: Tensor = torch.ones((), dtype=torch.bool, device=device)
        self.grad_norm: Tensor = torch.zeros((), device=device)
        self.skipped = False
        self.cuda_graph, self.graph_warmup, self.warm = cuda_graph, graph_warmup, 0
        self.graph: StepGraph[StepOutput] | None = None

    def forward(self, batch: Batch) -> LossOutput:
        """The loss of one batch under this step's autocast (also used for evaluation)."""
        with self.autocast:
            return self.run(self.loss_fn, _to_device(batch, self.device))

    def __call__(self, micro_batches: Sequence[Batch], step: int) -> tuple[Tensor, Tensor | int, float]:
        """Train on ``micro_batches`` as one step; return (mean loss, tokens, lr) without syncing."""
        graphed = self.cuda_graph and graph_safe(self.loss_fn, micro_batches)
        if graphed:
            capturable_(self.optimizer, self.device)  # before the schedule fills the rates
        lr = self.schedule.apply(self.optimizer, step)
        out = self._graphed([_to_device(b, self.device) for b in micro_batches]) if graphed else \
            self._step(micro_batches)
        mean, tokens, self.grad_norm, self.finite = out
        return mean, tokens, lr

    def _graphed(self, batches: list[Batch]) -> StepOutput:
        """The step replayed from its graph (captured after ``graph_warmup`` eager steps), or eager for shapes
        other than the captured ones."""
        if self.graph is not None:
            return self.graph.replay(batches) if self.graph.fits(batches) else self._step(batches)
        if self.warm < self.graph_warmup:
            self.warm += 1
            return on_side_stream(lambda: self._step(batches))
        self.graph = StepGraph(self._step, batches)
        return self.graph.replay(batches)

    def _step(self, micro_batches: Sequence[Batch]) -> StepOutput:
        """Forward/backward of each micro-batch, clipping, AdamW: (mean loss, tokens, grad norm, finite)."""
        total: Tensor | None = None
        tokens: Tensor | int = 0
        for i, batch in enumerate(micro_batches):
            with self.wrapped.grad_sync(i == len(micro_batches) - 1):  # reduce gradients once per step
                loss, n, _ = self.forward(batch)
                (loss / len(micro_batches)).backward()
            total = loss.detach() if total is None else total + loss.detach()
            tokens = tokens + n
        assert total is not None
        mean = total / len(micro_batches)
        norm = self._grad_norm()
        full = getattr(norm, "full_tensor", None)  # FSDP2: the norm of sharded grads, a DTensor
        grad_norm = full() if callable(full) else norm
        finite = torch.isfinite(mean) & torch.isfinite(grad_norm)
        self.skipped = self.skip_nonfinite and self._any_rank_nonfinite(finite)
        if not self.skipped:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean, tokens, grad_norm, finite

    def _grad_norm(self) -> Tensor:
        """Global L2 norm of the gradients (0 when no parameter has one), as `clip_grad_norm_` computes it."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.get_total_norm(grads)

    def _any_rank_nonfinite(self, finite: Tensor) -> bool:
        """Whether this step was not finite on any rank (one device sync)."""
        return bool(self.wrapped.ctx.all_reduce_sum((~finite).double().reshape(1))[0] > 0)


def evaluate_loss(step: TrainStep, batches: BatchSource, max_batches: int | None = None) -> dict[str, float]:
    """Token-weighted mean loss (and its exp, the perplexity) over validation batches, no gradients.

    Batches sharded over the ranks of a distributed run (``batches.world_size`` equal to it) are
    summed over ranks, each rank reading ``ceil(max_batches / world_size)`` of them; unsharded
    ones are read whole by every rank.
    """
    model, ctx = step.model, step.wrapped.ctx
    sharded = ctx.world_size > 1 and getattr(batches, "world_size", 1) == ctx.world_size
    if max_batches is not None and sharded:
        max_batches = -(-max_batches // ctx.world_size)
    was_training = model.training
    model.eval()
    batches.set_epoch(0)
    total = torch.zeros((), dtype=torch.float64, device=step.device)
    count: Tensor | int = 0
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            loss, n, _ = step.forward(batch)
            total += loss.double() * n
            count = count + n
    model.train(was_training)
    step.wrapped.reshard()
    if sharded:
        total, count = ctx.all_reduce_sum(torch.stack([total, torch.as_tensor(count, device=step.device).double()]))
    n_tokens = int(count)
    if n_tokens == 0:
        raise ConfigError("the validation batches hold no scored tokens; give the corpus more validation text")
    mean = float(total) / n_tokens
    return {"val_loss": mean, "val_ppl": safe_exp(mean), "val_tokens": n_tokens}


def total_steps(cfg: FitConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the whole run) from max_steps and/or epochs."""
    per_epoch = batches_per_epoch // cfg.grad_accum
    if per_epoch < 1:
        raise ConfigError(f"an epoch has {batches_per_epoch} batches, fewer than grad_accum={cfg.grad_accum}; "
                          "lower grad_accum or batch_size, or use more text")
    candidates = [n for n in (cfg.max_steps, cfg.epochs and cfg.epochs * per_epoch) if n]
    return per_epoch, min(candidates)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def fit(model: nn.Module, train: BatchSource, cfg: FitConfig, *, val: BatchSource | None = None,
        loss_fn: LossFn | None = None, eval_fn: EvalFn | None = None,
        callbacks: Sequence[Callback] = ()) -> FitResult:
    """Train ``model`` on ``train`` as ``cfg`` says; checkpoint, evaluate, log and resume.

    Args:
        model: Moved to ``cfg.run.device``; its parameters with ``requires_grad`` are trained.
        train: Training batches (see `WindowBatches`); in a distributed run, this rank's shard.
        cfg: Loop, optimizer, schedule, evaluation and run settings (any `FitConfig` subclass;
            the whole object is saved as the run's ``config.yaml``).
        val: Validation batches for the default evaluation (sharded or not; see `evaluate_loss`).
        loss_fn: ``(model, batch) -> (loss, n_tokens, metrics)``; default `NextTokenLoss`.
        eval_fn: ``model -> metrics`` (must include ``val_ppl`` for early stopping, and give the same
            metrics on every rank); default: mean loss over ``val`` under the training autocast.
        callbacks: Hooks called in order (on every rank, with the module that holds the live
            weights: under FSDP2 its sharded copy).

    Returns:
        The `FitResult`; the run directory holds config.yaml, metrics.jsonl/.csv, loss.png and
        the checkpoints.

    Raises:
        ConfigError: An invalid setting, or resuming on other data.
        TrainingDiverged: A NaN/inf loss, gradient norm or weight (``optim.on_nonfinite``); nothing
            non-finite was saved and the last finite checkpoint is kept.
        LegolmError: The run directory exists (without ``overwrite``/``resume``), is held by another
            process, or is not legolm's (see `legolm.train.run_dir`).
    """
    cfg.validate()
    if cfg.run.cuda_graph and loss_fn is not None and not graph_capable(loss_fn):
        raise ConfigError(f"run.cuda_graph: this run's loss ({type(loss_fn).__name__}) does not say when its steps "
                          "may be captured (no graph_safe method); leave run.cuda_graph off")
    ctx = init_distributed(cfg.run)
    device = ctx.run_device(cfg.run.device)
    if device.type == "cuda" and cfg.run.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    check_shards(train, ctx)
    total_steps(cfg, len(train))
    if count_parameters(model)[0] == 0:
        raise ConfigError("the model has no trainable parameters (all have requires_grad=False)")
    ctx.barrier()  # every rank has checked the run directory before rank 0 creates it
    run_dir = ctx.on_main(lambda: open_run_dir(cfg.run.out_dir, cfg.run.overwrite, cfg.run.resume))
    try:
        return _fit_in(run_dir, model, train, cfg, ctx, device, val, loss_fn, eval_fn, callbacks)
    finally:
        if ctx.is_main:
            release_run_dir(run_dir)


def _fit_in(run_dir: Path, model: nn.Module, train: BatchSource, cfg: FitConfig, ctx: DistContext,
            device: torch.device, val: BatchSource | None, loss_fn: LossFn | None, eval_fn: EvalFn | None,
            callbacks: Sequence[Callback]) -> FitResult:
    """`fit` once its run directory is open (and locked)."""
    per_epoch, n_steps = total_steps(cfg, len(train))
    trainable, total = count_parameters(model)
    say = tqdm.write if ctx.is_main else _silent
    if ctx.is_main:
        remove_partial_checkpoints(run_dir)
    ckpt, saved = load_latest_checkpoint(run_dir, model, device, say, ctx.is_main) if cfg.run.resume else (None, None)
    if ctx.strategy != "fsdp2":  # FSDP2 shards a copy and fills the model at the end
        model.to(device)
    model.train()
    scales = lr_scales(trainable_parameters(model))  # FSDP2's sharded copies do not keep the attribute
    wrapped = Wrapped(model, ctx, cfg.run)
    optimizer = build_optimizer(trainable_parameters(wrapped.model), cfg.optim, device, scales)  # FSDP2: shards
    schedule = LRSchedule(cfg.optim.lr, cfg.schedule, n_steps)
    loss = loss_fn or NextTokenLoss(cfg.resolved_loss_chunk(), cfg.resolved_loss_kernel(), cfg.loss_vocab_chunk,
                                    head_optional=cfg.loss_chunk_tokens is None)
    step = TrainStep(model, loss, optimizer, schedule, cfg.optim.grad_clip, autocast_for(device, cfg.run.precision),
                     device, cfg.run.compile, cfg.run.compile_mode, wrapped,
                     skip_nonfinite=cfg.optim.on_nonfinite == "skip", cuda_graph=cfg.run.cuda_graph,
                     graph_warmup=cfg.run.cuda_graph_warmup)
    state = _start(cfg, ckpt, saved, step, train, ctx)
    if ctx.is_main:
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    logger = MetricsLogger(run_dir, state.step if cfg.run.resume else None, cfg.run.plot, cfg.run.tensorboard,
                           enabled=ctx.is_main)
    evaluate: Callable[[], dict[str, float]] | None = None
    if eval_fn is not None:
        custom = eval_fn

        def evaluate() -> dict[str, float]:
            return wrapped.call(custom)
    elif val is not None:
        val_batches = val

        def evaluate() -> dict[str, float]:
            return evaluate_loss(step, val_batches, cfg.eval.max_batches)

    where = f"{ctx.world_size} ranks ({ctx.strategy}, rank 0 on {device})" if ctx.distributed else str(device)
    say(f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%) on {where}, "
        f"{n_steps:,} steps ({per_epoch:,} per epoch), run dir {run_dir}"
        + (f", activation checkpointing {wrapped.checkpointing} on {wrapped.checkpointed} blocks"
           if wrapped.checkpointed else ""))
    loop = _Loop(cfg, step, train, state, logger, evaluate, callbacks, run_dir, n_steps)
    if ckpt is not None:  # the run's evaluations so far (every rank gets rank 0's, so they agree on what is left)
        loop.saved_step = state.step
        loop.evals = ctx.on_main(lambda: restored_evals(logger.rows, state.step))
        loop.last_val_ppl = loop.evals[-1].get("val_ppl", math.nan) if loop.evals else math.nan
    try:
        loop.run()
        wrapped.finish()
    finally:
        wrapped.release()
    result = FitResult(
        best_val_ppl=state.best_metric, final_val_ppl=loop.last_val_ppl, steps=state.step, tokens=state.tokens,
        seconds=state.elapsed_s, tokens_per_s=state.tokens / max(state.elapsed_s, 1e-9),
        peak_memory_mb=peak_memory_mb(device), trainable_params=trainable, total_params=total,
        stopped_early=state.stopped_early, evals=loop.evals, run_dir=run_dir, skipped_steps=state.skipped_steps,
    )
    if logger.plot_note:
        say(logger.plot_note)
    say(f"trained {result.steps:,} steps, {result.tokens:,} tokens in {_duration(result.seconds)} of wall time "
        f"({result.tokens_per_s:,.0f} tokens/s on average)")
    return result


def _silent(message: str) -> None:
    """What ranks > 0 print."""


def restored_evals(rows: Sequence[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    """`FitResult.evals` rows of the evaluations logged in ``rows`` (metrics.jsonl) up to ``step``."""
    evals = []
    for row in rows:
        if row.get("split") == "val" and row["step"] <= step:
            metrics = {k: v for k, v in row.items() if k not in ("step", "split", "train_loss")}
            evals.append({"step": row["step"], "train_loss": row.get("train_loss"), **metrics})
    return evals


def _number(value: float) -> str:
    """A metric for a log line: integers with thousands separators, others to 4 significant digits."""
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _duration(seconds: float) -> str:
    """``1:02:03`` / ``2:03`` wall time."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _nonfinite_what(loss: float, grad_norm: float) -> str:
    """``the loss is nan`` / ``the gradient norm is inf`` / both."""
    parts = [f"the loss is {loss:g}" if not math.isfinite(loss) else "",
             f"the gradient norm is {grad_norm:g}" if not math.isfinite(grad_norm) else ""]
    return " and ".join(p for p in parts if p) or "a non-finite value"


def _nonfinite_params(params: Sequence[Tensor], ctx: DistContext) -> bool:
    """Whether any of ``params`` (this rank's shards under FSDP2) holds a NaN/inf on any rank."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    if not local:
        return False
    bad = torch.stack([~torch.isfinite(p.detach()).all() for p in local]).sum().double().reshape(1)
    return bool(ctx.all_reduce_sum(bad)[0] > 0)


def check_shards(train: BatchSource, ctx: DistContext) -> None:
    """In a distributed run the training batches must be this rank's shard of ``ctx.world_size``."""
    shards = getattr(train, "world_size", 1)
    if shards != ctx.world_size:
        raise ConfigError(f"the training batches are split into {shards} shard(s) but {ctx.world_size} ranks train; "
                          "build them with the rank's shard (e.g. WindowBatches(..., **DistContext.shard()))")


def _start(cfg: FitConfig, ckpt: Path | None, saved: tuple[dict[str, Any], dict[str, Any]] | None, step: TrainStep,
           train: BatchSource, ctx: DistContext) -> FitState:
    """A fresh state (seeded), or the one of the latest checkpoint when resuming (weights already loaded)."""
    if ckpt is None or saved is None:
        if cfg.run.resume and ctx.is_main:
            tqdm.write(f"no checkpoint in {cfg.run.out_dir}: starting from step 0")
        seed_everything(cfg.run.seed if ctx.rank == 0 else rank_seed(cfg.run.seed, ctx.rank, 0))
        train.set_epoch(0)
        return FitState()
    trainer, optimizer_state = saved
    load_optimizer_checkpoint(ckpt, lambda s: step.wrapped.load_optimizer_state(step.optimizer, s), optimizer_state)
    train.load_state_dict(trainer["data"])
    state = FitState(**trainer["fit"])
    if ctx.rank > 0:
        seed_everything(rank_seed(cfg.run.seed, ctx.rank, state.step))
    if ctx.is_main:
        tqdm.write(f"resumed from {ckpt} (step {state.step:,})")
    return state


class _Loop:
    """The loop body of `fit`, split into short methods: step, log, evaluate, checkpoint."""

    def __init__(self, cfg: FitConfig, step: TrainStep, train: BatchSource, state: FitState, logger: MetricsLogger,
                 evaluate: Callable[[], dict[str, float]] | None, callbacks: Sequence[Callback], run_dir: Path,
                 n_steps: int) -> None:
        self.cfg, self.step, self.train, self.state, self.logger = cfg, step, train, state, logger
        self.eval_fn, self.callbacks, self.run_dir, self.n_steps = evaluate, callbacks, run_dir, n_steps
        self.ctx = step.wrapped.ctx
        self.say = tqdm.write if self.ctx.is_main else _silent
        self.saved_step = -1
        self.evals: list[dict[str, Any]] = []
        self.last_val_ppl = math.nan
        self.log_loss: Tensor | float = 0.0  # summed step losses since the last log line
        self.log_tokens: Tensor | int = 0
        self.log_steps = 0
        self.eval_loss, self.eval_steps = 0.0, 0  # since the last evaluation (for the table)
        self.lr = 0.0
        # the first non-finite step not yet reported: (step, loss, grad norm), step -1 = none; read when syncing
        self.nonfinite = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64, device=step.device)
        self.best = BestWeights.load(run_dir) if cfg.eval.keep_best and cfg.run.resume else BestWeights()

    def run(self) -> None:
        state, cfg = self.state, self.cfg
        for cb in self.callbacks:
            cb.on_train_start(state, self.step.model)
        self.bar = tqdm(total=self.n_steps, initial=state.step, unit="step",
                        disable=not (cfg.run.progress and self.ctx.is_main), dynamic_ncols=True)
        self.t_mark = self.t_start = time.perf_counter()
        self.elapsed_at_start = state.elapsed_s
        try:
            self.loop()
            self.finish()
        except TrainingDiverged:
            self.bar.close()
            self.logger.close()  # the metrics up to the divergence stay readable
            raise

    def loop(self) -> None:
        """Steps until the last one (or a stop), epoch after epoch."""
        state, cfg, train = self.state, self.cfg, self.train
        while state.step < self.n_steps and not state.stop:
            micro: list[Batch] = []
            for batch in train:
                micro.append(batch)
                if len(micro) == cfg.grad_accum:
                    self.train_step(micro)
                    micro = []
                    if state.step >= self.n_steps or state.stop:
                        break
            else:
                state.epoch += 1
                train.set_epoch(state.epoch)
                for cb in self.callbacks:
                    cb.on_epoch_end(state, self.step.model)

    def train_step(self, micro: list[Batch]) -> None:
        state, cfg = self.state, self.cfg
        loss, tokens, self.lr = self.step(micro, state.step)
        state.step += 1
        if self.step.skipped:
            self.skip(loss)
        else:
            self.record_nonfinite(loss)
            self.log_loss, self.log_tokens = self.log_loss + loss, self.log_tokens + tokens
            self.log_steps += 1
        self.bar.update(1)
        evaluate = bool(cfg.eval.every) and state.step % cfg.eval.every == 0
        if state.step % cfg.run.log_every == 0 or evaluate:
            self.log_train()
        if evaluate:
            self.evaluate()
        if cfg.run.save_every and state.step % cfg.run.save_every == 0:
            self.save()
        for cb in self.callbacks:
            cb.on_step_end(state, self.step.model)

    def record_nonfinite(self, loss: Tensor) -> None:
        """Remember the first step whose loss or gradient norm is not finite, without waiting for the device."""
        now = torch.stack([torch.full((), float(self.state.step), dtype=torch.float64, device=self.step.device),
                           loss.detach().double(), self.step.grad_norm.detach().double()])
        first = (self.nonfinite[0] < 0) & ~self.step.finite
        self.nonfinite = torch.where(first, now, self.nonfinite)

    def skip(self, loss: Tensor) -> None:
        """A step whose update was dropped (optim.on_nonfinite skip): count it, stop past the limit."""
        state, limit = self.state, self.cfg.optim.max_skipped_steps
        state.skipped_steps += 1
        what = _nonfinite_what(float(loss), float(self.step.grad_norm))
        if state.skipped_steps > limit:
            raise self.diverged(f"{what} at step {state.step:,}, {state.skipped_steps} steps skipped, more than "
                                f"optim.max_skipped_steps {limit}")
        self.say(f"step {state.step:,}: {what}; update skipped ({state.skipped_steps} of at most {limit})")

    def diverged(self, what: str) -> TrainingDiverged:
        """The one-line error that ends a run whose training is no longer finite."""
        last = latest_checkpoint(self.run_dir) if self.ctx.is_main else None
        kept = f"the last checkpoint {last} is finite" if last is not None else "no checkpoint was written"
        return TrainingDiverged(
            f"training diverged: {what}; the run stopped and wrote nothing non-finite ({kept}); lower --optim.lr, "
            "raise --schedule.warmup-steps or set --optim.grad-clip (or --optim.on-nonfinite skip)")

    def check_nonfinite(self, count: float) -> None:
        """Raise `TrainingDiverged` when ``count`` (summed over ranks) non-finite steps were recorded."""
        if count > 0:
            step, loss, norm = self.nonfinite.tolist()
            where = f" at step {int(step):,}" if step >= 0 else " on another rank"
            raise self.diverged(f"{_nonfinite_what(loss, norm)}{where}")

    def check_weights(self) -> None:
        """Raise `TrainingDiverged` when a trained weight is NaN/inf on any rank (before it could be saved)."""
        if _nonfinite_params(self.step.params, self.ctx):
            raise self.diverged(f"a trained weight is not finite after step {self.state.step:,}")

    def log_train(self) -> None:
        """Sync once: mean loss (over ranks too) and tokens/s of all ranks since the last log line."""
        bad = (self.nonfinite[0] >= 0).double()
        if not self.log_steps:
            self.check_nonfinite(float(self.ctx.all_reduce_sum(bad.reshape(1))[0]))
            return
        sums = torch.stack([torch.as_tensor(v, device=self.step.device).double()
                            for v in (self.log_loss, self.log_tokens)] + [bad])
        loss_sum, token_sum, bad_sum = self.ctx.all_reduce_sum(sums).tolist()
        self.check_nonfinite(bad_sum)
        now = time.perf_counter()
        loss = loss_sum / self.ctx.world_size / self.log_steps
        tokens = int(token_sum)
        self.state.tokens += tokens
        self.state.elapsed_s = self.elapsed_at_start + now - self.t_start
        rate = tokens / max(now - self.t_mark, 1e-9)
        self.logger.log({"step": self.state.step, "split": "train", "loss": loss, "lr": self.lr,
                         "tokens": self.state.tokens, "tokens_per_s": rate, "elapsed_s": self.state.elapsed_s})
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", lr=f"{self.lr:.2e}", refresh=False)
        self.eval_loss += loss * self.log_steps
        self.eval_steps += self.log_steps
        self.log_loss, self.log_tokens, self.log_steps, self.t_mark = 0.0, 0, 0, now

    def evaluate(self) -> None:
        if self.eval_fn is None:
            return
        t0 = time.perf_counter()
        metrics = self.eval_fn()
        self.t_mark += time.perf_counter() - t0  # evaluation time is not training throughput
        self.bar.unpause()  # nor is it in the bar's rate and ETA
        self.state.eval_s += time.perf_counter() - t0
        state = self.state
        train_loss = self.eval_loss / self.eval_steps if self.eval_steps else None  # None: no step since the last
        self.eval_loss, self.eval_steps = 0.0, 0
        bad = {k: v for k, v in metrics.items() if k in ("val_loss", "val_ppl") and not math.isfinite(v)}
        if bad:
            raise self.diverged(f"the validation metrics {bad} are not finite at step {state.step:,}")
        row = {"step": state.step, "train_loss": train_loss, **metrics}
        self.evals.append(row)
        self.logger.log({"step": state.step, "split": "val", "train_loss": train_loss, **metrics})
        self.logger.flush()
        ppl = metrics.get("val_ppl", math.nan)
        self.last_val_ppl = ppl
        self.say(f"step {state.step:>7,} | train loss {format_loss(train_loss)} | "
                 + " | ".join(f"{k.replace('_', ' ')} {_number(v)}" for k, v in metrics.items()))
        if ppl < state.best_metric - self.cfg.eval.min_delta:
            state.best_metric, state.bad_evals = ppl, 0
            self.keep(ppl)
        else:
            state.bad_evals += 1
            if self.cfg.eval.patience and state.bad_evals >= self.cfg.eval.patience:
                self.say(f"early stop: val ppl has not improved by > {self.cfg.eval.min_delta} for "
                         f"{state.bad_evals} evaluations (best {state.best_metric:.4g})")
                state.stop = state.stopped_early = True
        for cb in self.callbacks:
            cb.on_eval(state, self.step.model, metrics)

    def save(self) -> None:
        """Rank 0 writes the full model and optimizer state (under FSDP2 every rank helps gather them)."""
        self.log_train()  # the saved token count and time are exact at this step
        self.check_weights()
        self.saved_step = self.state.step
        wrapped = self.step.wrapped
        if not (self.ctx.is_main or wrapped.collective_state):
            return
        t0 = time.perf_counter()
        module, optimizer_state = wrapped.model_to_save(), wrapped.optimizer_state(self.step.optimizer)
        if module is not None:
            trainer = {"fit": asdict(self.state), "data": self.train.state_dict()}
            save_training_checkpoint(self.run_dir, self.state.step, module, optimizer_state, trainer,
                                     self.cfg.run.keep_checkpoints)
        self.t_mark += time.perf_counter() - t0  # like an evaluation: not in tokens/s,
        self.bar.unpause()  # nor in the bar's rate and ETA

    def finish(self) -> None:
        self.log_train()
        self.check_weights()
        last_eval = self.evals[-1]["step"] if self.evals else -1
        if last_eval != self.state.step:
            self.evaluate()
        if self.saved_step != self.state.step:
            self.save()
        self.bar.close()
        self.logger.close()
        if self.cfg.eval.keep_best and self.best.step != self.state.step and self.best.restore(self.step.model):
            self.say(f"restored the weights of the best evaluation: step {self.best.step:,}, "
                     f"val ppl {self.best.val_ppl:.4g} (the last, step {self.state.step:,}: {self.last_val_ppl:.4g})")
        for cb in self.callbacks:
            cb.on_train_end(self.state, self.step.model)

    def keep(self, ppl: float) -> None:
        """``eval.keep_best``: snapshot the trainable weights of a new best evaluation (rank 0 also on disk)."""
        if not self.cfg.eval.keep_best:
            return
        self.best.snapshot(self.step.model, self.state.step, ppl)
        if self.ctx.is_main:
            self.best.save(self.run_dir)
