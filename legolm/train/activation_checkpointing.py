"""Activation checkpointing per block: keep less of the forward for backward, recompute the rest.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost" (arXiv:1604.06174): store the
activations at a few boundaries only and recompute each segment's forward when its backward needs
it. Here a segment is one transformer block (``run.activation_checkpointing``)::

    none        every block keeps what autograd saves (fastest, most memory)
    blocks      each block keeps only its input; its whole forward runs again in backward
                (about one more forward per step; activation memory ~ one block + the block inputs)
    selective   each block keeps the outputs of its matmuls and fused attention kernels and
                recomputes the rest in backward: norms, RoPE, activation functions, residual adds,
                the GLU product (cheap ops, large outputs)

``selective`` is operator-level selective checkpointing (PyTorch's
``create_selective_checkpoint_contexts``), the idea of torchtitan's ``selective_ac_option: op``
(torchtitan/distributed/activation_checkpoint.py). torchtitan saves every *other* ``mm`` and
recomputes the rest; this variant saves every matmul (``mm``, ``addmm``, ``bmm``) and every fused
attention output: no matmul runs twice, so its extra compute is the pointwise ops only, and it
saves less memory than ``blocks``. (Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models", arXiv:2205.05198, recompute the attention core instead; with fused
SDPA kernels there is no T x T matrix to drop.)

Where it applies: `apply_activation_checkpointing` gives every block (each element of a
``blocks`` / ``h`` / ``layers`` ModuleList, as FSDP2 shards them) a subclass whose ``forward``
runs the original one under `torch.utils.checkpoint.checkpoint` (non-reentrant). The module
keeps its parameters, names and ``isinstance`` type, so state dicts, optimizer state, LoRA
injection and LEGO's block indexing see nothing new; FSDP2's ``fully_shard`` then wraps the same
block (its all-gather hooks stay outside the checkpointed region, torchtitan's order) and
``torch.compile`` traces the checkpoint as one higher-order op. `fit` applies it to the model it
trains (`legolm.train.distributed.Wrapped`) and takes it off again afterwards.

A block recomputes only when autograd records (no effect under ``torch.no_grad`` or in
evaluation). It refuses, with a `ConfigError`, what a recomputation would get wrong: a block
given a cache (it writes the cache in its forward: LCT's sequential training) and a memory layer
carrying its memory across calls (``carry_memory``: its forward changes the carried state).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from legolm.core.context import LayerContext
from legolm.errors import ConfigError
from legolm.layers.memory import MemoryLayer

ActivationCheckpointing = Literal["none", "blocks", "selective"]
MODES: tuple[str, ...] = get_args(ActivationCheckpointing)
# The ModuleLists whose elements are blocks: legolm's (blocks), transformers' GPT-2 (h) and Llama /
# GPT-NeoX (layers) stacks, so peer models get the same treatment (FSDP2 shards these one by one).
BLOCK_LISTS = ("blocks", "h", "layers")
# aten ops whose outputs ``selective`` keeps (the rest is recomputed): matmuls and the fused
# attention kernels of CUDA and CPU. Names missing from a torch build are skipped.
SAVED_OPS = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable")
MEMORY_ATTR = "_ac_memory_layers"  # the block's memory layers, checked for `carry` before recomputing


def block_modules(root: nn.Module) -> list[nn.Module]:
    """Every element of a ModuleList named in `BLOCK_LISTS` under ``root``, in module order."""
    return [block for name, m in root.named_modules() if name.split(".")[-1] in BLOCK_LISTS
            and isinstance(m, nn.ModuleList) for block in m]


def _saved_ops() -> frozenset[Any]:
    """The `SAVED_OPS` that this torch build has, as op overloads (``.default``)."""
    ops = (getattr(torch.ops.aten, name, None) for name in SAVED_OPS)
    return frozenset(op.default for op in ops if op is not None and hasattr(op, "default"))


_SAVED = _saved_ops()


def _save_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """``selective``'s policy: keep matmul and fused-attention outputs, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in _SAVED else CheckpointPolicy.PREFER_RECOMPUTE


