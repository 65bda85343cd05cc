"""Distributed training under ``torchrun``: DDP, or FSDP2 (`fully_shard`) for models too big for one GPU.

One process per GPU (or per CPU shard with gloo); ``torchrun`` sets RANK, WORLD_SIZE and
LOCAL_RANK, `init_distributed` reads them (once per process) and every training command runs
unchanged::

    torchrun --nproc_per_node 2 -m legolm.cli.main pretrain --config c.yaml --run.strategy ddp

What `fit` does with it::

    rank r:  WindowBatches(rank=r) ─▶ micro-batches ─▶ runner(loss_fn, batch) ─▶ backward
                                                        │
             runner = DDP(LossModule(model))            │ gradients all-reduced on the last
                    | fully_shard(LossModule(copy))     │ micro-batch only (no_sync /
                      (each block sharded, then root)   │ set_requires_gradient_sync)
                                                        ▼
             AdamW on this rank's parameters (DDP: all of them, identical; FSDP2: its shards)

Every call of the model goes through the wrapper: `LossModule` runs ``fn(model, *args)`` inside
its ``forward``, so a custom loss that calls model methods other than ``forward`` (Skip2-LoRA's
``features``/``head``, LEGO's ``upper_hidden``, LCT's cached forward) still gets DDP's gradient
all-reduce and FSDP2's parameter all-gathers, and sees the plain module it expects.

FSDP2 shards a copy of the model (the caller's model stays whole in host memory); `fit` loads the
trained weights back into the caller's model at the end, so everything after `fit` (evaluation,
saving, a second phase) works on a plain module.

Rank 0 alone writes the run directory, metrics, progress and checkpoints; checkpoints hold the
consolidated (full) model and optimizer state keyed by parameter name, and the data position as
windows consumed, so a run resumes on any number of ranks.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import gc
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from legolm.errors import ConfigError, LegolmError
from legolm.train.activation_checkpointing import (
    apply_activation_checkpointing,
    block_modules,
    remove_activation_checkpointing,
)
from legolm.train.config import RunConfig, uses_bf16
from legolm.train.optim import plain_rates
from legolm.utils.device import resolve_device

T = TypeVar("T")
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class Shard(TypedDict):
    """Which shard of the data a rank reads: keyword arguments of `WindowBatches`."""

    rank: int
    world_size: int


def launched() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) set by ``torchrun``, or None in a plain process."""
    if not all(k in os.environ for k in ENV_KEYS):
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def quiet_other_ranks() -> None:
    """Under ``torchrun``, send the stdout of ranks > 0 to /dev/null (errors still reach stderr)."""
    env = launched()
    if env is not None and env[0] > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job.

    Attributes:
        rank: Global rank (0 in a plain process).
        world_size: Number of processes.
        local_rank: Rank on this node (selects the GPU).
        strategy: none, ddp or fsdp2.
        device: The device this rank computes on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group is up (strategy ddp or fsdp2)."""
        return self.strategy != "none"

    def run_device(self, name: str) -> torch.device:
        """Where a run computes: this rank's device under a process group, else the ``run.device``
        setting ``name`` resolved (`resolve_device`)."""
        return self.device if self.distributed else resolve_device(name)

    def shard(self) -> Shard:
        """``rank`` and ``world_size`` keyword arguments for a batch source (`WindowBatches`)."""
        return {"rank": self.rank, "world_size": self.world_size}

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. fills a shared cache), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and give every rank its result; a `LegolmError` is raised on all."""
        if not self.distributed:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except LegolmError as err:
                box[0] = ("error", err)
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def all_reduce_sum(self, values: Tensor) -> Tensor:
        """Elementwise sum over ranks of a small float64 vector (a copy; the input is untouched)."""
        out = values.detach().to(self.device, torch.float64).clone()
        if self.distributed and self.world_size > 1:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


_CONTEXT: DistContext | None = None


