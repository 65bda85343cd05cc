"""Triton kernels for a few tokens at once through the upper layers (batch 1, T <= 64 rows).

Self-speculative verification (the d drafted tokens and the last accepted one) and lazy KV fill
(the queued exited tokens and the deep one) both run the upper layers over T consecutive
positions whose lower-layer states are known. At batch 1 a block is still bound by reading its
weights, so each weight tile is read once and multiplied with all T rows (`rows_gemv_kernel`, a
``tl.dot`` of the rows with the tile); a block is six launches::

    X ─┬─[1 norm₁ → qkv (+bias)]─[2 RoPE k, write k/v of all rows]─[3 RoPE q, attention over 0..own slot]
       │                      ─[4 proj + bias + X]─ H ─[5 norm₂ → up → GELU | SwiGLU]─[6 down + bias + H]─ X

Attention is split in two launches because row t attends to the keys rows < t write in the same
step (a kernel boundary orders them). Every launch reads the first row's position from device
memory, so a step is captured once into a CUDA graph. Rows are fp32 (the residual stream, as in
the one-token kernels) and the dot products run in fp32 (``input_precision="ieee"``): the logits
equal those of one-token decoding up to summation order, which keeps self-speculative greedy
output identical to full-depth greedy output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from legolm.kernels.decode import ACT_NONE, ACT_SWIGLU, NORM_NONE, _gelu, _rope


@triton.jit
def _rows_norm_stats(x_ptr, ms, mmask, K, eps, NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row mean (0 for RMSNorm) and 1/std of the (M, K) rows at ``x_ptr``, two passes."""
    mean = tl.zeros([BLOCK_M], tl.float32)
    if NORM == 1:
        s = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = mmask[:, None] & (offs < K)[None, :]
            s += tl.load(x_ptr + ms[:, None] * K + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(s, 1) / K
    s2 = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = mmask[:, None] & (offs < K)[None, :]
        x = tl.load(x_ptr + ms[:, None] * K + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - mean[:, None], 0.0)
        s2 += d * d
    return mean, 1.0 / tl.sqrt(tl.sum(s2, 1) / K + eps)


@triton.jit
def rows_gemv_kernel(x_ptr, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, wu_ptr, bu_ptr,
                     res_ptr, out_ptr, pmax_ptr, pidx_ptr, M, N1, N2, N, K, stride_p, eps,
                     NORM: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                     ARGMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, n] = act(W[n]·norm(x[m]) + b[n]) (+ res[m, n]) for the M rows and this program's BLOCK_N columns.

    Weights as in `gemv_kernel` (three row segments; SwiGLU's ``wu``). ARGMAX writes, per row, this
    program's largest output and its column at ``pmax[m, program]`` (row stride ``stride_p``).
    """
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    in2, in3 = cols >= N1, cols >= N2
    local = tl.where(in3, cols - N2, tl.where(in2, cols - N1, cols)).to(tl.int64)
    wrow = tl.where(in3, w3_ptr + local * K, tl.where(in2, w2_ptr + local * K, w1_ptr + local * K))
    ms = tl.arange(0, BLOCK_M)
    mmask = ms < M
    mean = tl.zeros([BLOCK_M], tl.float32)
    rstd = tl.full([BLOCK_M], 1.0, tl.float32)
    if NORM != 0:
        mean, rstd = _rows_norm_stats(x_ptr, ms, mmask, K, eps, NORM, BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        kmask = offs < K
        xmask = mmask[:, None] & kmask[None, :]
        x = tl.load(x_ptr + ms[:, None] * K + offs[None, :], mask=xmask, other=0.0).to(tl.float32)
        if NORM != 0:
            x = (x - mean[:, None]) * rstd[:, None] * tl.load(nw_ptr + offs, mask=kmask, other=0.0).to(tl.float32)
            if NORM == 1:
                x += tl.load(nb_ptr + offs, mask=kmask, other=0.0).to(tl.float32)
            x = tl.where(xmask, x, 0.0)
        wmask = cmask[:, None] & kmask[None, :]
        w = tl.load(wrow[:, None] + offs[None, :], mask=wmask, other=0.0).to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        if ACT == 3:
            wu = tl.load(wu_ptr + local[:, None] * K + offs[None, :], mask=wmask, other=0.0).to(tl.float32)
            acc_u += tl.dot(x, tl.trans(wu), input_precision="ieee")
    y = acc
    if HAS_BIAS:
        b = tl.load(tl.where(in3, b3_ptr + local, tl.where(in2, b2_ptr + local, b1_ptr + local)), mask=cmask,
                    other=0.0).to(tl.float32)
        y += b[None, :]
    if ACT == 1:
        y = _gelu(y, False)
    elif ACT == 2:
        y = _gelu(y, True)
    elif ACT == 3:
        u = acc_u
        if HAS_BIAS:
            u += tl.load(bu_ptr + local, mask=cmask, other=0.0).to(tl.float32)[None, :]
        y = y * tl.sigmoid(y) * u
    omask = mmask[:, None] & cmask[None, :]
    if HAS_RES:
        y += tl.load(res_ptr + ms[:, None] * N + cols[None, :], mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptr + ms[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=omask)
    if ARGMAX:
        y = tl.where(cmask[None, :], y, float("-inf"))
        best = tl.max(y, 1)  # (BLOCK_M,)
        arg = tl.min(tl.where(y == best[:, None], cols[None, :], N), 1)  # the first of ties
        tl.store(pmax_ptr + ms * stride_p + pid, best, mask=mmask)
        tl.store(pidx_ptr + ms * stride_p + pid, arg, mask=mmask)


@triton.jit
def kv_rows_kernel(qkv_ptr, k_cache_ptr, v_cache_ptr, rope_ptr, start_ptr, S, rope_len, q_width,
                   H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, D_POW2: tl.constexpr, R: tl.constexpr):
    """Row m's key (RoPE at position start + m) and value of kv head g into cache slot start + m."""
    m, g = tl.program_id(0), tl.program_id(1)
    pos = tl.load(start_ptr) + m
    d = tl.arange(0, D_POW2)
    dmask = d < D
    row = qkv_ptr + m * q_width
    k = _rope(row + (H + g) * D, d, pos, rope_ptr, rope_len, R, D)
    v = tl.load(row + (H + HKV + g) * D + d, mask=dmask, other=0.0)
    base = g.to(tl.int64) * S * D + pos * D
    tl.store(k_cache_ptr + base + d, k.to(k_cache_ptr.dtype.element_ty), mask=dmask)
    tl.store(v_cache_ptr + base + d, v.to(v_cache_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def attention_rows_kernel(qkv_ptr, k_cache_ptr, v_cache_ptr, rope_ptr, out_ptr, start_ptr, S, rope_len, q_width,
                          scale, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, D_POW2: tl.constexpr,
                          R: tl.constexpr, BLOCK_T: tl.constexpr):
    """Row m, query head h: softmax attention over cache slots 0..start + m (online softmax over tiles)."""
    m, h = tl.program_id(0), tl.program_id(1)
    g = h // (H // HKV)
    last = tl.load(start_ptr) + m
    d = tl.arange(0, D_POW2)
    dmask = d < D
    q = _rope(qkv_ptr + m * q_width + h * D, d, last, rope_ptr, rope_len, R, D) * scale
    base = g.to(tl.int64) * S * D
    m_i = tl.max(tl.full([BLOCK_T], float("-inf"), tl.float32), 0)
    l_sum = tl.sum(tl.zeros([BLOCK_T], tl.float32), 0)
    acc = tl.zeros([D_POW2], tl.float32)
    for t0 in range(0, last + 1, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t <= last
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + base + t[:, None] * D + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + base + t[:, None] * D + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.where(tmask, tl.sum(k * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        l_sum = l_sum * alpha + tl.sum(p, 0)
        m_i = m_new
    tl.store(out_ptr + m * (H * D) + h * D + d, (acc / l_sum).to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def put_row_kernel(src_ptr, ring_ptr, pos_ptr, ring, C, BLOCK: tl.constexpr):
    """ring[pos % ring] = src (C,): the lower-layer state of the current position, kept for a lazy fill."""
    dst = ring_ptr + (tl.load(pos_ptr) % ring) * C
    for c0 in range(0, C, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        tl.store(dst + c, tl.load(src_ptr + c, mask=c < C, other=0.0), mask=c < C)


@triton.jit
def gather_rows_kernel(src_ptr, dst_ptr, start_ptr, pos_ptr, q_ptr, ring, C, BLOCK: tl.constexpr):
    """dst[m] = src[(s + m) % ring] for the grid's T rows, s = pos - q: the q queued positions and the current one.

    Lazy KV fill: the lower-layer states of the exited tokens and the current one (a ring buffer)
    become the first q + 1 rows of one upper-layer pass of a fixed T >= q + 1 (a bucket); the rows
    after them are stale and only write cache slots of later positions, which their own pass
    rewrites before any query reads them.
    """
    m = tl.program_id(0)
    s = tl.load(pos_ptr) - tl.load(q_ptr)
    if m == 0:
        tl.store(start_ptr, s)
    src = src_ptr + ((s + m) % ring) * C
    for c0 in range(0, C, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        tl.store(dst_ptr + m * C + c, tl.load(src + c, mask=c < C, other=0.0), mask=c < C)


@triton.jit
def select_row_kernel(src_ptr, dst_ptr, row_ptr, C, BLOCK: tl.constexpr):
    """dst = src[row] (the current token's row of a lazy-fill pass, for the deep head)."""
    src = src_ptr + tl.load(row_ptr) * C
    for c0 in range(0, C, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        tl.store(dst_ptr + c, tl.load(src + c, mask=c < C, other=0.0), mask=c < C)


@triton.jit
def accept_kernel(pmax_ptr, pidx_ptr, n_parts, stride_p, drafts_ptr, T, tok_ptr, tokens_ptr, t_ptr, finished_ptr,
                  eos_id, pos_ptr, dpos_ptr, di_ptr, stats_ptr, HAS_EOS: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Self-speculative verification (LayerSkip, arXiv 2404.16710), greedy, batch 1.

    Row m of the deep head predicts the token after input m (inputs: the last accepted token and
    the d = T - 1 drafts). The first j drafts that equal those predictions are kept, then the deep
    token z_j (the correction, or a bonus token when all d match): j + 1 tokens, EOS rules kept.
    The position advances by j + 1; ``stats`` accumulates (accepted drafts, rounds).
    """
    ms = tl.arange(0, BLOCK_T)
    mmask = ms < T
    best = tl.full([BLOCK_T], float("-inf"), tl.float32)
    arg = tl.full([BLOCK_T], 2147483647, tl.int32)
    for p0 in range(0, n_parts, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        mask = mmask[:, None] & (p < n_parts)[None, :]
        v = tl.load(pmax_ptr + ms[:, None] * stride_p + p[None, :], mask=mask, other=float("-inf"))
        i = tl.load(pidx_ptr + ms[:, None] * stride_p + p[None, :], mask=mask, other=2147483647)
        top = tl.max(v, 1)
        first = tl.min(tl.where(v == top[:, None], i, 2147483647), 1)
        take = (top > best) | ((top == best) & (first < arg))
        best = tl.where(take, top, best)
        arg = tl.where(take, first, arg)
    z = arg.to(tl.int64)  # (BLOCK_T,) the deep model's greedy token after each input
    drafts = tl.load(drafts_ptr + ms, mask=ms < T - 1, other=-1)
    j = tl.min(tl.where((ms < T - 1) & (z != drafts), ms, T - 1), 0)  # accepted drafts
    z_j = tl.sum(tl.where(ms == j, z, 0), 0)
    out = tl.where(ms < j, drafts, z_j)
    keep = ms <= j
    if HAS_EOS:
        done = tl.load(finished_ptr).to(tl.int1)
        first_eos = tl.min(tl.where(keep & (out == eos_id), ms, BLOCK_T), 0)
        out = tl.where(done | (ms > first_eos), eos_id, out)
        tl.store(finished_ptr, (done | (first_eos <= j)).to(tl.int8))
    t = tl.load(t_ptr)
    tl.store(tokens_ptr + t + ms, out, mask=keep)
    tl.store(t_ptr, t + j + 1)
    tl.store(tok_ptr, tl.sum(tl.where(ms == j, out, 0), 0))
    pos = tl.load(pos_ptr) + j + 1
    tl.store(pos_ptr, pos)
    tl.store(dpos_ptr, pos)
    tl.store(di_ptr, 0)
    tl.store(stats_ptr, tl.load(stats_ptr) + j)
    tl.store(stats_ptr + 1, tl.load(stats_ptr + 1) + 1)


@dataclass(frozen=True)
class RowsConfig:
    """Launch shape of one `rows_gemv_kernel` call: columns per program, K tile, warps (rows: all, padded)."""

    block_n: int
    block_k: int
    num_warps: int


# Candidates the tuner times on the GPU (the first is the choice without a GPU). ``tl.dot`` wants
# tiles of at least 16 in every dimension.
ROWS_CANDIDATES = (
    RowsConfig(16, 64, 4), RowsConfig(16, 128, 4), RowsConfig(32, 64, 4), RowsConfig(32, 128, 4),
    RowsConfig(16, 256, 4), RowsConfig(64, 64, 4), RowsConfig(32, 256, 8), RowsConfig(64, 128, 8),
)
INTERPRETER_ROWS = RowsConfig(64, 64, 4)  # off the GPU a few large programs interpret fastest
ROWS_HEAD_MIN = 16  # head launches keep >= 16 columns per program (few partial maxima per row)
ROWS_ATTENTION_BLOCK = 64  # cache slots per attention tile
MIN_ROWS = 16  # tl.dot's smallest tile


def block_m(rows: int) -> int:
    """Rows padded to a power of two >= 16 (``tl.dot``)."""
    return max(MIN_ROWS, triton.next_power_of_2(rows))


def rows_gemv(x: Tensor, w: Tensor | tuple[Tensor, Tensor, Tensor], out: Tensor, rows: int, config: RowsConfig, *,
              bias: Tensor | tuple[Tensor, Tensor, Tensor] | None = None,
              norm: tuple[int, Tensor, Tensor | None, float] | None = None, act: int = ACT_NONE,
              up: tuple[Tensor, Tensor | None] | None = None, residual: Tensor | None = None,
              partial: tuple[Tensor, Tensor] | None = None) -> None:
    """Launch `rows_gemv_kernel` over the first ``rows`` rows of x (R, K) -> out (R, N).

    ``partial``: fp32 / int32 buffers (R, >= cdiv(N, block_n)): per row, each program's maximum.
    """
    ws = w if isinstance(w, tuple) else (w, w, w)
    N, K = out.shape[1], x.shape[1]
    bs = bias if isinstance(bias, tuple) else ((bias, bias, bias) if bias is not None else (out, out, out))
    n1 = ws[0].shape[0] if isinstance(w, tuple) else N
    n2 = n1 + ws[1].shape[0] if isinstance(w, tuple) else N
    kind, nw, nb, eps = norm if norm is not None else (NORM_NONE, x, None, 0.0)
    wu, bu = up if up is not None else (ws[0], None)
    grid = (triton.cdiv(N, config.block_n),)
    pmax, pidx = partial if partial is not None else (out, out)
    stride_p = pmax.shape[1] if partial is not None else 1
    rows_gemv_kernel[grid](x, nw, nb if nb is not None else nw, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], wu,
                           bu if bu is not None else bs[0], residual if residual is not None else out, out, pmax,
                           pidx, rows, n1, n2, N, K, stride_p, eps, NORM=kind, ACT=act, HAS_BIAS=bias is not None,
                           HAS_RES=residual is not None, ARGMAX=partial is not None, BLOCK_M=block_m(rows),
                           BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps)


def kv_rows(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, rope: Tensor, start: Tensor, rows: int, n_head: int,
            n_kv_head: int, head_dim: int, rotary_dim: int) -> None:
    """Launch `kv_rows_kernel`: the keys/values of ``rows`` rows of qkv (R, q_width) into slots start.. of the cache."""
    rope_len = rope.shape[1] if rope.numel() else 0
    kv_rows_kernel[(rows, n_kv_head)](qkv, k_cache, v_cache, rope if rope.numel() else qkv, start, k_cache.shape[2],
                                      rope_len, qkv.shape[1], H=n_head, HKV=n_kv_head, D=head_dim,
                                      D_POW2=triton.next_power_of_2(head_dim), R=rotary_dim)


def attention_rows(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, rope: Tensor, out: Tensor, start: Tensor,
                   rows: int, n_head: int, n_kv_head: int, head_dim: int, rotary_dim: int, block_t: int) -> None:
    """Launch `attention_rows_kernel` over (rows, heads) -> out (R, H·D)."""
    rope_len = rope.shape[1] if rope.numel() else 0
    attention_rows_kernel[(rows, n_head)](qkv, k_cache, v_cache, rope if rope.numel() else qkv, out, start,
                                          k_cache.shape[2], rope_len, qkv.shape[1], head_dim ** -0.5, H=n_head,
                                          HKV=n_kv_head, D=head_dim, D_POW2=triton.next_power_of_2(head_dim),
                                          R=rotary_dim, BLOCK_T=block_t)


def put_row(x: Tensor, ring: Tensor, pos: Tensor, block: int) -> None:
    """Launch `put_row_kernel`: ring[pos % len(ring)] = x."""
    put_row_kernel[(1,)](x, ring, pos, ring.shape[0], ring.shape[1], BLOCK=block)


def gather_rows(ring: Tensor, out: Tensor, start: Tensor, pos: Tensor, q: Tensor, rows: int, block: int) -> None:
    """Launch `gather_rows_kernel`: ``rows`` ring rows from position pos - q into out; start = pos - q."""
    gather_rows_kernel[(rows,)](ring, out, start, pos, q, ring.shape[0], ring.shape[1], BLOCK=block)


def select_row(src: Tensor, out: Tensor, row: Tensor, block: int) -> None:
    """Launch `select_row_kernel`: out (C,) = src[row]."""
    select_row_kernel[(1,)](src, out, row, out.numel(), BLOCK=block)


def accept(partial: tuple[Tensor, Tensor], n_parts: int, drafts: Tensor, rows: int, tok: Tensor, tokens: Tensor,
           t: Tensor, finished: Tensor, eos_id: int | None, pos: Tensor, dpos: Tensor, di: Tensor, stats: Tensor,
           block: int) -> None:
    """Launch `accept_kernel` over ``rows`` = d + 1 verified rows (``n_parts`` head programs per row)."""
    accept_kernel[(1,)](partial[0], partial[1], n_parts, partial[0].shape[1], drafts, rows, tok, tokens, t,
                        finished.view(torch.int8), eos_id if eos_id is not None else -1, pos, dpos, di, stats,
                        HAS_EOS=eos_id is not None, BLOCK_T=triton.next_power_of_2(rows),
                        BLOCK=min(triton.next_power_of_2(n_parts), block))


__all__ = ["ACT_SWIGLU", "ROWS_CANDIDATES", "RowsConfig", "accept", "attention_rows", "gather_rows", "kv_rows",
           "put_row", "rows_gemv", "select_row"]
