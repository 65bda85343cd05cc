"""The persistent fused decode step: a whole batch-1 token in one kernel launch (`legolm.kernels.persistent`).

`PersistentDecodeStep` has `FusedDecodeStep`'s signature and arithmetic (the same GEMV and attention
device functions), so a `DecodeSession` captures it the same way; it replaces ~5 launches per block
by grid barriers inside one launch. It needs blocks of one shape (every block the same kind, norms,
activation and biases: the families' models are) and all weights in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import triton
from torch import Tensor

from legolm.core.kv_cache import KVCache
from legolm.errors import ConfigError
from legolm.generation.decoder import DecodeState
from legolm.generation.fused import BlockPlan, FusedDecodeStep, exit_norm, plan_block, split_k_sums
from legolm.kernels import interpreted
from legolm.model.transformer import TransformerLM


@dataclass(frozen=True)
class PersistentShape:
    """Launch shape of the persistent step.

    Attributes:
        programs: Programs (one per SM at most: the grid barrier needs them all resident); 0 = one per SM.
            Triton's CPU interpreter runs programs one after another, so it always runs one.
        num_warps: Warps per program.
        max_block_n: Most weight rows per chunk of a block's GEMV phase (a program's share, when smaller).
        tile: Weight elements per chunk (rows × K tile) of a block's GEMV phase.
        head_block_n: Weight rows per chunk of the LM head.
        head_tile: Weight elements per chunk of the LM head.
    """

    programs: int = 0
    num_warps: int = 8
    max_block_n: int = 32
    tile: int = 8192
    head_block_n: int = 32
    head_tile: int = 8192

    def validate(self) -> None:
        if self.programs < 0:
            raise ConfigError(f"persistent programs must be >= 0 (0 = one per SM), got {self.programs}")
        for name in ("num_warps", "max_block_n", "tile", "head_block_n", "head_tile"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ConfigError(f"persistent {name} must be a power of two, got {value}")


def _uniform(plans: list[BlockPlan]) -> None:
    """`ConfigError` unless every block has the first one's kind, norms, activation, biases and shapes."""
    def signature(p: BlockPlan) -> tuple[object, ...]:
        qkv = p.qkv if isinstance(p.qkv, tuple) else (p.qkv,)
        return (p.norm_1[0], p.norm_1[3], p.norm_2[0], p.norm_2[3], p.act, p.parallel, p.up_2 is not None,
                tuple(w.shape for w in qkv), p.qkv_bias is None, p.proj_bias is None, p.up_bias is None,
                p.down_bias is None, p.up.shape, p.up_2 is not None and p.up_2[1] is None)

    first = signature(plans[0])
    if any(signature(p) != first for p in plans[1:]):
        raise ConfigError("the persistent fused step needs blocks of one shape (kind, norms, activation, biases); "
                          "use --fused-kernel blocks for this model")
    up_2 = plans[0].up_2
    if up_2 is not None and (up_2[1] is None) != (plans[0].up_bias is None):
        raise ConfigError("the persistent fused step needs both SwiGLU projections with or without a bias; "
                          "use --fused-kernel blocks for this model")


