"""The fused batch-1 decode step: each block as five Triton kernels (`legolm.kernels.decode`).

`FusedDecodeStep` reads a `TransformerLM`'s weights in place (no copies: a captured graph sees
later in-place weight updates), keeps the residual stream in fp32 scratch buffers, and has the
signature of `decoder.decode_step`, so a `DecodeSession` captures it into one CUDA graph like the
torch step. It supports the plain blocks of the registered families (GPT-2, Pythia, Llama: fused
or split q/k/v, GELU or SwiGLU MLP, LayerNorm or RMSNorm, sequential or parallel residual);
anything else (adapters not merged, memory layers) is refused with the reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar, get_args

import torch
from torch import Tensor, nn

from legolm.core.kv_cache import KVCache, LayerKVCache
from legolm.errors import ConfigError
from legolm.generation.decoder import DecodeState
from legolm.kernels import triton_unavailable
from legolm.layers.attention import CausalSelfAttention, SplitQKV
from legolm.layers.blocks import ParallelBlock, SequentialBlock
from legolm.layers.mlp import GeluMLP, SwiGLUMLP
from legolm.model.transformer import TransformerLM

if TYPE_CHECKING:
    from legolm.kernels.decode import AttentionConfig, GemvConfig
    from legolm.kernels.splitk import Embed, SplitKShapes

Shape = TypeVar("Shape")  # a kernel's launch shape
# the fused blocks: five launches each, or three (split-K) summing in fp32 or exactly (`FusedStack`)
FusedBlocks = Literal["blocks", "splitk", "splitk-exact"]
FUSED_BLOCKS = get_args(FusedBlocks)


def split_k_sums(kernel: str) -> tuple[bool, bool]:
    """(split-K blocks, exact sums) of a fused kernel's name (`FusedStack`'s ``split_k`` and ``exact_sums``)."""
    return kernel in ("splitk", "splitk-exact"), kernel == "splitk-exact"

Norm = tuple[int, Tensor, Tensor | None, float]
Weights = Tensor | tuple[Tensor, Tensor, Tensor]


@dataclass
class BlockPlan:
    """The tensors one block's five kernels read."""

    norm_1: Norm
    qkv: Weights
    qkv_bias: Weights | None
    proj: Tensor
    proj_bias: Tensor | None
    norm_2: Norm
    up: Tensor
    up_bias: Tensor | None
    act: int
    up_2: tuple[Tensor, Tensor | None] | None  # SwiGLU's up projection (``up`` is the gate)
    down: Tensor
    down_bias: Tensor | None
    parallel: bool


def _unsupported(what: str) -> ConfigError:
    return ConfigError(f"fused decoding supports plain GPT-2 / Pythia / Llama blocks, not {what}; merge adapters "
                       "into the weights first (legolm.adapters.inject.merge_and_unload) or decode without --fused")


def _linear(m: nn.Module, what: str) -> nn.Linear:
    if type(m) is not nn.Linear:
        raise _unsupported(f"{what} of type {type(m).__name__}")
    return m


def exit_norm(m: nn.Module) -> Norm:
    """The kernels' view of an exit's norm (`ConfigError` for one they cannot run)."""
    return _norm(m)


def _norm(m: nn.Module) -> Norm:
    from legolm.kernels.decode import NORM_LAYER, NORM_RMS

    if type(m) is nn.LayerNorm:
        bias = m.bias if m.bias is not None else torch.zeros_like(m.weight)
        return NORM_LAYER, m.weight, bias, m.eps
    if type(m) is nn.RMSNorm and m.weight is not None:
        return NORM_RMS, m.weight, None, m.eps if m.eps is not None else torch.finfo(m.weight.dtype).eps
    raise _unsupported(f"a norm of type {type(m).__name__}")


def _qkv(attn: CausalSelfAttention) -> tuple[Weights, Weights | None]:
    if isinstance(attn.qkv, SplitQKV):
        parts = [_linear(p, "q/k/v") for p in (attn.qkv.q_proj, attn.qkv.k_proj, attn.qkv.v_proj)]
        w = (parts[0].weight, parts[1].weight, parts[2].weight)
        biases = [p.bias for p in parts]
        if all(b is None for b in biases):
            return w, None
        b = tuple(x if x is not None else torch.zeros(p.out_features, dtype=p.weight.dtype, device=p.weight.device)
                  for x, p in zip(biases, parts, strict=True))
        return w, (b[0], b[1], b[2])
    lin = _linear(attn.qkv, "qkv")
    return lin.weight, lin.bias


