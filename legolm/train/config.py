"""Training configuration: nested dataclasses whose fields are YAML keys and CLI flags.

``FitConfig`` is everything the training loop `fit` reads (loop sizes, optimizer, schedule,
evaluation, run directory); ``TrainConfig`` adds the model and data that ``legolm pretrain``
builds. Other commands (fine-tuning) extend ``FitConfig`` the same way.

In YAML each nested dataclass is a section, on the command line a dotted prefix::

    optim:                        --optim.lr 3e-4
      lr: 3.0e-4                  --model.layers pythia pythia pythia pythia
    model:                        --run.out-dir runs/tiny --overwrite
      preset: pythia-14m
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from legolm.core.config import PRESETS, ModelConfig
from legolm.data.tokenized import DataConfig
from legolm.errors import ConfigError
from legolm.eval.sanity import PPLBands
from legolm.kernels import triton_unavailable
from legolm.utils.device import check_device_name, planned_device

MAX_SEED = 2**32 - 1  # NumPy's legacy global seeding (np.random.seed) takes seeds in [0, 2**32 - 1]
MAX_SAMPLE_SEED = 2**64 - 1  # a torch.Generator takes seeds in [0, 2**64 - 1]
# loss_chunk_tokens when left unset and the softmax step runs in Triton: on the H200 (2026-11-30) the chunked loss
# at 4,096 tokens with the Triton step was as fast as the compiled whole-logits loss or faster (pretraining
# 1.01x, LoRA 1.00x, linear + cross-entropy alone 0.92x the time) with 1 GB less peak memory
# (docs/results/benchmarks.md, "the chunked loss as the GPU default")
AUTO_LOSS_CHUNK = 4096


def uses_bf16(device_type: str, precision: str) -> bool:
    """Whether ``precision`` (a `RunConfig.precision`) computes in bf16 on a ``device_type`` device."""
    return precision == "bf16-mixed" or (precision == "auto" and device_type == "cuda")

@dataclass
class OptimConfig:
    """AdamW settings.

    Attributes:
        lr: Peak learning rate (after warmup).
        beta1: AdamW first-moment decay.
        beta2: AdamW second-moment decay.
        eps: AdamW denominator epsilon.
        weight_decay: Decoupled weight decay on >= 2-D parameters (matrices, embeddings).
        grad_clip: Clip the global gradient norm to this (0 = no clipping).
        fused: The fused AdamW kernel: --optim.fused on, --no-optim.fused off, --optim.fused auto (YAML: true,
            false, auto or null; None in Python) uses it on CUDA only.
        on_nonfinite: A NaN/inf loss or gradient norm: stop (the run ends with an error) or skip (drop that update).
        max_skipped_steps: With on_nonfinite skip, end the run with an error once more steps than this are skipped.
    """

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    fused: bool | None = None
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10

    def checks(self) -> list[tuple[bool, str]]:
        """(ok, message) of each setting: finite, in range (NaN fails every comparison)."""
        return [
            (0 < self.lr < math.inf, f"optim.lr must be > 0 and finite, got {self.lr}"),
            (0 <= self.weight_decay < math.inf,
             f"optim.weight_decay must be >= 0 and finite, got {self.weight_decay}"),
            (0 < self.eps < math.inf, f"optim.eps must be > 0 and finite (e.g. 1e-8), got {self.eps}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
             f"optim.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}"),
            (0 <= self.grad_clip < math.inf,
             f"optim.grad_clip must be >= 0 and finite (0 = off), got {self.grad_clip}"),
            (self.max_skipped_steps >= 0, f"optim.max_skipped_steps must be >= 0, got {self.max_skipped_steps}"),
        ]


def _raise_first(checks: list[tuple[bool, str]]) -> None:
    """Raise `ConfigError` with the message of the first failed (ok, message) check."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup then decay.

    Attributes:
        warmup_steps: Steps of linear warmup from lr/warmup_steps to lr.
        decay: Shape after warmup: cosine, linear or constant.
        min_lr_ratio: Learning rate at the last step, as a fraction of optim.lr.
    """

    warmup_steps: int = 100
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1


@dataclass
class EvalConfig:
    """Validation during training, and early stopping on validation perplexity.

    Attributes:
        every: Evaluate every this many optimizer steps (0 = only at the end).
        max_batches: Validation batches per evaluation, over all ranks when they are sharded (None = the whole split).
        batch_size: Sequences per validation batch (None = the training batch size).
        patience: Stop after this many evaluations without improvement (0 = never stop early).
        min_delta: A validation perplexity must drop by more than this to count as an improvement.
        keep_best: When training ends, restore the trainable weights of the best evaluation (Hugging Face's
            ``load_best_model_at_end``); with ``patience`` this is early stopping that keeps the best model.
        final_stride: Stride of the final sliding-window perplexity (None = half the window).
        ppl_bands: Bands of the sanity check printed under the command's perplexities (legolm.eval.sanity).
    """

    every: int = 100
    max_batches: int | None = None
    batch_size: int | None = None
    patience: int = 0
    min_delta: float = 0.0
    keep_best: bool = False
    final_stride: int | None = None
    ppl_bands: PPLBands = field(default_factory=PPLBands)


@dataclass
class RunConfig:
    """Where and how a run executes.

    Attributes:
        out_dir: Run directory (config, metrics, checkpoints, final model).
        overwrite: Replace an existing run directory.
        resume: Continue from the latest checkpoint in out_dir (starts fresh when there is none).
        seed: Seed of weights init, data order and every RNG.
        device: cpu, cuda, cuda:N or auto.
        precision: auto (bf16-mixed on CUDA, fp32 on CPU), fp32 or bf16-mixed (autocast).
        compile: torch.compile the loss (forward and backward) of each step.
        compile_mode: torch.compile mode (default, reduce-overhead = CUDA graphs, max-autotune-no-cudagraphs, ...).
        tf32: Allow TF32 matmuls on CUDA for the fp32 parts.
        log_every: Steps between train-loss log lines (each costs one device sync).
        save_every: Steps between checkpoints (0 = only at the end).
        keep_checkpoints: Checkpoints kept in out_dir/checkpoints (older ones are deleted).
        progress: Show a tqdm progress bar.
        plot: Write loss.png (needs matplotlib; skipped with a note when missing).
        tensorboard: Also log to TensorBoard in out_dir/tb (needs the tensorboard package).
        strategy: Multi-process training under torchrun: none, ddp (replicas) or fsdp2 (sharded weights, fully_shard).
        backend: Process-group backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo.
        find_unused_parameters: DDP: let trainable parameters go without a gradient in a step (slower).
        reshard_after_forward: FSDP2: free each block's gathered weights after its forward (less memory, more traffic).
        activation_checkpointing: Recompute activations in backward instead of keeping them, per block: none,
            blocks (keep each block's input, rerun its forward) or selective (keep matmul and attention outputs,
            recompute norms and pointwise ops); see legolm.train.activation_checkpointing.
        cuda_graph: Replay each training step as one CUDA graph once the loss allows it (a Skip2-LoRA step
            once its Skip-Cache is full on the GPU; a plain next-token step always): no host launch cost per
            kernel (legolm.train.step_graph). One process on a CUDA device.
        cuda_graph_warmup: Eager steps before the capture (lazy set-up happens outside the graph).
    """

    out_dir: str = "runs/pretrain"
    overwrite: bool = False
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16-mixed"] = "auto"
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    tf32: bool = True
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    progress: bool = True
    plot: bool = True
    tensorboard: bool = False
    strategy: Literal["none", "ddp", "fsdp2"] = "none"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    find_unused_parameters: bool = False
    reshard_after_forward: bool = True
    activation_checkpointing: Literal["none", "blocks", "selective"] = "none"
    cuda_graph: bool = False
    cuda_graph_warmup: int = 2

    def graph_checks(self, on_nonfinite: str) -> list[tuple[bool, str]]:
        """(ok, message) of ``cuda_graph`` against the other settings (`FitConfig.validate`)."""
        warmup = [(self.cuda_graph_warmup >= 1, f"run.cuda_graph_warmup must be >= 1, got {self.cuda_graph_warmup}")]
        if not self.cuda_graph:
            return warmup
        off = "; or leave run.cuda_graph off"
        return [
            *warmup,
            (planned_device(self.device).type == "cuda",
             f"run.cuda_graph needs a CUDA device, run.device is {self.device!r} here{off}"),
            (self.strategy == "none",
             f"run.cuda_graph runs in one process, not under run.strategy {self.strategy}{off}"),
            (on_nonfinite != "skip", "run.cuda_graph cannot skip a non-finite step (the check waits for the device "
                                     f"between kernels of the step): use optim.on_nonfinite stop{off}"),
            (not (self.compile and self.compile_mode == "reduce-overhead"),
             f"run.cuda_graph captures the whole step; compile_mode reduce-overhead captures its own graphs inside "
             f"it: use compile_mode default{off}"),
        ]


@dataclass
class FitConfig:
    """What the training loop `fit` reads.

    Attributes:
        window: Tokens per training sequence.
        batch_size: Sequences per micro-batch, per rank (N ranks step like one process of N x batch_size).
        grad_accum: Micro-batches per optimizer step.
        max_steps: Optimizer steps (None = as many as epochs gives).
        epochs: Passes over the training data (None = as many as max_steps gives; both = the fewer steps).
        loss_chunk_tokens: Next-token losses score this many positions at a time through the LM head,
            so the (tokens x vocabulary) logits never exist whole (0 = all at once). Same loss and
            gradients; far less peak memory for large vocabularies (`legolm.train.head_loss`). None (the
            default): `AUTO_LOSS_CHUNK` where the softmax step runs in Triton and the model has an LM head,
            else 0.
        loss_kernel: The chunked loss's softmax step: torch ops, or one Triton kernel per chunk (the logits
            stay in the matmul's dtype; needs Triton: a CUDA GPU, or TRITON_INTERPRET=1 on a CPU); auto (the
            default): Triton on a CUDA GPU where Triton is installed, else torch.
        loss_vocab_chunk: With ``loss_chunk_tokens``: the head weight's gradient in a second pass over this
            many vocabulary entries at a time, recomputing their logits (one more GEMM), instead of an fp32
            accumulator as large as the head summed over token chunks (0 = the accumulator). The least
            memory for a large vocabulary (`legolm.train.head_loss`).
        optim: AdamW settings.
        schedule: Learning-rate schedule.
        eval: Validation and early stopping.
        run: Run directory, device, precision, logging and checkpoints.
    """

    window: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int | None = 1000
    epochs: int | None = None
    loss_chunk_tokens: int | None = None
    loss_kernel: Literal["auto", "torch", "triton"] = "auto"
    loss_vocab_chunk: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def resolved_loss_kernel(self) -> Literal["torch", "triton"]:
        """``loss_kernel`` with auto decided for the planned device: Triton on a CUDA GPU where it is installed."""
        if self.loss_kernel != "auto":
            return self.loss_kernel
        device = planned_device(self.run.device)
        return "triton" if device.type == "cuda" and triton_unavailable(device) is None else "torch"

    def resolved_loss_chunk(self) -> int:
        """``loss_chunk_tokens`` with None decided: `AUTO_LOSS_CHUNK` where the softmax step runs in Triton."""
        if self.loss_chunk_tokens is not None:
            return self.loss_chunk_tokens
        return AUTO_LOSS_CHUNK if self.resolved_loss_kernel() == "triton" else 0

    @property
    def eval_batch_size(self) -> int:
        """Sequences per validation batch: ``eval.batch_size``, else the training ``batch_size``."""
        return self.eval.batch_size or self.batch_size

    def validate(self) -> None:
        """Raise `ConfigError` naming the first invalid setting and its fix."""
        checks = [
            (self.window >= 1, f"window must be >= 1, got {self.window}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.max_steps is not None or self.epochs is not None, "set max_steps or epochs (or both)"),
            (self.loss_chunk_tokens is None or self.loss_chunk_tokens >= 0,
             f"loss_chunk_tokens must be >= 0 (0 = off), got {self.loss_chunk_tokens}"),
            (self.loss_kernel in ("auto", "torch", "triton"),
             f"loss_kernel must be auto, torch or triton, got {self.loss_kernel!r}"),
            (self.loss_vocab_chunk >= 0, f"loss_vocab_chunk must be >= 0 (0 = off), got {self.loss_vocab_chunk}"),
            (self.loss_vocab_chunk == 0 or self.resolved_loss_chunk() > 0,
             f"loss_vocab_chunk ({self.loss_vocab_chunk}) needs loss_chunk_tokens > 0: set both, "
             "or loss_vocab_chunk 0"),
            *self.optim.checks(),
            (self.schedule.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {self.schedule.warmup_steps}"),
            (0 <= self.schedule.min_lr_ratio <= 1,
             f"schedule.min_lr_ratio must be in [0, 1], got {self.schedule.min_lr_ratio}"),
            (self.eval.every >= 0, f"eval.every must be >= 0 (0 = only at the end), got {self.eval.every}"),
            (self.eval.patience >= 0, f"eval.patience must be >= 0 (0 = off), got {self.eval.patience}"),
            (self.eval.batch_size is None or self.eval.batch_size >= 1,
             f"eval.batch_size must be >= 1, got {self.eval.batch_size}"),
            (self.eval.max_batches is None or self.eval.max_batches >= 1,
             f"eval.max_batches must be >= 1, got {self.eval.max_batches}"),
            (self.eval.final_stride is None or 1 <= self.eval.final_stride <= self.window,
             f"eval.final_stride must be in [1, window={self.window}], got {self.eval.final_stride}"),
            (self.run.log_every >= 1, f"run.log_every must be >= 1, got {self.run.log_every}"),
            (self.run.save_every >= 0, f"run.save_every must be >= 0 (0 = only at the end), got {self.run.save_every}"),
            (self.run.keep_checkpoints >= 1, f"run.keep_checkpoints must be >= 1, got {self.run.keep_checkpoints}"),
            (0 <= self.run.seed <= MAX_SEED, f"run.seed must be in [0, {MAX_SEED}], got {self.run.seed}"),
            (math.isfinite(self.eval.min_delta) and self.eval.min_delta >= 0,
             f"eval.min_delta must be >= 0 and finite, got {self.eval.min_delta}"),
            (not (self.run.overwrite and self.run.resume), "--overwrite and --resume exclude each other; pick one"),
            (not (self.eval.keep_best and self.run.strategy == "fsdp2"),
             "eval.keep_best needs whole parameters on each rank: use it with run.strategy none or ddp, not fsdp2"),
        ]
        _raise_first(checks)
        check_device_name(self.run.device, "run.device")
        _raise_first(self.run.graph_checks(self.optim.on_nonfinite))
        self.eval.ppl_bands.validate("eval.ppl_bands: ")
        why = triton_unavailable(planned_device(self.run.device)) if self.loss_kernel == "triton" else None
        if why:
            raise ConfigError(f"loss_kernel triton {why}; or use loss_kernel torch")


@dataclass
class ModelSpec:
    """The model to train: a preset with overrides, or a checkpoint to start from.

    Attributes:
        preset: ModelConfig preset the sizes start from (gpt2, pythia-14m, pythia-70m, tiny-pythia, ...).
        init: Start from this checkpoint (legolm/HF directory, .gguf, hub name) instead of random weights.
        layers: Layer type of each block, bottom to top (None = the preset's).
        n_embd: Model width (None = the preset's).
        n_head: Attention heads (None = the preset's).
        intermediate_size: MLP width (None = the preset's MLP/width ratio times n_embd).
        block_size: Longest sequence the positions support (None = the preset's).
        vocab_size: Embedding rows (None = the tokenizer's vocabulary rounded up to pad_vocab_to).
        pad_vocab_to: Round an automatic vocab_size up to a multiple of this (64 suits tensor cores).
    """

    preset: str = "pythia-14m"
    init: str | None = None
    layers: list[str] | None = None
    n_embd: int | None = None
    n_head: int | None = None
    intermediate_size: int | None = None
    block_size: int | None = None
    vocab_size: int | None = None
    pad_vocab_to: int = 64

    def overrides(self) -> dict[str, object]:
        """The size fields set here (not None)."""
        names = ("layers", "n_embd", "n_head", "intermediate_size", "block_size", "vocab_size")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def model_config(self, tokenizer_vocab: int, eos_id: int | None, bos_id: int | None = None) -> ModelConfig:
        """The preset with these overrides, sized for a tokenizer of ``tokenizer_vocab`` ids."""
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown model preset {self.preset!r}; known presets: {sorted(PRESETS)}")
        if self.pad_vocab_to < 1:
            raise ConfigError(f"model.pad_vocab_to must be >= 1, got {self.pad_vocab_to}")
        base = PRESETS[self.preset]
        over = self.overrides()
        if self.n_embd is not None and self.intermediate_size is None:
            over["intermediate_size"] = base["intermediate_size"] * self.n_embd // base["n_embd"]
        if self.vocab_size is None:
            over["vocab_size"] = -(-tokenizer_vocab // self.pad_vocab_to) * self.pad_vocab_to
        return ModelConfig.from_name(self.preset, **over, eos_token_id=eos_id, bos_token_id=bos_id)


@dataclass
class SampleConfig:
    """The text sample printed after training.

    Attributes:
        prompt: Text the trained model continues (empty = no sample).
        max_new_tokens: Tokens to generate.
        temperature: Softmax temperature.
        top_k: Sample among the k most likely tokens (0 = all).
        seed: Seed of the sampling generator.
    """

    prompt: str = "Once upon a time"
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 40
    seed: int = 0

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad sample setting (before any training)."""
        _raise_first([
            (self.max_new_tokens >= 1, f"sample.max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (0 < self.temperature < math.inf,
             f"sample.temperature must be > 0 and finite, got {self.temperature}"),
            (self.top_k >= 0, f"sample.top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 <= self.seed <= MAX_SAMPLE_SEED, f"sample.seed must be in [0, {MAX_SAMPLE_SEED}], got {self.seed}"),
        ])


@dataclass
class TrainConfig(FitConfig):
    """``legolm pretrain``: `FitConfig` plus the model and data it builds, and the sample it prints.

    Attributes:
        model: Model preset and overrides.
        data: Corpus, tokenizer and split.
        sample: Text sample after training.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> None:
        super().validate()
        self.data.validate()
        self.sample.validate()