class PersistentDecodeStep:
    """One decode step of a batch-1 `TransformerLM` as one persistent kernel launch (module docstring).

    Args:
        model: The model (its weights are read in place, through a table of their addresses).
        shape: Launch shape.
        attention_block: Cache slots per attention tile.
        embed_block: Channels per tile of the embedding.
    """

    def __init__(self, model: TransformerLM, shape: PersistentShape, attention_block: int, embed_block: int) -> None:
        import legolm.kernels.persistent as kp

        shape.validate()
        self.kp, self.shape = kp, shape
        self.plans = [plan_block(b) for b in model.blocks]
        _uniform(self.plans)
        self.final_norm = exit_norm(model.norm)  # the deep exit's
        param = model.lm_head.weight
        if any(p.dtype != param.dtype for p in model.parameters()):
            raise ConfigError("the persistent fused step needs every weight in one dtype; cast the model "
                              "(e.g. --dtype bfloat16) or use --fused-kernel blocks")
        c, dev = model.config, param.device
        self.attention_block, self.embed_block = attention_block, embed_block
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
        self.programs = 1 if interpreted() else min(shape.programs or sms, sms)

        def buf(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.zeros(n, dtype=dtype, device=dev)

        self.q_width = (c.n_head + 2 * c.kv_heads) * c.hd
        self.x, self.h, self.qkv = buf(c.n_embd), buf(c.n_embd), buf(self.q_width)
        self.attn, self.act = buf(c.n_head * c.hd, param.dtype), buf(c.intermediate_size, param.dtype)
        self.logits = buf(c.vocab_size)
        self.pmax, self.pidx = buf(self.programs), buf(self.programs, torch.int32)
        self.sync = buf(2, torch.int32)  # barrier arrivals, programs done with the step
        self._table: tuple[int, Tensor] | None = None
        qkv = self.plans[0].qkv  # rows of the q and q + k weights (one fused weight: all of them)
        self.qkv_rows = (qkv[0].shape[0], qkv[0].shape[0] + qkv[1].shape[0]) if isinstance(qkv, tuple) else \
            (self.q_width, self.q_width)
        self.constants = self._constants(model)

    def _constants(self, model: TransformerLM) -> dict[str, int]:
        """The kernel's compile-time switches and sizes for this model: its block kind, and each phase's rows per
        chunk and K tile (`legolm.kernels.persistent.phase_shape`)."""
        c, p0, shape, P, pow2 = model.config, self.plans[0], self.shape, self.programs, triton.next_power_of_2
        C, F, layer = c.n_embd, c.intermediate_size, self.kp.phase_shape
        qs = layer(self.q_width, C, P, shape.max_block_n, shape.tile)
        ps = layer(C, c.n_head * c.hd, P, shape.max_block_n, shape.tile)
        us = layer(F, C, P, shape.max_block_n, shape.tile)
        ds = layer(C, F, P, shape.max_block_n, shape.tile)
        hs = layer(c.vocab_size, C, P, shape.head_block_n, shape.head_tile)
        return dict(
            NORM_1=p0.norm_1[0], NORM_2=p0.norm_2[0], NORM_F=self.final_norm[0], ACT=p0.act,
            QKV_BIAS=p0.qkv_bias is not None, PROJ_BIAS=p0.proj_bias is not None, UP_BIAS=p0.up_bias is not None,
            DOWN_BIAS=p0.down_bias is not None, HEAD_BIAS=model.lm_head.bias is not None,
            HAS_WPE=model.wpe is not None, PARALLEL=p0.parallel, H=c.n_head, HKV=c.kv_heads, D=c.hd,
            D_POW2=pow2(c.hd), R=c.rotary_dim, BLOCK_T=self.attention_block, BLOCK_C=self.embed_block,
            C_POW2=pow2(C), BN_QKV=qs.block_n, BK_QKV=qs.block_k, BN_PROJ=ps.block_n, BK_PROJ=ps.block_k,
            BN_UP=us.block_n, BK_UP=us.block_k, BN_DOWN=ds.block_n, BK_DOWN=ds.block_k, BN_HEAD=hs.block_n,
            BK_HEAD=hs.block_k, BLOCK_P=pow2(P))

    def table(self, cache: KVCache) -> Tensor:
        """(n_layer, NS) int64 addresses of each block's weights and KV caches (`legolm.kernels.persistent.SLOTS`).

        Built at the first step of a cache (outside any graph capture: the step's warm-up).
        """
        key = cache.layers[0].k.data_ptr()
        if self._table is None or self._table[0] != key:
            rows = [self._row(p, cache.layers[i].k, cache.layers[i].v) for i, p in enumerate(self.plans)]
            # the kernel tells the compiler that these addresses are 16-byte aligned (vectorized loads); Triton's CPU
            # interpreter loads element by element (a model mapped from safetensors on the CPU is 8-byte aligned)
            if self.x.is_cuda and any(a % 16 for row in rows for a in row):
                raise ConfigError("the persistent fused step needs 16-byte aligned weights (views into a larger "
                                  "buffer may not be); use --fused-kernel blocks for this model")
            self._table = (key, torch.tensor(rows, dtype=torch.int64, device=self.x.device))
        return self._table[1]

    @staticmethod
    def _row(p: BlockPlan, k: Tensor, v: Tensor) -> list[int]:
        w = p.up  # the stand-in for what a block does not have (never read: its switch is off)
        qkv = p.qkv if isinstance(p.qkv, tuple) else (p.qkv, w, w)
        qkv_b = p.qkv_bias if isinstance(p.qkv_bias, tuple) else (p.qkv_bias, None, None)
        up_2 = p.up_2 if p.up_2 is not None else (w, None)
        parts = (p.norm_1[1], p.norm_1[2], qkv[0], qkv_b[0], qkv[1], qkv_b[1], qkv[2], qkv_b[2], p.proj, p.proj_bias,
                 p.norm_2[1], p.norm_2[2], p.up, p.up_bias, up_2[0], up_2[1], p.down, p.down_bias, k, v)
        return [(t if t is not None else w).data_ptr() for t in parts]

    def __call__(self, model: TransformerLM, cache: KVCache, pad_mask: Tensor, state: DecodeState, greedy: bool,
                 eos_id: int | None) -> Tensor:
        """Feed ``state.tok``; return the logits (1, V) of the next token (emitted here when greedy).

        ``pad_mask`` is unused: a batch of one has no padding.
        """
        c, fn, fb, head, rope = model.config, self.final_norm[1], self.final_norm[2], model.lm_head, model.rope
        n1, n2 = self.qkv_rows
        self.kp.persistent_step_kernel[(self.programs,)](
            self.table(cache), self.kp.NS, model.wte.weight,
            model.wpe.weight if model.wpe is not None else model.wte.weight, fn, fb if fb is not None else fn,
            head.weight, head.bias if head.bias is not None else head.weight, rope if rope.numel() else self.x,
            self.x, self.h, self.qkv, self.attn, self.act, self.logits, self.pmax, self.pidx, self.sync, state.tok,
            state.tokens, state.t, state.slot, state.pos, state.finished.view(torch.int8),
            eos_id if eos_id is not None else -1, c.n_layer, c.n_embd, n1, n2, self.q_width, c.intermediate_size,
            c.vocab_size, cache.layers[0].k.shape[2], rope.shape[1] if rope.numel() else 0, c.hd ** -0.5,
            self.plans[0].norm_1[3], self.plans[0].norm_2[3], self.final_norm[3], **self.constants, GREEDY=greedy,
            HAS_EOS=eos_id is not None, num_warps=self.shape.num_warps)
        return self.logits[None]  # (1, V)


FusedKernel = Literal["blocks", "splitk", "splitk-exact", "persistent"]  # `GenerationConfig.fused_kernel`
FUSED_KERNELS = get_args(FusedKernel)


def check_fused_kernel(kernel: str, shape: PersistentShape, early_exit: str) -> None:
    """`ConfigError` for an unknown fused kernel, a bad persistent shape, or the persistent step with LEGO early
    exit (whose decoders are built from blocks)."""
    if kernel not in FUSED_KERNELS:
        raise ConfigError(f"fused_kernel must be one of {', '.join(FUSED_KERNELS)}, got {kernel!r}")
    shape.validate()
    if kernel == "persistent" and early_exit != "none":
        raise ConfigError("LEGO early exit decodes through fused blocks (five-kernel or split-K): drop "
                          "--fused-kernel persistent, or --early-exit")


def fused_step(model: TransformerLM, kernel: str, persistent: PersistentShape, attention_block: int,
               embed_block: int, tune: bool, pdl: bool) -> FusedDecodeStep | PersistentDecodeStep:
    """The fused decode step of ``kernel``: "blocks" (five launches per block, tuned, PDL), "splitk" (three),
    "splitk-exact" (three, exact sums) or "persistent" (one)."""
    if kernel == "persistent":
        return PersistentDecodeStep(model, persistent, attention_block, embed_block)
    split_k, exact = split_k_sums(kernel)
    return FusedDecodeStep(model, attention_block, embed_block, tune, pdl, split_k=split_k, exact_sums=exact)
