"""Split-K fused blocks: a batch-1 decode block in three kernel launches instead of five.

The attention's output projection and the MLP's down projection are sums over independent parts:
query heads, and chunks of the hidden units. So the kernel that computes a part also multiplies it
by that part's columns of the projection and adds the product into the residual stream with atomic
adds, the reduction of split-K GEMMs (cf. Stream-K, arXiv 2301.03598). The kernel boundary
before each projection, and its fixed latency, go away::

    x ─[1 norm₁ → qkv GEMV; h := x (+ b_proj); x' := 0   (a token's first block: x := wte[tok] (+ wpe[pos]) here)]
      ─[2 per (query head, slice of C rows): RoPE, cache write, attention o; h += W_proj[slice, head cols]·o]
      ─[3 per chunk of hidden rows: norm₂(h | x) → up → GELU | SwiGLU = a; x' += W_down[:, chunk]·a
                                      (the first chunk also adds h (+ b_down))]─ x'

Blocks alternate between two residual buffers (x, x'), so kernel 1 can clear the one that kernel 3
accumulates into. The arithmetic of each part is the five-kernel step's (`legolm.kernels.decode`:
the same norms, the attention output and the hidden units rounded to the model's dtype).

*Exact sums.* fp32 atomic adds would round after each add, in whatever order the programs arrive, so the
last bits of the stream would vary from run to run. The stream (x, x', h) is instead int64 fixed point
(`legolm.kernels.decode.FIXED_BITS` fraction bits): each part, computed in fp32, converts exactly (down to
2^-FIXED_BITS) and integer adds do not depend on their order. Every run gives the same bits, and each row of a
row pass (every kernel here takes a row axis: row m at slot and position + m, its keys and values written
first by `legolm.kernels.rows.kv_rows`) gives the bits of its one-token step: self-speculative verification
is exact with three launches per block. The kernels follow their buffers' dtype: fp32 buffers get fp32
atomics (`legolm.kernels.decode._stored`).

Kernels 2 and 3 load their first weight tile before waiting for the previous kernel (PDL); kernel 2 of one
token also reads the slot and the position and loads its first tile of cached keys and values there. So the
slot, the position and the cache slots before it must be final when the block's first kernel is launched:
written by kernels that ended before the last launch without PDL, never earlier in the same PDL chain. The
kernels that write them (advance, exit, emit, tick) end a step; the next step opens with a launch without PDL
(the first block's kernel 1, which embeds the token, or the embedding or tick kernel), and a LEGO branch opens
a graph of its own (an IF node's body, or a graph replayed after the host read), so nothing runs before it.
A row pass's kernel 2 reads the cache only after its wait (`kv_rows` wrote it in the same chain).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl
from torch import Tensor

from legolm.kernels.decode import (
    GemvConfig,
    _as_fixed,
    _attend_head,
    _first_tile,
    _gemv_rows,
    _load_x,
    _pdl,
    _pdl_sync,
    _segment,
    _stored,
    segments,
)


@triton.jit
def qkv_prep_kernel(x_ptr, tok_ptr, pos_ptr, wte_ptr, wpe_ptr, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr,
                    b3_ptr, out_ptr, pb_ptr, h_ptr, zero_ptr, N1, N2, N, K, eps, NORM: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_PB: tl.constexpr, EMBED: tl.constexpr, ADD_WPE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_POW2: tl.constexpr, PREP: tl.constexpr,
                    PDL: tl.constexpr):
    """Kernel 1, program (row m, block b): out = W·norm(x) + b (the qkv GEMV, `_gemv_rows`) of row m, and the
    program's PREP channels of h = x (+ pb) and zero = 0: the buffers that kernels 2 and 3 accumulate into.

    EMBED (the first block of a token, one row): x is the token's embedding wte[tok] (+ wpe[pos] where ADD_WPE),
    read here from the tables; the program also stores its channels of x (a parallel block's MLP reads it). The
    launch is then not a programmatic dependent (`qkv_prep`), so the token and the position are final at entry.
    """
    m = tl.program_id(0)
    x_ptr += m * K
    h_ptr += m * K
    zero_ptr += m * K
    out_ptr += m * N
    r0 = tl.program_id(1) * BLOCK_N
    rows = r0 + tl.arange(0, BLOCK_N)
    rmask = rows < N
    w_ptr, b_ptr, local = _segment(r0, rows, N1, N2, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr)
    src, src2 = x_ptr, x_ptr
    if EMBED:
        src = wte_ptr + tl.load(tok_ptr).to(tl.int64) * K
        src2 = wpe_ptr + tl.load(pos_ptr).to(tl.int64) * K
    y = _gemv_rows(src, src2, nw_ptr, nb_ptr, w_ptr, b_ptr, w_ptr, b_ptr, x_ptr, rows, local, rmask, K, eps, NORM,
                   0, HAS_BIAS, False, BLOCK_K, K_POW2, BLOCK_K >= K_POW2, PDL, ADD_WPE, "")
    tl.store(out_ptr + rows, y, mask=rmask)
    c = tl.program_id(1) * PREP + tl.arange(0, PREP)
    cmask = c < K
    if EMBED:
        xs = _stored(_load_x(src, src2, c, cmask, ADD_WPE, ""), x_ptr)
        tl.store(x_ptr + c, xs, mask=cmask)
    else:
        xs = tl.load(x_ptr + c, mask=cmask, other=0)  # as stored: fixed point is copied exactly
    h = xs
    if HAS_PB:
        h = _plus(xs, tl.load(pb_ptr + c, mask=cmask, other=0.0).to(tl.float32))
    tl.store(h_ptr + c, h, mask=cmask)
    tl.store(zero_ptr + c, tl.zeros([PREP], zero_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _plus(xs, b):
    """A residual value as stored (int64 fixed point, or fp32) plus the fp32 ``b``, in the same representation."""
    if xs.dtype == tl.int64:  # noqa: SIM108 (a statement: Triton compiles one branch per dtype)
        out = xs + _as_fixed(b)
    else:
        out = xs + b
    return out


@triton.jit
def attention_proj_kernel(qkv_ptr, k_cache_ptr, v_cache_ptr, rope_ptr, wp_ptr, h_ptr, slot_ptr, pos_ptr, S,
                          rope_len, scale, C, q_width, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                          D_POW2: tl.constexpr, R: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
                          WRITE: tl.constexpr, PDL: tl.constexpr):
    """Kernel 2, program (row m, head, slice): the head's attention output o (`_attend_head`) for row m at slot
    and position + m, rounded to the weights' dtype, then h[m, n] += Σ_d W_proj[n, head·D + d]·o[d] for the
    slice's ROWS rows n.

    WRITE (one token): the slice-0 program of each kv head's first query head writes the cache, and the first
    cache tile is loaded before the PDL wait (module docstring). Rows (WRITE off): `kv_rows` wrote every
    row's key and value just before, in the same chain, so everything that reads the cache waits first.
    """
    m, head, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = s * ROWS + tl.arange(0, ROWS)
    nmask = n < C
    d = tl.arange(0, D_POW2)
    w = tl.load(wp_ptr + n[:, None].to(tl.int64) * (H * D) + head * D + d[None, :],
                mask=nmask[:, None] & (d < D)[None, :], other=0.0)  # constant: loaded before the wait
    if WRITE:
        slot, pos = tl.load(slot_ptr), tl.load(pos_ptr)  # final before the block began (module docstring)
        k, v = _first_tile(k_cache_ptr, v_cache_ptr, head, slot, S, H, HKV, D, D_POW2, BLOCK_T)
        _pdl_sync(PDL)
    else:
        _pdl_sync(PDL)
        slot, pos = tl.load(slot_ptr) + m, tl.load(pos_ptr) + m
        k, v = _first_tile(k_cache_ptr, v_cache_ptr, head, slot, S, H, HKV, D, D_POW2, BLOCK_T)
    o = _attend_head(qkv_ptr + m * q_width, k_cache_ptr, v_cache_ptr, rope_ptr, k, v, head, slot, pos, S, rope_len,
                     scale, WRITE and (s == 0) & (head % (H // HKV) == 0), H, HKV, D, D_POW2, R, BLOCK_T, "")
    o = o.to(wp_ptr.dtype.element_ty).to(tl.float32)
    h_ptr += m * C
    tl.atomic_add(h_ptr + n, _stored(tl.sum(w.to(tl.float32) * o[None, :], 1), h_ptr), mask=nmask, sem="relaxed")


@triton.jit
def mlp_kernel(x_ptr, nw_ptr, nb_ptr, wg_ptr, bg_ptr, wu_ptr, bu_ptr, wd_ptr, bd_ptr, res_ptr, out_ptr, F, C, eps,
               NORM: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_C: tl.constexpr,
               PDL: tl.constexpr):
    """Kernel 3, program (row m, chunk c): hidden units a = act(W_up·norm(x) + b) of rows c·BLOCK_N.. of row m
    (`_gemv_rows`), rounded to the weights' dtype, then out[m] += W_down[:, rows]·a in BLOCK_C-row tiles; the
    chunk-0 program also adds res[m] (+ b_down)."""
    m = tl.program_id(0)
    x_ptr += m * C
    res_ptr += m * C
    out_ptr += m * C
    res_n = tl.where(tl.program_id(1) == 0, C, 0)  # the chunk-0 program adds the residual and the bias
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < F
    n = tl.arange(0, BLOCK_C)
    wd_rows = wd_ptr + rows[None, :]
    wd = tl.load(wd_rows + n[:, None].to(tl.int64) * F, mask=(n < C)[:, None] & rmask[None, :], other=0.0)
    a = _gemv_rows(x_ptr, x_ptr, nw_ptr, nb_ptr, wg_ptr, bg_ptr, wu_ptr, bu_ptr, x_ptr, rows, rows, rmask, C, eps,
                   NORM, ACT, HAS_BIAS, False, BLOCK_K, K_POW2, BLOCK_K >= K_POW2, PDL, False, "")
    a = tl.where(rmask, a.to(wd_ptr.dtype.element_ty).to(tl.float32), 0.0)
    if BLOCK_C >= K_POW2:  # one tile, loaded before the sync
        _down_tile(wd, a, n, res_ptr, bd_ptr, out_ptr, C, res_n, HAS_DOWN_BIAS)
    for n0 in range(0, C if BLOCK_C < K_POW2 else 0, BLOCK_C):
        nn = n0 + n
        nxt = nn + BLOCK_C
        wd_next = tl.load(wd_rows + nxt[:, None].to(tl.int64) * F, mask=(nxt < C)[:, None] & rmask[None, :],
                          other=0.0)
        _down_tile(wd, a, nn, res_ptr, bd_ptr, out_ptr, C, res_n, HAS_DOWN_BIAS)
        wd = wd_next


@triton.jit
def _down_tile(wd, a, nn, res_ptr, bd_ptr, out_ptr, C, res_n, HAS_DOWN_BIAS: tl.constexpr):
    """out[nn] += wd·a (+ res[nn] (+ b_down[nn]) where nn < res_n), in out's representation (`_plus`)."""
    part = _stored(tl.sum(wd.to(tl.float32) * a[None, :], 1), out_ptr)
    part += tl.load(res_ptr + nn, mask=nn < res_n, other=0)
    if HAS_DOWN_BIAS:
        part = _plus(part, tl.load(bd_ptr + nn, mask=nn < res_n, other=0.0).to(tl.float32))
    tl.atomic_add(out_ptr + nn, part, mask=nn < C, sem="relaxed")


@dataclass(frozen=True)
class AttentionProjConfig:
    """Launch shape of `attention_proj_kernel`: cache slots per tile, output rows per program, warps."""

    block_t: int
    rows: int
    num_warps: int


@dataclass(frozen=True)
class MlpConfig:
    """Launch shape of `mlp_kernel`: hidden rows per program, K tile of the up GEMV, rows per down tile, warps."""

    block_n: int
    block_k: int
    block_c: int
    num_warps: int


Embed = tuple[Tensor, Tensor, Tensor, Tensor | None]  # a token's embedding: (token, position, wte, wpe or None)


@dataclass(frozen=True)
class SplitKShapes:
    """The launch shapes of one split-K block's three kernels."""

    qkv: GemvConfig
    attention: AttentionProjConfig
    mlp: MlpConfig


# Candidates the tuner times on the GPU (the first is the choice without a GPU): enough programs to fill the
# SMs, each holding its weight tile in registers; K and C tiles of 1024 hold a whole row of a model up to
# that width, loaded before the wait for the previous kernel.
ATTENTION_PROJ_CANDIDATES = (
    AttentionProjConfig(64, 256, 4), AttentionProjConfig(64, 128, 4), AttentionProjConfig(64, 64, 4),
    AttentionProjConfig(32, 128, 4), AttentionProjConfig(128, 128, 8), AttentionProjConfig(64, 1024, 8),
    AttentionProjConfig(128, 256, 4), AttentionProjConfig(256, 256, 8), AttentionProjConfig(128, 64, 4),
)
MLP_CANDIDATES = (
    MlpConfig(16, 1024, 1024, 8), MlpConfig(8, 1024, 1024, 4), MlpConfig(32, 1024, 1024, 16),
    MlpConfig(16, 1024, 1024, 4), MlpConfig(32, 1024, 1024, 8), MlpConfig(8, 1024, 1024, 8),
    MlpConfig(32, 256, 128, 4), MlpConfig(16, 512, 256, 8), MlpConfig(64, 128, 64, 8), MlpConfig(32, 256, 256, 8),
)
# Off the GPU (Triton's interpreter, the tests) a few large programs interpret fastest.
INTERPRETER_ATTENTION_PROJ = AttentionProjConfig(64, 1024, 4)
INTERPRETER_MLP = MlpConfig(64, 256, 256, 4)


def qkv_prep(x: Tensor, w: Tensor | tuple[Tensor, Tensor, Tensor], out: Tensor, config: GemvConfig, *,
             bias: Tensor | tuple[Tensor, Tensor, Tensor] | None, norm: tuple[int, Tensor, Tensor | None, float],
             proj_bias: Tensor | None, h: Tensor, zero: Tensor, pdl: bool,
             embed: Embed | None = None, rows: int = 0) -> None:
    """Launch `qkv_prep_kernel`: out (N,) = W·norm(x) + b; h (C,) = x (+ proj_bias); zero (C,) = 0.

    ``rows`` > 0: that many rows of x, out, h and zero, each with the one-token arithmetic.
    ``embed`` = (token, position, wte, wpe or None), one token: x is first set to the token's embedding
    (`qkv_prep_kernel`); the launch is then ordered after everything before it (no programmatic dependent
    launch), while it still lets the next kernel launch early.
    """
    ws, bs, n1, n2, block_n = segments(w, bias, out, config.block_n)
    N, K = out.shape[-1], x.shape[-1]
    kind, nw, nb, eps = norm
    grid = triton.cdiv(N, block_n)
    tok, pos, wte, wpe = embed if embed is not None else (x, x, x, None)
    qkv_prep_kernel[(max(rows, 1), grid)](
        x, tok, pos, wte, wpe if wpe is not None else wte, nw, nb if nb is not None else nw, ws[0], bs[0], ws[1],
        bs[1], ws[2], bs[2], out, proj_bias if proj_bias is not None else x, h, zero, n1, n2, N, K, eps, NORM=kind,
        HAS_BIAS=bias is not None, HAS_PB=proj_bias is not None, EMBED=embed is not None,
        ADD_WPE=embed is not None and wpe is not None, BLOCK_N=block_n, BLOCK_K=config.block_k,
        K_POW2=triton.next_power_of_2(K), PREP=triton.next_power_of_2(triton.cdiv(K, grid)),
        num_warps=config.num_warps, **_pdl(pdl, dependent=embed is None))


def attention_proj(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, rope: Tensor, proj: Tensor, h: Tensor,
                   slot: Tensor, pos: Tensor, n_head: int, n_kv_head: int, head_dim: int, rotary_dim: int,
                   config: AttentionProjConfig, pdl: bool, rows: int = 0) -> None:
    """Launch `attention_proj_kernel` over (rows, heads, row slices): h += proj(attention) (caches (1, HKV, S, D);
    rope (2, L, R) fp32 or empty; proj (C, H·D)). ``rows`` > 0: rows m = 0.. of qkv and h at slot and
    position + m, whose keys and values `legolm.kernels.rows.kv_rows` wrote (the one-token launch writes its own)."""
    C = proj.shape[0]
    block = min(config.rows, triton.next_power_of_2(C))
    rope_len = rope.shape[1] if rope.numel() else 0
    attention_proj_kernel[(max(rows, 1), n_head, triton.cdiv(C, block))](
        qkv, k_cache, v_cache, rope if rope.numel() else qkv, proj, h, slot, pos, k_cache.shape[2], rope_len,
        head_dim ** -0.5, C, qkv.shape[-1], H=n_head, HKV=n_kv_head, D=head_dim,
        D_POW2=triton.next_power_of_2(head_dim), R=rotary_dim, BLOCK_T=config.block_t, ROWS=block, WRITE=rows == 0,
        num_warps=config.num_warps, **_pdl(pdl))


def mlp(x: Tensor, norm: tuple[int, Tensor, Tensor | None, float], up: Tensor, up_bias: Tensor | None, act: int,
        up_2: tuple[Tensor, Tensor | None] | None, down: Tensor, down_bias: Tensor | None, res: Tensor, out: Tensor,
        config: MlpConfig, pdl: bool, rows: int = 0) -> None:
    """Launch `mlp_kernel`: out += down(act(up(norm(x)))) + res (+ down_bias); out must hold zeros.

    ``up`` is SwiGLU's gate where ``up_2`` (its up projection and bias) is given. ``rows`` > 0: that many rows of
    x, res and out.
    """
    F, C = up.shape
    kind, nw, nb, eps = norm
    wu, bu = up_2 if up_2 is not None else (up, None)
    bg = up_bias if up_bias is not None else up
    mlp_kernel[(max(rows, 1), triton.cdiv(F, config.block_n))](
        x, nw, nb if nb is not None else nw, up, bg, wu, bu if bu is not None else bg, down,
        down_bias if down_bias is not None else res, res, out, F, C, eps, NORM=kind, ACT=act,
        HAS_BIAS=up_bias is not None, HAS_DOWN_BIAS=down_bias is not None, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, K_POW2=triton.next_power_of_2(C),
        BLOCK_C=min(config.block_c, triton.next_power_of_2(C)), num_warps=config.num_warps, **_pdl(pdl))


__all__ = ["AttentionProjConfig", "Embed", "MlpConfig", "SplitKShapes", "attention_proj", "mlp", "qkv_prep"]