def plan_block(block: nn.Module) -> BlockPlan:
    """The kernels' view of one block; `ConfigError` for a block they cannot run."""
    from legolm.kernels.decode import ACT_GELU, ACT_GELU_TANH, ACT_SWIGLU

    if type(block) not in (SequentialBlock, ParallelBlock):
        raise _unsupported(f"a layer of type {type(block).__name__}")
    assert isinstance(block, SequentialBlock | ParallelBlock)
    attn, mlp = block.attn, block.mlp
    if type(attn) is not CausalSelfAttention:
        raise _unsupported(f"attention of type {type(attn).__name__}")
    qkv, qkv_bias = _qkv(attn)
    proj = _linear(attn.proj, "proj")
    if type(mlp) is GeluMLP:
        fc = _linear(mlp.fc, "fc")
        act, up_2, down = (ACT_GELU_TANH if mlp.approximate == "tanh" else ACT_GELU), None, _linear(mlp.proj, "proj")
    elif type(mlp) is SwiGLUMLP:
        fc, up = _linear(mlp.gate, "gate"), _linear(mlp.up, "up")
        act, up_2, down = ACT_SWIGLU, (up.weight, up.bias), _linear(mlp.down, "down")
    else:
        raise _unsupported(f"an MLP of type {type(mlp).__name__}")
    return BlockPlan(_norm(block.norm_1), qkv, qkv_bias, proj.weight, proj.bias, _norm(block.norm_2), fc.weight,
                     fc.bias, act, up_2, down.weight, down.bias, isinstance(block, ParallelBlock))