def all_gather_cat(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Each tensor concatenated over ranks along dim 0, in rank order (the same shape on every rank).

    What a per-window cache filled in the loss needs to hold every rank's windows, as one process
    would (LCT's lagged states); in a plain process the tensors come back as they are.
    """
    ctx = current()
    if not ctx.distributed or ctx.world_size == 1:
        return tensors
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    return tuple(out)


def current() -> DistContext:
    """The context `init_distributed` set up (a single-process one before that)."""
    return _CONTEXT if _CONTEXT is not None else DistContext()


def _rank_device(run: RunConfig, local_rank: int) -> torch.device:
    if run.device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"under torchrun each rank picks its device (cuda:LOCAL_RANK or cpu); give run.device "
                          f"auto, cuda or cpu, not {run.device!r}")
    if run.device == "cpu" or (run.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LegolmError("run.device cuda was asked for but no CUDA GPU is visible; use --run.device cpu")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                          "lower --nproc_per_node")
    return torch.device("cuda", local_rank)


def init_distributed(run: RunConfig) -> DistContext:
    """Join the ``torchrun`` job as ``run.strategy`` says (once per process; later calls return the same).

    Raises:
        ConfigError: A strategy without ``torchrun``, several ranks without a strategy, or a
            second call with another strategy.
    """
    global _CONTEXT
    env = launched()
    if _CONTEXT is not None:
        if _CONTEXT.strategy != run.strategy:
            raise ConfigError(f"this process already trains with run.strategy {_CONTEXT.strategy}; "
                              f"one process cannot switch to {run.strategy}")
        return _CONTEXT
    if run.strategy == "none":
        if env is not None and env[1] > 1:
            raise ConfigError(f"torchrun started {env[1]} ranks but run.strategy is none; pass --run.strategy "
                              "ddp (or fsdp2)")
        return DistContext()
    if env is None:
        raise ConfigError(f"run.strategy {run.strategy} needs torchrun: torchrun --nproc_per_node N -m "
                          "legolm.cli.main <command> ... (or --run.strategy none)")
    rank, world, local = env
    device = _rank_device(run, local)
    backend = run.backend if run.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("run.backend nccl needs CUDA devices; use --run.backend gloo (or auto) on CPU")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        atexit.register(teardown)
    _CONTEXT = DistContext(rank, world, local, run.strategy, device)
    return _CONTEXT


def teardown(wait: bool = False) -> None:
    """Leave the process group (at exit, registered by `init_distributed`).

    Args:
        wait: First wait for every rank (a clean exit: no rank leaves while another still works
            with the group); the exit of a failing rank must not wait.
    """
    global _CONTEXT
    if dist.is_initialized():
        # Free what still holds the group's pending work (FSDP2's sharded copy sits in reference cycles) while the
        # interpreter is alive: gloo work freed at interpreter exit, after the group, can abort the process
        # ("terminate called without an active exception").
        gc.collect()
        if wait:
            dist.barrier()
        dist.destroy_process_group()
    _CONTEXT = None


class LossModule(nn.Module):
    """``forward(fn, *args) = fn(model, *args)``: any call of the model, as one wrappable forward.

    DDP and FSDP2 hook a module's ``forward``; wrapping this module instead of the model puts
    the whole loss (or evaluation) inside that forward, whatever model methods it calls.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


PREFIX = "model."  # LossModule's name for the model in state dicts


def _strip(state: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix(PREFIX): v for k, v in state.items()}


class Wrapped:
    """A model as `fit` trains it: the module with the live weights and the forward entry point.

    A plain process (strategy none) uses the model itself through an unwrapped `LossModule`.

    Args:
        model: The caller's model, on its training device.
        ctx: The job (`init_distributed`).
        run: Run settings (DDP's ``find_unused_parameters``, FSDP2's ``reshard_after_forward``, the
            activation checkpointing of the blocks, applied to the trained module before DDP / ``fully_shard``).
    """

    def __init__(self, model: nn.Module, ctx: DistContext | None = None, run: RunConfig | None = None) -> None:
        self.ctx, self.original = ctx or DistContext(), model
        self.strategy = self.ctx.strategy
        run = run or RunConfig()
        self.checkpointing = run.activation_checkpointing  # and `checkpointed`: how many blocks it applies to
        if self.strategy == "fsdp2":
            self.model = _fsdp2_copy(model, self.ctx)
            self.checkpointed = apply_activation_checkpointing(self.model, run.activation_checkpointing)  # the copy
            self.loss_module = LossModule(self.model)
            self.runner: nn.Module = _fully_shard(self.loss_module, self.ctx, run)
        else:
            self.model, self.loss_module = model, LossModule(model)
            self.checkpointed = apply_activation_checkpointing(model, run.activation_checkpointing)  # see `release`
            self.runner = self.loss_module
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            # buffers are synced once here; legolm's (RoPE tables) never change, so no broadcast per forward
            self.runner = DDP(self.loss_module, device_ids=ids, broadcast_buffers=False, gradient_as_bucket_view=True,
                              find_unused_parameters=run.find_unused_parameters)

    @contextlib.contextmanager
    def grad_sync(self, enabled: bool) -> Iterator[None]:
        """Forward and backward inside: reduce gradients across ranks only when ``enabled``."""
        if self.strategy == "ddp" and not enabled:
            with self.runner.no_sync():  # type: ignore[operator]
                yield
            return
        if self.strategy == "fsdp2":
            self.runner.set_requires_gradient_sync(enabled)  # type: ignore[operator]
        yield

    def call(self, fn: Callable[[nn.Module], T]) -> T:
        """``fn(model)`` without gradients where the weights are whole (FSDP2: inside the root forward)."""
        with torch.no_grad():
            if self.strategy != "fsdp2":
                return fn(self.model)
            out: T = self.runner(fn)
        self.reshard()
        return out

    def reshard(self) -> None:
        """FSDP2 keeps the root's weights gathered after a forward without backward; free them."""
        if self.strategy == "fsdp2":
            self.runner.reshard()  # type: ignore[operator]

    # -- checkpoints -----------------------------------------------------------------------------------
    @property
    def collective_state(self) -> bool:
        """Every rank must take part in `model_to_save` / `optimizer_state` (FSDP2 gathers shards)."""
        return self.strategy == "fsdp2"

    def model_to_save(self) -> nn.Module | None:
        """A plain module holding the full current weights on rank 0 (None on the other ranks)."""
        if self.strategy != "fsdp2":
            return self.model if self.ctx.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self.reshard()
        full = get_model_state_dict(self.runner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.ctx.is_main:
            return None
        self.original.load_state_dict(_strip(full))
        return self.original

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state keyed by parameter name (whole tensors, on CPU): the same for any world size."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        self.reshard()
        full = self.strategy == "fsdp2"
        options = StateDictOptions(full_state_dict=full, cpu_offload=full)
        return plain_rates(get_optimizer_state_dict(self.loss_module if not full else self.runner, optimizer,
                                                    options=options))

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a state from `optimizer_state` (saved on any number of ranks) into this rank's optimizer."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            _init_optim_state,
            set_optimizer_state_dict,
        )

        full = self.strategy == "fsdp2"
        if full:
            _init_optim_state(optimizer)  # (private, torch >= 2.2) the full-state path fills existing sharded state
        set_optimizer_state_dict(self.loss_module if not full else self.runner, optimizer, state,
                                 options=StateDictOptions(full_state_dict=full))

    def release(self) -> None:
        """Give the caller's model back as it came: its blocks lose activation checkpointing (no collectives)."""
        if self.strategy != "fsdp2":  # FSDP2 checkpointed its own copy
            remove_activation_checkpointing(self.original)

    def finish(self) -> None:
        """FSDP2: gather the trained weights into the caller's model on every rank and move it to the device."""
        if self.strategy != "fsdp2":
            return
        self.reshard()
        target = self.original.state_dict()
        with torch.no_grad():
            for name, value in _strip(self.runner.state_dict()).items():
                whole = value.full_tensor() if hasattr(value, "full_tensor") else value
                target[name].copy_(whole)
        self.original.to(self.ctx.device)


def _fsdp2_copy(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The copy FSDP2 shards, with rank 0's weights; both stay in host memory (`fully_shard` moves
    each block's shards to the GPU), tensor by tensor through the device for NCCL."""
    model.cpu()
    shadow = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in [*shadow.parameters(), *shadow.buffers()]:
            on_device = tensor.data.to(ctx.device)
            dist.broadcast(on_device, src=0)
            tensor.data.copy_(on_device)
    return shadow


def _fully_shard(loss_module: LossModule, ctx: DistContext, run: RunConfig) -> nn.Module:
    """FSDP2: shard every block (each element of a `BLOCK_LISTS` ModuleList) on its own, then the rest as the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    mp = _mixed_precision(ctx.device, run.precision)
    for block in block_modules(loss_module):
        fully_shard(block, mesh=mesh, reshard_after_forward=run.reshard_after_forward, mp_policy=mp)
    fully_shard(loss_module, mesh=mesh, mp_policy=mp)
    return loss_module


def _mixed_precision(device: torch.device, precision: str) -> Any:
    """bf16-mixed: FSDP2 gathers and computes with bf16 copies of the fp32 shards and reduces gradients
    in fp32 (half the all-gather traffic; the optimizer still steps fp32 master weights)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if uses_bf16(device.type, precision):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()