# one function object for every call: torch.compile guards on it and would recompile for a new one
_SELECTIVE_CONTEXT = partial(create_selective_checkpoint_contexts, _save_matmuls)


def _recompute_guard(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise `ConfigError` when recomputing ``block``'s forward would not reproduce it."""
    legolm_block = len(args) > 1 and isinstance(args[1], LayerContext)  # block(x, ctx, cache); peers' differ
    cache = (args[2] if len(args) > 2 else kwargs.get("cache")) if legolm_block else None
    if cache is not None:
        raise ConfigError("activation checkpointing recomputes each block's forward in backward, but this block was "
                          f"given a cache ({type(cache).__name__}) that its forward writes (e.g. LCT's sequential "
                          "training): the recomputation would write it twice; use --run.activation-checkpointing none")
    if any(layer.carry for layer in getattr(block, MEMORY_ATTR, ())):
        raise ConfigError("activation checkpointing recomputes each block's forward in backward, but a memory layer "
                          "carries its memory across calls (carry_memory): the recomputation would start from the "
                          "updated memory; train without carry_memory or use --run.activation-checkpointing none")


def _checkpointed_class(base: type[nn.Module], mode: str) -> type[nn.Module]:
    """``base`` with its forward run under `checkpoint` as ``mode`` says (one class per (base, mode))."""
    key = (base, mode)
    if key in _CLASSES:
        return _CLASSES[key]
    original: Callable[..., Any] = base.forward
    selective = mode == "selective"

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation, generation: nothing is kept for backward anyway
            return original(self, *args, **kwargs)
        _recompute_guard(self, args, kwargs)
        if selective:
            return checkpoint(original, self, *args, use_reentrant=False, context_fn=_SELECTIVE_CONTEXT, **kwargs)
        # no context_fn at all: torch.compile (2.13) cannot trace checkpoint given the default noop_context_fn
        return checkpoint(original, self, *args, use_reentrant=False, **kwargs)

    forward.__doc__ = f"{base.__name__}.forward under activation checkpointing ({mode})."
    cls = type(f"Checkpointed{base.__name__}", (base,), {"forward": forward, "_ac_base": base, "_ac_mode": mode})
    _CLASSES[key] = cls
    return cls


_CLASSES: dict[tuple[type[nn.Module], str], type[nn.Module]] = {}


def checkpointing_mode(block: nn.Module) -> str:
    """``none``, ``blocks`` or ``selective``: how ``block`` is checkpointed now."""
    return str(getattr(type(block), "_ac_mode", "none"))


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """Checkpoint every block of ``model`` as ``mode`` says (in place); return how many blocks.

    ``none`` leaves the model as it is (and takes off an earlier setting). Apply before
    ``fully_shard`` / DDP, so their hooks sit outside the checkpointed forward.

    Raises:
        ConfigError: An unknown mode, or a model without blocks to checkpoint.
    """
    if mode not in MODES:
        raise ConfigError(f"run.activation_checkpointing must be one of {', '.join(MODES)}, got {mode!r}")
    remove_activation_checkpointing(model)
    if mode == "none":
        return 0
    blocks = block_modules(model)
    if not blocks:
        raise ConfigError("activation checkpointing works on the blocks of a ModuleList named "
                          f"{' / '.join(BLOCK_LISTS)}; {type(model).__name__} has none: use "
                          "--run.activation-checkpointing none")
    for block in blocks:
        setattr(block, MEMORY_ATTR, [m for m in block.modules() if isinstance(m, MemoryLayer)])
        block.__class__ = _checkpointed_class(type(block), mode)
    return len(blocks)


def remove_activation_checkpointing(model: nn.Module) -> None:
    """Give every checkpointed block of ``model`` its own class back (a no-op on plain blocks)."""
    for block in block_modules(model):
        base = type(block).__dict__.get("_ac_base")
        if base is not None:
            block.__class__ = base
            if MEMORY_ATTR in block.__dict__:
                delattr(block, MEMORY_ATTR)