class FusedStack:
    """The fused kernels over one model's blocks: buffers, tuned launch shapes, and the pieces decoders use.

    One token at a time (`embed`, `blocks` over any block range with its own cache slot, `head` of
    any exit with greedy / confidence partials) and, with ``rows`` > 0, a few tokens at a time
    through a block range (`rows_blocks`, `rows_head`; `legolm.kernels.rows`). The residual stream
    is ``x`` (one token) or ``X`` (rows) in fp32.

    Args:
        model: The model (its weights are read in place at every launch).
        attention_block: Cache slots per tile of the attention kernel when it is not tuned.
        embed_block: Channels per tile of the embedding kernel (and of the row copies).
        tune: At the first use on a GPU, time each GEMV role's and the attention's launch candidates
            (as replayed CUDA graphs) and keep the fastest; else take the first candidate (in Triton's
            CPU interpreter: `INTERPRETER_GEMV`).
        rows: Largest number of rows a row pass takes (0: no row buffers).
        pdl: Launch the GEMV and attention kernels with programmatic dependent launch where the GPU and
            Triton support it (`legolm.kernels.decode.pdl_supported`): each starts loading its weights
            while the previous kernel finishes.
        split_k: Blocks in three launches each instead of five, one token or rows (`legolm.kernels.splitk`:
            the projections after the attention and the MLP reduce by atomic adds into the residual stream).
        exact_sums: Split-K's residual stream in int64 fixed point (`legolm.kernels.decode.FIXED_BITS`): the
            sums are exact, so every run gives the same bits and a row pass its one-token steps' bits
            (self-speculative decoding needs it). Without it fp32 atomic adds round in arrival order, and the
            last bits vary from run to run (faster: 5,090 against 4,803 tok/s for gpt2 on an H200, README).
    """

    def __init__(self, model: TransformerLM, attention_block: int, embed_block: int, tune: bool = True,
                 rows: int = 0, pdl: bool = True, split_k: bool = False, exact_sums: bool = False) -> None:
        import legolm.kernels.decode as kd

        self.kd = kd
        c = model.config
        param = model.lm_head.weight
        self.plans = [plan_block(b) for b in model.blocks]
        self.final_norm = _norm(model.norm)
        _linear(model.lm_head, "lm_head")
        self.embed_block, self.tune, self.rows, self.split_k = embed_block, tune, rows, split_k
        self.pdl = pdl and kd.pdl_supported(param.device)
        # every GEMV and attention launch of this stack, with its PDL setting
        self.gemv, self.attend = (functools.partial(fn, pdl=self.pdl) for fn in (kd.gemv, kd.attention))
        self.attention_config = kd.AttentionConfig(attention_block, 4)

        def buf(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.zeros(*shape, dtype=dtype, device=param.device)

        self.q_width = (c.n_head + 2 * c.kv_heads) * c.hd
        # the residual stream: fp32, or int64 fixed point for split-K's exact sums
        res = torch.int64 if split_k and exact_sums else torch.float32
        self.x, self.h, self.qkv = buf(c.n_embd, dtype=res), buf(c.n_embd, dtype=res), buf(self.q_width)
        self.attn, self.act = buf(c.n_head * c.hd, dtype=param.dtype), buf(c.intermediate_size, dtype=param.dtype)
        self.logits, self.lensed = buf(c.vocab_size), buf(c.n_embd)
        n_parts = -(-c.vocab_size // kd.HEAD_MIN_ROWS)
        self.partial = (buf(n_parts), buf(n_parts, dtype=torch.int32), buf(n_parts))  # max, row, Σ exp
        self.configs: dict[str, GemvConfig] | None = None
        if split_k:
            import legolm.kernels.splitk as ks

            self.ks = ks
            self.x2 = buf(c.n_embd, dtype=res)  # the blocks alternate between x and x2 (`legolm.kernels.splitk`)
            self.split_shapes: SplitKShapes | None = None
        self.tuning: dict[str, float] = {}  # role -> µs of its chosen launch shape
        if rows:  # the same buffers with a row per token (dtypes as above: the same arithmetic)
            import legolm.kernels.rows as kr

            self.kr = kr
            self.X, self.H = buf(rows, c.n_embd, dtype=res), buf(rows, c.n_embd, dtype=res)
            self.X2 = buf(rows, c.n_embd, dtype=res) if split_k else self.X  # split-K rows alternate X and X2
            self.QKV = buf(rows, self.q_width)
            self.ATT = buf(rows, c.n_head * c.hd, dtype=param.dtype)
            self.ACT = buf(rows, c.intermediate_size, dtype=param.dtype)
            self.rows_partial = (buf(rows, n_parts), buf(rows, n_parts, dtype=torch.int32))
            self.rows_logits = buf(rows, c.vocab_size)
            self.start = torch.zeros(1, dtype=torch.long, device=param.device)  # first row's position

    # -- one token -----------------------------------------------------------------------------
    def token(self, model: TransformerLM, cache: KVCache, end: int, tok: Tensor, slot: Tensor, pos: Tensor,
              out: Tensor | None = None) -> None:
        """x = blocks ``0:end`` of the token ``tok`` at position ``pos`` (its K/V at cache slot ``slot``): the
        embedding wte[tok] (+ wpe[pos]), then the blocks. Split-K's first block embeds the token itself
        (`legolm.kernels.splitk.qkv_prep_kernel`): one launch less. ``out``: the result there instead of x."""
        wpe = model.wpe.weight if model.wpe is not None else None
        if self.split_k and end > 0:
            self.ensure_tuned(model, cache)
            self._split_k_blocks(model, cache, 0, end, slot, pos, out, embed=(tok, pos, model.wte.weight, wpe))
            return
        self.kd.embed(tok, pos, model.wte.weight, wpe, self.x, self.embed_block)
        self.blocks(model, cache, 0, end, slot, pos, out)

    def _gemvs(self, p: BlockPlan, out: Tensor | None = None) -> dict[str, Callable[[GemvConfig], None]]:
        """A block's four GEMVs as functions of their launch shape (what the tuner times); the block's result
        goes to ``out`` (default x)."""
        mlp_in = self.x if p.parallel else self.h
        y = self.x if out is None else out
        return {
            "qkv": lambda g: self.gemv(self.x, p.qkv, self.qkv, g, bias=p.qkv_bias, norm=p.norm_1),
            "proj": lambda g: self.gemv(self.attn, p.proj, self.h, g, bias=p.proj_bias, residual=self.x),
            "up": lambda g: self.gemv(mlp_in, p.up, self.act, g, bias=p.up_bias, norm=p.norm_2, act=p.act, up=p.up_2),
            "down": lambda g: self.gemv(self.act, p.down, y, g, bias=p.down_bias, residual=self.h),
        }

    def _head(self, norm: Norm, lin: nn.Linear, x: Tensor, mode: str) -> Callable[[GemvConfig], None]:
        partial = {"logits": None, "greedy": self.partial[:2], "confidence": self.partial}[mode]
        return lambda g: self.gemv(x, lin.weight, self.logits, g, bias=lin.bias, norm=norm, partial=partial)

    def _attention(self, model: TransformerLM, layer: LayerKVCache, slot: Tensor, pos: Tensor,
                   config: AttentionConfig) -> None:
        c = model.config
        self.attend(self.qkv, layer.k, layer.v, model.rope, self.attn, slot, pos, c.n_head, c.kv_heads, c.hd,
                          c.rotary_dim, config)

    def blocks(self, model: TransformerLM, cache: KVCache, start: int, end: int, slot: Tensor, pos: Tensor,
               out: Tensor | None = None) -> None:
        """Blocks ``start:end`` on x for the token at ``pos``, writing its K/V at cache slot ``slot``; the last
        block's result in ``out`` where given (a row of X: no copy after), else in x."""
        configs = self.ensure_tuned(model, cache)
        if self.split_k:
            self._split_k_blocks(model, cache, start, end, slot, pos, out)
            return
        for i in range(start, end):
            gemvs = self._gemvs(self.plans[i], out if i == end - 1 else None)
            gemvs["qkv"](configs["qkv"])
            self._attention(model, cache.layers[i], slot, pos, self.attention_config)
            for role in ("proj", "up", "down"):
                gemvs[role](configs[role])

    def _split_k_blocks(self, model: TransformerLM, cache: KVCache, start: int, end: int, slot: Tensor,
                        pos: Tensor, out: Tensor | None, embed: Embed | None = None) -> None:
        """`blocks` in three launches per block (`legolm.kernels.splitk`); the result ends in ``out`` where given
        (the last block writes it), else in x. ``embed``: the first block embeds this (token, position, wte, wpe)
        into x first (`token`)."""
        shapes = self.split_shapes
        assert shapes is not None  # `ensure_tuned` chose them
        src, dst = self.x, self.x2
        for i in range(start, end):
            if i == end - 1 and out is not None:
                dst = out
            self._split_k_block(model, cache.layers[i], self.plans[i], src, dst, slot, pos, shapes,
                                embed if i == start else None)
            src, dst = dst, src
        if out is None and src is not self.x:  # an odd number of blocks
            self.x.copy_(src)

    def _split_k_block(self, model: TransformerLM, layer: LayerKVCache, p: BlockPlan, src: Tensor, dst: Tensor,
                       slot: Tensor, pos: Tensor, shapes: SplitKShapes, embed: Embed | None) -> None:
        """One block from the residual ``src`` into ``dst`` in three launches (``embed``: `_split_k_blocks`)."""
        c, ks = model.config, self.ks
        ks.qkv_prep(src, p.qkv, self.qkv, shapes.qkv, bias=p.qkv_bias, norm=p.norm_1, proj_bias=p.proj_bias,
                    h=self.h, zero=dst, pdl=self.pdl, embed=embed)
        ks.attention_proj(self.qkv, layer.k, layer.v, model.rope, p.proj, self.h, slot, pos, c.n_head, c.kv_heads,
                          c.hd, c.rotary_dim, shapes.attention, pdl=self.pdl)
        ks.mlp(src if p.parallel else self.h, p.norm_2, p.up, p.up_bias, p.act, p.up_2, p.down, p.down_bias, self.h,
               dst, shapes.mlp, pdl=self.pdl)

    def head(self, norm: Norm, lin: nn.Linear, mode: str, x: Tensor | None = None,
             lens: nn.Linear | None = None) -> int:
        """An exit ((lens +) norm + LM head) on x into ``logits``; ``mode``: logits only, greedy partials (max,
        row) or confidence partials (also Σ exp). Returns the number of partials written."""
        configs = self.configs or {"head": self.kd.INTERPRETER_GEMV, "proj": self.kd.INTERPRETER_GEMV}
        x = self.x if x is None else x
        if lens is not None:  # a (C, C) map like the attention output projection: its launch shape
            self.gemv(x, _linear(lens, "exit lens").weight, self.lensed, configs["proj"], bias=lens.bias)
            x = self.lensed
        self._head(norm, lin, x, mode)(configs["head"])
        return -(-lin.out_features // configs["head"].block_n)

    def ensure_tuned(self, model: TransformerLM, cache: KVCache) -> dict[str, GemvConfig]:
        """The launch shapes of each role, chosen at the first call (`FusedStack` docstring).

        Choices are kept per model shape, dtype and device: later stacks of the same shape (other
        sessions, LEGO decoders of the same model, the other kind of blocks) reuse them instead of timing
        again. The five-kernel roles are always chosen (the head, the exit lens and multi-token passes use
        them); the split-K kernels' shapes only for a split-K stack.
        """
        if self.configs is None:
            key = _shape_key(model, self.x.device, self.tune, self.pdl)
            if key not in _TUNED:
                _TUNED[key] = (self._choose(model, cache), self.attention_config, dict(self.tuning))
            self.configs, self.attention_config, tuning = _TUNED[key]
            self.tuning.update(tuning)
            if self.split_k:
                key = (*key, self.x.dtype)  # fp32 or exact sums
                if key not in _TUNED_SPLIT_K:
                    _TUNED_SPLIT_K[key] = self._choose_split_k(model, cache), dict(self.tuning)
                self.split_shapes, tuning = _TUNED_SPLIT_K[key]
                self.tuning.update(tuning)
        return self.configs

    def _choose(self, model: TransformerLM, cache: KVCache) -> dict[str, GemvConfig]:
        """Per GEMV role the fastest candidate, and the attention's (timed at `ATTENTION_TUNE_SLOT`)."""
        kd = self.kd
        gemvs = {**self._gemvs(self.plans[0]), "head": self._head(self.final_norm, model.lm_head, self.x, "greedy")}
        if not self.x.is_cuda:
            return {role: kd.INTERPRETER_GEMV for role in gemvs}
        if not self.tune:
            return {role: kd.GEMV_CANDIDATES[0] for role in gemvs}
        saved = self.x.clone()
        chosen: dict[str, GemvConfig] = {}
        for role, launch in gemvs.items():
            chosen[role], self.tuning[role] = _fastest(launch, kd.HEAD_CANDIDATES if role == "head"
                                                       else kd.GEMV_CANDIDATES)
        layer = cache.layers[0]  # its slot ATTENTION_TUNE_SLOT is written now and again before it is read
        at = torch.full((1,), min(kd.ATTENTION_TUNE_SLOT, layer.k.shape[2] - 1), device=self.x.device)
        self.attention_config, self.tuning["attention"] = _fastest(
            lambda g: self._attention(model, layer, at, at, g), kd.ATTENTION_CANDIDATES)
        self.x.copy_(saved)
        return chosen

    def _choose_split_k(self, model: TransformerLM, cache: KVCache) -> SplitKShapes:
        """The split-K kernels' launch shapes (`legolm.kernels.splitk`), each kernel timed alone on block 0. The
        scratch buffers h and x2 take the timed launches' sums (each step rewrites them before it reads them);
        x is restored."""
        ks, kd = self.ks, self.kd
        if not self.x.is_cuda:
            return ks.SplitKShapes(kd.INTERPRETER_GEMV, ks.INTERPRETER_ATTENTION_PROJ, ks.INTERPRETER_MLP)
        if not self.tune:
            return ks.SplitKShapes(kd.GEMV_CANDIDATES[0], ks.ATTENTION_PROJ_CANDIDATES[0], ks.MLP_CANDIDATES[0])
        p, layer = self.plans[0], cache.layers[0]
        at = torch.full((1,), min(kd.ATTENTION_TUNE_SLOT, layer.k.shape[2] - 1), device=self.x.device)
        saved = self.x.clone()
        qkv, self.tuning["qkv_prep"] = _fastest(
            lambda g: ks.qkv_prep(self.x, p.qkv, self.qkv, g, bias=p.qkv_bias, norm=p.norm_1, proj_bias=p.proj_bias,
                                  h=self.h, zero=self.x2, pdl=self.pdl), kd.GEMV_CANDIDATES)
        attn, self.tuning["attention_proj"] = _fastest(
            lambda g: ks.attention_proj(self.qkv, layer.k, layer.v, model.rope, p.proj, self.h, at, at,
                                        model.config.n_head, model.config.kv_heads, model.config.hd,
                                        model.config.rotary_dim, g, pdl=self.pdl), ks.ATTENTION_PROJ_CANDIDATES)
        mlp, self.tuning["mlp"] = _fastest(
            lambda g: ks.mlp(self.h, p.norm_2, p.up, p.up_bias, p.act, p.up_2, p.down, p.down_bias, self.h, self.x2,
                             g, pdl=self.pdl), ks.MLP_CANDIDATES)
        self.x.copy_(saved)
        return ks.SplitKShapes(qkv, attn, mlp)

    # -- a few tokens at a time ------------------------------------------------------------------
    def rows_blocks(self, model: TransformerLM, cache: KVCache, start: int, end: int, rows: int) -> None:
        """Blocks ``start:end`` on the first ``rows`` rows of X, at positions (= slots) self.start + 0..rows-1.

        The one-token kernels with a row axis, and the same launch shapes: each row's arithmetic is
        that of one-token decoding (`legolm.kernels.rows`); the keys and values of all rows are
        written first, so that each row attends to those before it.
        """
        c, kr = model.config, self.kr
        g = self.ensure_tuned(model, cache)
        if self.split_k:
            self._split_k_rows(model, cache, start, end, rows)
            return
        X, H = self.X, self.H
        for i in range(start, end):
            p, layer = self.plans[i], cache.layers[i]
            self.gemv(X, p.qkv, self.QKV, g["qkv"], bias=p.qkv_bias, norm=p.norm_1, rows=rows)
            kr.kv_rows(self.QKV, layer.k, layer.v, model.rope, self.start, rows, c.n_head, c.kv_heads, c.hd,
                       c.rotary_dim)
            self.attend(self.QKV, layer.k, layer.v, model.rope, self.ATT, self.start, self.start, c.n_head,
                         c.kv_heads, c.hd, c.rotary_dim, self.attention_config, rows=rows)
            self.gemv(self.ATT, p.proj, H, g["proj"], bias=p.proj_bias, residual=X, rows=rows)
            self.gemv(X if p.parallel else H, p.up, self.ACT, g["up"], bias=p.up_bias, norm=p.norm_2, act=p.act,
                    up=p.up_2, rows=rows)
            self.gemv(self.ACT, p.down, X, g["down"], bias=p.down_bias, residual=H, rows=rows)

    def _split_k_rows(self, model: TransformerLM, cache: KVCache, start: int, end: int, rows: int) -> None:
        """`rows_blocks` with split-K blocks: per block `qkv_prep`, `kv_rows` (every row's key and value first),
        `attention_proj` and `mlp` over the rows, the one-token launch shapes; X and X2 alternate, the result
        ends in X. Exact fixed-point sums make each row's bits those of its one-token step."""
        c, ks, kr, shapes = model.config, self.ks, self.kr, self.split_shapes
        assert shapes is not None  # `ensure_tuned` chose them
        src, dst, H = self.X, self.X2, self.H
        for i in range(start, end):
            p, layer = self.plans[i], cache.layers[i]
            ks.qkv_prep(src, p.qkv, self.QKV, shapes.qkv, bias=p.qkv_bias, norm=p.norm_1, proj_bias=p.proj_bias, h=H,
                        zero=dst, pdl=self.pdl, rows=rows)
            kr.kv_rows(self.QKV, layer.k, layer.v, model.rope, self.start, rows, c.n_head, c.kv_heads, c.hd,
                       c.rotary_dim)
            ks.attention_proj(self.QKV, layer.k, layer.v, model.rope, p.proj, H, self.start, self.start, c.n_head,
                              c.kv_heads, c.hd, c.rotary_dim, shapes.attention, pdl=self.pdl, rows=rows)
            ks.mlp(src if p.parallel else H, p.norm_2, p.up, p.up_bias, p.act, p.up_2, p.down, p.down_bias, H, dst,
                   shapes.mlp, pdl=self.pdl, rows=rows)
            src, dst = dst, src
        if src is not self.X:  # an odd number of blocks
            self.X[:rows].copy_(src[:rows])

    def rows_head(self, norm: Norm, lin: nn.Linear, rows: int) -> int:
        """An exit on the first ``rows`` rows of X, greedy partials per row; the number of partials per row."""
        config = self.configs["head"] if self.configs is not None else self.kd.INTERPRETER_GEMV
        self.gemv(self.X, lin.weight, self.rows_logits, config, bias=lin.bias, norm=norm,
                     partial=self.rows_partial, rows=rows)
        return -(-lin.out_features // config.block_n)


_TUNED: dict[tuple[object, ...], tuple[dict[str, GemvConfig], AttentionConfig, dict[str, float]]] = {}
_TUNED_SPLIT_K: dict[tuple[object, ...], tuple[SplitKShapes, dict[str, float]]] = {}


def _shape_key(model: TransformerLM, device: torch.device, tune: bool, pdl: bool) -> tuple[object, ...]:
    """What launch-shape choices depend on: the model's sizes and layer kinds, its dtype and device, tuning and
    PDL on."""
    c = model.config
    return (c.n_embd, c.n_head, c.kv_heads, c.hd, c.intermediate_size, c.vocab_size, tuple(c.layers),
            model.lm_head.weight.dtype, str(device), tune, pdl)


class FusedDecodeStep:
    """One decode step of a batch-1 `TransformerLM` through the fused kernels (`FusedStack`).

    Per step: 1 embedding kernel, 5 per block, the head GEMV (which also reduces its rows to partial
    maxima when greedy) and 1 kernel that emits the greedy token and advances the slot. With split-K, 3 per
    block and no embedding kernel (the first block embeds the token).

    Args:
        model: The model (its weights are read in place at every step).
        attention_block: Cache slots per tile of the attention kernel when it is not tuned.
        embed_block: Channels per tile of the embedding kernel.
        tune: Time the launch shapes at the first step on a GPU (`FusedStack`).
        pdl: Programmatic dependent launch of the GEMV and attention kernels where supported (`FusedStack`).
        split_k: Three launches per block instead of five (`FusedStack`).
        exact_sums: Split-K sums exact, the same bits on every run (`FusedStack`).
    """

    def __init__(self, model: TransformerLM, attention_block: int, embed_block: int, tune: bool = True,
                 pdl: bool = True, split_k: bool = False, exact_sums: bool = False) -> None:
        self.stack = FusedStack(model, attention_block, embed_block, tune, pdl=pdl, split_k=split_k,
                                exact_sums=exact_sums)

    @property
    def tuning(self) -> dict[str, float]:
        return self.stack.tuning

    def __call__(self, model: TransformerLM, cache: KVCache, pad_mask: Tensor, state: DecodeState, greedy: bool,
                 eos_id: int | None) -> Tensor:
        """Feed ``state.tok``; return the logits (1, V) of the next token (emitted here when greedy).

        ``pad_mask`` is unused: a batch of one has no padding.
        """
        st, kd = self.stack, self.stack.kd
        st.ensure_tuned(model, cache)
        st.token(model, cache, model.config.n_layer, state.tok, state.slot, state.pos)
        n_parts = st.head(st.final_norm, model.lm_head, "greedy" if greedy else "logits")
        kd.advance(st.partial[:2] if greedy else None, n_parts, state.tok, state.tokens, state.t, state.slot,
                   state.pos, state.finished, eos_id, kd.ADVANCE_BLOCK, pdl=st.pdl)
        return st.logits[None]  # (1, V)


def _fastest(launch: Callable[[Shape], None], candidates: Sequence[Shape]) -> tuple[Shape, float]:
    """The candidate whose launch replays fastest as a CUDA graph, and its µs."""
    import triton.testing

    times = []
    for cand in candidates:
        launch(cand)  # compile outside the timed graph
        times.append(triton.testing.do_bench_cudagraph(lambda cand=cand: launch(cand), rep=20))
    best = min(range(len(times)), key=times.__getitem__)
    return candidates[best], times[best] * 1000


def check_fused(batch: int, device: torch.device) -> None:
    """`ConfigError` unless the fused step can run here for this batch (the model's blocks are checked
    when `FusedDecodeStep` plans them)."""
    why = triton_unavailable(device)
    if why:
        raise ConfigError(f"fused decoding {why}; or drop --fused")
    if batch != 1:
        raise ConfigError(f"fused decoding decodes one sequence (batch 1), got {batch} prompts; drop --fused "
                          "for batches (the CUDA-graph path) or give one prompt")
