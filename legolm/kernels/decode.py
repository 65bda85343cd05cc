"""Triton kernels of a fused batch-1 decode step.

At batch 1 a decode step reads every weight once and does almost no arithmetic: a 124M model in
bf16 is ~250 MB, 80 µs at 3 TB/s, yet a compiled step launches ~140 kernels of ~3 µs each, and
launches, not bytes, bound it. These kernels cut a block to five launches by fusing what sits
around each matrix-vector product::

    x ─┬─[1 norm₁ → qkv GEMV (+bias)]─[2 RoPE, cache write, attention]─[3 proj GEMV + bias + x]─ h
       │                                                                                         │
       └─(parallel: x / sequential: h)─[4 norm₂ → up GEMV (+bias) → GELU | SwiGLU]─[5 down GEMV + bias + h]─ out

Every kernel reads the cache slot and the position from device memory, so a step is captured once
into a CUDA graph and replayed. The residual stream stays in fp32 between kernels; the KV cache
keeps the model's dtype. `TRITON_INTERPRET=1` runs the same kernels on CPU tensors (the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

NORM_NONE, NORM_LAYER, NORM_RMS = 0, 1, 2
ACT_NONE, ACT_GELU, ACT_GELU_TANH, ACT_SWIGLU = 0, 1, 2, 3


# The exact residual stream of split-K blocks (`legolm.kernels.splitk`): int64 fixed point with FIXED_BITS
# fraction bits. Integer sums do not depend on their order, so atomic adds of parts give the same bits on every
# run; a part converts exactly where |part| >= 2^(23 - FIXED_BITS) (an fp32 has 24 significant bits; below, the
# bits under 2^-FIXED_BITS are cut), and the stream holds |x| < 2^(63 - FIXED_BITS).
FIXED_BITS = 32
_FIXED_ONE = tl.constexpr(float(2 ** FIXED_BITS))  # the kernels' view: 1.0 in fixed point


@triton.jit
def _as_float(v):
    """A loaded residual value in fp32: int64 fixed point (FIXED_BITS fraction bits) decoded, else converted."""
    if v.dtype == tl.int64:  # noqa: SIM108 (a statement: Triton compiles one branch per dtype)
        out = v.to(tl.float32) * (1.0 / _FIXED_ONE)
    else:
        out = v.to(tl.float32)
    return out


@triton.jit
def _as_fixed(y):
    """fp32 → int64 fixed point (`FIXED_BITS`; the scaling by a power of two is exact, the cut toward 0 drops
    what lies below 2^-FIXED_BITS)."""
    return (y * _FIXED_ONE).to(tl.int64)


@triton.jit
def _stored(y, ptr):
    """y (fp32) as the element type of ``ptr`` stores it: fixed point into int64, else rounded to the dtype."""
    if ptr.dtype.element_ty == tl.int64:  # noqa: SIM108 (a statement: Triton compiles one branch per dtype)
        out = _as_fixed(y)
    else:
        out = y.to(ptr.dtype.element_ty)
    return out


@triton.jit
def _load_x(x_ptr, x2_ptr, offs, mask, X2: tl.constexpr, CM: tl.constexpr):
    """x[offs] in fp32 (`_as_float`), plus x2[offs] where X2 (an embedding: the token's row and the position's),
    with cache modifier CM; 0 outside ``mask``."""
    x = _as_float(tl.load(x_ptr + offs, mask=mask, other=0, cache_modifier=CM))
    if X2:
        x += tl.load(x2_ptr + offs, mask=mask, other=0.0, cache_modifier=CM).to(tl.float32)
    return x


@triton.jit
def _norm_stats(x_ptr, x2_ptr, K, eps, NORM: tl.constexpr, K_POW2: tl.constexpr, X2: tl.constexpr,
                CM: tl.constexpr):
    """Mean (0 for RMSNorm) and 1/std of the K-vector at ``x_ptr`` (+ ``x2_ptr`` where X2: `_load_x`;
    K <= K_POW2): one load, then two passes over the registers for accuracy (CM: the load's cache modifier)."""
    offs = tl.arange(0, K_POW2)
    x = _load_x(x_ptr, x2_ptr, offs, offs < K, X2, CM)
    mean = 0.0
    if NORM == 1:
        mean = tl.sum(x, 0) / K
    d = tl.where(offs < K, x - mean, 0.0)
    return mean, 1.0 / tl.sqrt(tl.sum(d * d, 0) / K + eps)


@triton.jit
def _pdl_sync(PDL: tl.constexpr):
    """With PDL: let the next kernel launch now, then wait until the previous one finished and its writes are
    visible. Nothing before this point may read another kernel's output or write anything."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def _gelu(a, TANH: tl.constexpr):
    if TANH:  # 0.5·a·(1 + tanh(√(2/π)·(a + 0.044715·a³))), tanh(u) = 2·sigmoid(2u) − 1
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        return a * tl.sigmoid(2.0 * u)
    return 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))


@triton.jit
def gemv_kernel(x_ptr, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, wu_ptr, bu_ptr,
                res_ptr, out_ptr, pmax_ptr, pidx_ptr, psum_ptr, N1, N2, N, K, eps, stride_x, stride_out, stride_p,
                NORM: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                ARGMAX: tl.constexpr, SUMEXP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                K_POW2: tl.constexpr, PDL: tl.constexpr):
    """out[n] = act(W[n]·norm(x) + b[n]) (+ res[n]) for the BLOCK_N rows of this program (`_gemv_rows`).

    W is up to three row segments (rows < N1 of w1, < N2 of w2, the rest of w3: Llama's separate
    q/k/v projections), each a whole number of blocks.
    ARGMAX also writes this program's largest output and its row (greedy decoding's first stage);
    SUMEXP also its Σ exp(out - largest), from which `exit_kernel` gets the softmax's maximum
    probability without a second pass over the logits.

    Grid (vectors, column blocks): program (r, c) computes vector r (x, out, residual and partials
    offset by their row strides) — the same arithmetic for one token or for a few (`legolm.kernels.rows`),
    so a multi-token pass gives bit for bit the one-token logits. Consecutive programs share a weight tile.

    PDL (programmatic dependent launch): the program starts while the previous kernel still runs,
    loads its first weight tile (weights are constant), lets the next kernel launch, and only then
    waits for the previous kernel's results (`_pdl_sync`): a GEMV's fixed latency hides behind the last one.
    """
    vec = tl.program_id(0)
    x_ptr += vec * stride_x
    res_ptr += vec * stride_out
    out_ptr += vec * stride_out
    pmax_ptr += vec * stride_p
    pidx_ptr += vec * stride_p
    psum_ptr += vec * stride_p
    r0 = tl.program_id(1) * BLOCK_N
    rows = r0 + tl.arange(0, BLOCK_N)
    rmask = rows < N
    w_ptr, b_ptr, local = _segment(r0, rows, N1, N2, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr)
    y = _gemv_rows(x_ptr, x_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, wu_ptr, bu_ptr, res_ptr, rows, local, rmask, K, eps,
                   NORM, ACT, HAS_BIAS, HAS_RES, BLOCK_K, K_POW2, BLOCK_K >= K_POW2, PDL, False, "")
    tl.store(out_ptr + rows, _stored(y, out_ptr), mask=rmask)
    if ARGMAX:
        y = tl.where(rmask, y, float("-inf"))
        best = tl.max(y, 0)
        tl.store(pmax_ptr + tl.program_id(1), best)
        tl.store(pidx_ptr + tl.program_id(1), tl.min(tl.where(y == best, rows, N), 0))  # first of ties
        if SUMEXP:
            tl.store(psum_ptr + tl.program_id(1), tl.sum(tl.where(rmask, tl.exp(y - best), 0.0), 0))


@triton.jit
def _segment(r0, rows, N1, N2, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr):
    """The weight and bias segment of the block of rows starting at r0 (rows < N1 of w1, < N2 of w2, the rest of
    w3; the host keeps blocks inside one), and ``rows``' indices in it. A scalar choice keeps the loads
    vectorized."""
    in2, in3 = r0 >= N1, r0 >= N2
    w_ptr = tl.where(in3, w3_ptr, tl.where(in2, w2_ptr, w1_ptr))
    b_ptr = tl.where(in3, b3_ptr, tl.where(in2, b2_ptr, b1_ptr))
    return w_ptr, b_ptr, rows - tl.where(in3, N2, tl.where(in2, N1, 0))


@triton.jit
def _gemv_rows(x_ptr, x2_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, wu_ptr, bu_ptr, res_ptr, rows, local, rmask, K, eps,
               NORM: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
               BLOCK_K: tl.constexpr, K_POW2: tl.constexpr, ONE_TILE: tl.constexpr, PDL: tl.constexpr,
               X2: tl.constexpr, CM: tl.constexpr):
    """act(W[n]·norm(x) + b[n]) (+ res[n]) in fp32 for the output rows ``rows`` (where ``rmask``), which are the
    rows ``local`` of W and b; where X2, x is the sum of the vectors at x_ptr and x2_ptr (`_load_x`).

    ONE_TILE (BLOCK_K >= K_POW2 only): the first weight tile holds the whole rows, and no registers are spent on a
    next tile (else the tiles stream through a loop, the next one in flight while the current one is used).
    SwiGLU reads the matching row of ``wu`` too: silu(W[n]·x) · (Wu[n]·x). CM is the cache modifier of the
    loads of x and res (".cg" where another program wrote them in the same launch:
    `legolm.kernels.persistent`). With PDL, `_pdl_sync` follows the first weight tile's loads.
    """
    local = local.to(tl.int64)
    wrow = w_ptr + local * K
    first = tl.arange(0, BLOCK_K)
    wmask = rmask[:, None] & (first < K)[None, :]
    # Software pipelining: the first weight tile is in flight while the norm statistics are computed,
    # and each iteration issues the next tile's loads before it uses the current one.
    w = tl.load(wrow[:, None] + first[None, :], mask=wmask, other=0.0)
    wu = w
    if ACT == 3:
        wu = tl.load(wu_ptr + local[:, None] * K + first[None, :], mask=wmask, other=0.0)
    _pdl_sync(PDL)  # everything below may read what earlier kernels wrote
    mean, rstd = 0.0, 1.0
    if NORM != 0:
        mean, rstd = _norm_stats(x_ptr, x2_ptr, K, eps, NORM, K_POW2, X2, CM)
    acc = tl.zeros([rows.shape[0], BLOCK_K], tl.float32)
    acc_u = tl.zeros([rows.shape[0], BLOCK_K], tl.float32)
    x = _load_x(x_ptr, x2_ptr, first, first < K, X2, CM)
    if ONE_TILE:  # loaded before the sync: nothing to prefetch
        acc, acc_u = _accumulate(acc, acc_u, w, wu, x, first, mean, rstd, nw_ptr, nb_ptr, K, NORM, ACT)
    for k0 in range(0, 0 if ONE_TILE else K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        nxt = offs + BLOCK_K
        nmask = rmask[:, None] & (nxt < K)[None, :]
        # the next tile's weights and input are in flight while this one is used
        w_next = tl.load(wrow[:, None] + nxt[None, :], mask=nmask, other=0.0)
        wu_next = w_next
        if ACT == 3:
            wu_next = tl.load(wu_ptr + local[:, None] * K + nxt[None, :], mask=nmask, other=0.0)
        x_next = _load_x(x_ptr, x2_ptr, nxt, nxt < K, X2, CM)
        acc, acc_u = _accumulate(acc, acc_u, w, wu, x, offs, mean, rstd, nw_ptr, nb_ptr, K, NORM, ACT)
        w, wu, x = w_next, wu_next, x_next
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + local, mask=rmask, other=0.0).to(tl.float32)
    if ACT == 1:
        y = _gelu(y, False)
    elif ACT == 2:
        y = _gelu(y, True)
    elif ACT == 3:
        u = tl.sum(acc_u, 1)
        if HAS_BIAS:
            u += tl.load(bu_ptr + local, mask=rmask, other=0.0).to(tl.float32)
        y = y * tl.sigmoid(y) * u
    if HAS_RES:
        y += _as_float(tl.load(res_ptr + rows, mask=rmask, other=0, cache_modifier=CM))
    return y


@triton.jit
def _accumulate(acc, acc_u, w, wu, x, offs, mean, rstd, nw_ptr, nb_ptr, K, NORM: tl.constexpr, ACT: tl.constexpr):
    """One K tile (indices ``offs``) of `_gemv_rows`: acc += W·norm(x), and acc_u += Wu·norm(x) for SwiGLU."""
    kmask = offs < K
    xf = x.to(tl.float32)
    if NORM != 0:
        xf = (xf - mean) * rstd * tl.load(nw_ptr + offs, mask=kmask, other=0.0).to(tl.float32)
        if NORM == 1:
            xf += tl.load(nb_ptr + offs, mask=kmask, other=0.0).to(tl.float32)
    acc += w.to(tl.float32) * xf[None, :]
    if ACT == 3:
        acc_u += wu.to(tl.float32) * xf[None, :]
    return acc, acc_u


@triton.jit
def advance_kernel(pmax_ptr, pidx_ptr, n_parts, tok_ptr, tokens_ptr, t_ptr, slot_ptr, pos_ptr, finished_ptr, eos_id,
                   GREEDY: tl.constexpr, HAS_EOS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """End of a step: slot and position advance; greedy also reduces the head's partial maxima to the
    token (the first of ties, like `torch.argmax`), keeps finished rows at EOS and appends it.

    PDL: launched while the head still runs, it waits for it before anything else (its launch latency hides
    behind the head); the kernel after it must then not be a programmatic dependent (`legolm.kernels.splitk`
    reads the slot before its wait)."""
    if PDL:
        gdc_wait()
    tl.store(slot_ptr, tl.load(slot_ptr) + 1)
    tl.store(pos_ptr, tl.load(pos_ptr) + 1)
    if GREEDY:
        _, nxt = _greedy(pmax_ptr, pidx_ptr, n_parts, BLOCK, "")
        _emit(nxt, nxt >= 0, tok_ptr, tokens_ptr, t_ptr, finished_ptr, eos_id, HAS_EOS)


@triton.jit
def _greedy(pmax_ptr, pidx_ptr, n_parts, BLOCK: tl.constexpr, CM: tl.constexpr):
    """The largest of the head's partial maxima and its row (the first of ties, like `torch.argmax`);
    CM: the loads' cache modifier."""
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    arg = tl.full([BLOCK], 2147483647, tl.int32)
    for p0 in range(0, n_parts, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        v = tl.load(pmax_ptr + p, mask=p < n_parts, other=float("-inf"), cache_modifier=CM)
        i = tl.load(pidx_ptr + p, mask=p < n_parts, other=2147483647, cache_modifier=CM)
        take = (v > best) | ((v == best) & (i < arg))
        best = tl.where(take, v, best)
        arg = tl.where(take, i, arg)
    top = tl.max(best, 0)
    return top, tl.min(tl.where(best == top, arg, 2147483647), 0).to(tl.int64)


@triton.jit
def _emit(nxt, take, tok_ptr, tokens_ptr, t_ptr, finished_ptr, eos_id, HAS_EOS: tl.constexpr):
    """Where ``take``: append ``nxt`` (EOS once the row has finished) to ``tokens[t]``, make it the next input."""
    if HAS_EOS:
        done = tl.load(finished_ptr).to(tl.int1)
        nxt = tl.where(done, eos_id, nxt)
        tl.store(finished_ptr, (done | (nxt == eos_id)).to(tl.int8), mask=take)
    t = tl.load(t_ptr)
    tl.store(tok_ptr, nxt, mask=take)
    tl.store(tokens_ptr + t, nxt, mask=take)
    tl.store(t_ptr, t + 1, mask=take)


@triton.jit
def exit_kernel(pmax_ptr, pidx_ptr, psum_ptr, n_parts, tau_ptr, deep_ptr, exited_ptr, tok_ptr, tokens_ptr, t_ptr,
                finished_ptr, eos_id, q_ptr, buckets_ptr, flush_ptr, n_buckets, pos_ptr,
                HAS_EOS: tl.constexpr, FILL: tl.constexpr, ADVANCE: tl.constexpr, BLOCK: tl.constexpr,
                BLOCK_B: tl.constexpr, PDL: tl.constexpr):
    """The shallow exit's decision for one token (LEGO early exit, batch 1).

    From the shallow head's partials: the greedy token and the confidence
    conf = max softmax = 1 / Σ_p s_p · exp(m_p - M) (m_p, s_p: a program's maximum and Σ exp(y - m_p);
    M the largest m_p). It exits where conf >= τ (τ < 1; τ = 1 never exits): the shallow token is
    emitted, ``exited[t]`` is set and ``deep`` (the upper layers' condition) cleared.
    FILL (lazy KV fill): the current token joins the queue of ``q`` exited ones; ``flush[i]`` is set
    for the smallest bucket that holds the q + 1 rows when they must run through the upper layers
    now: a deep token, or a full queue (the largest bucket).
    ADVANCE (skip mode): an exiting token also ends its step, so the position advances here (a deep token's
    `emit_kernel` advances it), and the step needs no `tick_kernel`.
    PDL: launched while the exit's head still runs, it waits for it first (as `advance_kernel`).
    """
    if PDL:
        gdc_wait()
    top, nxt = _greedy(pmax_ptr, pidx_ptr, n_parts, BLOCK, "")
    total = 0.0
    for p0 in range(0, n_parts, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        v = tl.load(pmax_ptr + p, mask=p < n_parts, other=float("-inf"))
        total += tl.sum(tl.load(psum_ptr + p, mask=p < n_parts, other=0.0) * tl.exp(v - top), 0)
    tau = tl.load(tau_ptr)
    ex = (1.0 / total >= tau) & (tau < 1.0)
    t = tl.load(t_ptr)
    deep = 1 - ex.to(tl.int8)
    tl.store(exited_ptr + t, ex.to(tl.int8))
    tl.store(deep_ptr, deep)
    _emit(nxt, ex, tok_ptr, tokens_ptr, t_ptr, finished_ptr, eos_id, HAS_EOS)
    if ADVANCE:
        tl.store(pos_ptr, tl.load(pos_ptr) + ex.to(tl.int64))
    if FILL:
        rows = tl.load(q_ptr) + 1
        b = tl.arange(0, BLOCK_B)
        sizes = tl.load(buckets_ptr + b, mask=b < n_buckets, other=0)
        below = tl.load(buckets_ptr + b - 1, mask=(b >= 1) & (b < n_buckets), other=0)
        flush = tl.maximum(deep, (rows >= tl.max(sizes, 0)).to(tl.int8))
        fits = (below < rows) & (rows <= sizes)
        tl.store(flush_ptr + b, tl.where(fits, flush, 0).to(tl.int8), mask=b < n_buckets)


@triton.jit
def emit_kernel(pmax_ptr, pidx_ptr, n_parts, tok_ptr, tokens_ptr, t_ptr, finished_ptr, eos_id, counter_ptr, pos_ptr,
                HAS_EOS: tl.constexpr, HAS_COUNTER: tl.constexpr, HAS_POS: tl.constexpr, BLOCK: tl.constexpr,
                PDL: tl.constexpr):
    """Emit the greedy token of a head's partials (and step ``counter``: skip mode's upper slot, a draft position;
    HAS_POS: advance the position too, skip mode's end of a deep step). PDL: as `advance_kernel`."""
    if PDL:
        gdc_wait()
    _, nxt = _greedy(pmax_ptr, pidx_ptr, n_parts, BLOCK, "")
    _emit(nxt, nxt >= 0, tok_ptr, tokens_ptr, t_ptr, finished_ptr, eos_id, HAS_EOS)
    if HAS_COUNTER:
        tl.store(counter_ptr, tl.load(counter_ptr) + 1)
    if HAS_POS:
        tl.store(pos_ptr, tl.load(pos_ptr) + 1)


@triton.jit
def tick_kernel(pos_ptr, q_ptr, flush_ptr, n_buckets, count_ptr, FILL: tl.constexpr, BLOCK_B: tl.constexpr):
    """End of an early-exit step: the position advances; FILL: the queue empties if it was flushed (and
    ``count`` counts the flush), else grows."""
    tl.store(pos_ptr, tl.load(pos_ptr) + 1)
    if FILL:
        b = tl.arange(0, BLOCK_B)
        flushed = tl.max(tl.load(flush_ptr + b, mask=b < n_buckets, other=0), 0) > 0
        tl.store(q_ptr, tl.where(flushed, 0, tl.load(q_ptr) + 1))
        tl.store(count_ptr, tl.load(count_ptr) + flushed.to(tl.int64))


@triton.jit
def _rope(ptr, d, pos, rope_ptr, rope_len, R: tl.constexpr, D: tl.constexpr, CM: tl.constexpr):
    """The head vector at ``ptr`` with its first R dims rotated for ``pos`` (half-split pairs)."""
    x = tl.load(ptr + d, mask=d < D, other=0.0, cache_modifier=CM).to(tl.float32)
    if R > 0:
        rot = d < R
        partner = tl.where(d < R // 2, d + R // 2, d - R // 2)
        sign = tl.where(d < R // 2, -1.0, 1.0)
        cos = tl.load(rope_ptr + pos * R + d, mask=rot, other=1.0)
        sin = tl.load(rope_ptr + (rope_len + pos) * R + d, mask=rot, other=0.0)
        xp = tl.load(ptr + partner, mask=rot, other=0.0, cache_modifier=CM).to(tl.float32)
        x = x * cos + sign * xp * sin
    return x


@triton.jit
def attention_kernel(qkv_ptr, k_cache_ptr, v_cache_ptr, rope_ptr, out_ptr, slot_ptr, pos_ptr, S, rope_len, scale,
                     q_width, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, D_POW2: tl.constexpr,
                     R: tl.constexpr, BLOCK_T: tl.constexpr, WRITE: tl.constexpr, PDL: tl.constexpr):
    """One query head of one token (`_attend`).

    Grid (heads, tokens): token m of a multi-token pass sits at slot + m and position pos + m (its
    qkv and output rows offset by m); the keys of the tokens before it were written by `kv_rows_kernel`
    (WRITE off), its own enter the softmax first, as in the one-token step.
    """
    _pdl_sync(PDL)  # the slot, the position and q/k/v come from earlier kernels
    h, m = tl.program_id(0), tl.program_id(1)
    _attend(qkv_ptr + m * q_width, k_cache_ptr, v_cache_ptr, rope_ptr, out_ptr + m * (H * D), h,
            tl.load(slot_ptr) + m, tl.load(pos_ptr) + m, S, rope_len, scale, H, HKV, D, D_POW2, R, BLOCK_T, WRITE, "")


@triton.jit
def _attend(qkv_ptr, k_cache_ptr, v_cache_ptr, rope_ptr, out_ptr, h, slot, pos, S, rope_len, scale,
            H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, D_POW2: tl.constexpr, R: tl.constexpr,
            BLOCK_T: tl.constexpr, WRITE: tl.constexpr, CM: tl.constexpr):
    """`_attend_head` for query head h, its output stored at ``out[h·D:(h+1)·D]`` in out's dtype; WRITE: the
    first query head of each kv head writes the new k/v into the cache."""
    d = tl.arange(0, D_POW2)
    k, v = _first_tile(k_cache_ptr, v_cache_ptr, h, slot, S, H, HKV, D, D_POW2, BLOCK_T)
    o = _attend_head(qkv_ptr, k_cache_ptr, v_cache_ptr, rope_ptr, k, v, h, slot, pos, S, rope_len, scale,
                     WRITE and h % (H // HKV) == 0, H, HKV, D, D_POW2, R, BLOCK_T, CM)
    tl.store(out_ptr + h * D + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _first_tile(k_cache_ptr, v_cache_ptr, h, slot, S, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                D_POW2: tl.constexpr, BLOCK_T: tl.constexpr):
    """The cached keys and values (BLOCK_T, D_POW2) of query head h's kv head in slots 0..BLOCK_T-1 that lie
    before ``slot`` (zeros elsewhere): the first tile that `_attend_head` reads, loaded by its caller."""
    g = h // (H // HKV)
    d = tl.arange(0, D_POW2)
    t = tl.arange(0, BLOCK_T)
    mask = (t < slot)[:, None] & (d < D)[None, :]
    offs = g.to(tl.int64) * S * D + t[:, None] * D + d[None, :]
    return (tl.load(k_cache_ptr + offs, mask=mask, other=0.0), tl.load(v_cache_ptr + offs, mask=mask, other=0.0))


@triton.jit
def _attend_head(qkv_ptr, k_cache_ptr, v_cache_ptr, rope_ptr, k, v, h, slot, pos, S, rope_len, scale, write,
                 H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, D_POW2: tl.constexpr, R: tl.constexpr,
                 BLOCK_T: tl.constexpr, CM: tl.constexpr):
    """Query head h's attention output (D_POW2,) in fp32: RoPE on q and the new k, the new k/v into cache slot
    ``slot`` where ``write``, then softmax attention over slots 0..slot (the cached ones streamed in BLOCK_T
    tiles, online softmax; (k, v) is the first tile, `_first_tile`).

    qkv is [q heads | k heads | v heads] (fp32, loaded with cache modifier CM); the caches are (HKV, S, D)
    in the model's dtype.
    """
    g = h // (H // HKV)
    d = tl.arange(0, D_POW2)
    dmask = d < D
    base = g.to(tl.int64) * S * D
    # The first cache tile is in flight during RoPE; each iteration issues the next tile's loads first.
    q = _rope(qkv_ptr + h * D, d, pos, rope_ptr, rope_len, R, D, CM) * scale
    k_new = _rope(qkv_ptr + (H + g) * D, d, pos, rope_ptr, rope_len, R, D, CM).to(k_cache_ptr.dtype.element_ty)
    v_new = tl.load(qkv_ptr + (H + HKV + g) * D + d, mask=dmask, other=0.0,
                    cache_modifier=CM).to(v_cache_ptr.dtype.element_ty)
    if write:
        tl.store(k_cache_ptr + base + slot * D + d, k_new, mask=dmask)
        tl.store(v_cache_ptr + base + slot * D + d, v_new, mask=dmask)
    m = tl.sum(q * k_new.to(tl.float32), 0)  # the new token's score starts the online softmax
    l_sum = m * 0.0 + 1.0
    acc = v_new.to(tl.float32)
    for t0 in range(0, slot, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        nt = t + BLOCK_T
        next_mask = (nt < slot)[:, None] & dmask[None, :]
        k_next = tl.load(k_cache_ptr + base + nt[:, None] * D + d[None, :], mask=next_mask, other=0.0)
        v_next = tl.load(v_cache_ptr + base + nt[:, None] * D + d[None, :], mask=next_mask, other=0.0)
        s = tl.where(t < slot, tl.sum(k.to(tl.float32) * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        l_sum = l_sum * alpha + tl.sum(p, 0)
        m = m_new
        k, v = k_next, v_next
    return acc / l_sum


@triton.jit
def embed_kernel(tok_ptr, pos_ptr, wte_ptr, wpe_ptr, out_ptr, C, HAS_WPE: tl.constexpr, BLOCK: tl.constexpr):
    """out = wte[tok] (+ wpe[pos]) in fp32."""
    tok = tl.load(tok_ptr).to(tl.int64)
    pos = tl.load(pos_ptr).to(tl.int64)
    for c0 in range(0, C, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        e = tl.load(wte_ptr + tok * C + c, mask=c < C, other=0.0).to(tl.float32)
        if HAS_WPE:
            e += tl.load(wpe_ptr + pos * C + c, mask=c < C, other=0.0).to(tl.float32)
        tl.store(out_ptr + c, _stored(e, out_ptr), mask=c < C)


def to_residual(x: Tensor, like: Tensor) -> Tensor:
    """``x`` in the representation of the residual buffer ``like``: int64 fixed point (`FIXED_BITS`), else its
    dtype (the host's view of `_stored`, for tests and tools)."""
    if like.dtype == torch.int64:
        return (x.to(torch.float64) * 2.0 ** FIXED_BITS).to(torch.int64)
    return x.to(like.dtype)


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape of one `gemv_kernel` call: rows per program, K tile, warps."""

    block_n: int
    block_k: int
    num_warps: int


# Candidates the tuner times on the GPU (the first is the choice without a GPU). GEMVs of ~1-80 MB
# want enough programs to fill every SM, each streaming wide, coalesced K tiles in few iterations.
GEMV_CANDIDATES = (
    GemvConfig(8, 256, 4), GemvConfig(4, 512, 4), GemvConfig(16, 128, 4), GemvConfig(16, 256, 8),
    GemvConfig(32, 128, 4), GemvConfig(2, 1024, 4), GemvConfig(4, 1024, 8), GemvConfig(8, 1024, 8),
    GemvConfig(1, 1024, 4), GemvConfig(2, 2048, 8), GemvConfig(1, 4096, 8), GemvConfig(8, 1024, 4),
    GemvConfig(16, 1024, 8), GemvConfig(4, 1024, 4),
)
# Off the GPU (Triton's interpreter, the tests) a few large programs interpret fastest.
INTERPRETER_GEMV = GemvConfig(64, 256, 4)
# Head GEMVs that feed the greedy reduction keep >= 8 rows per program (few partial maxima).
HEAD_MIN_ROWS = 8
# The LM head (the step's largest GEMV, ~40-80 MB) also tries larger programs: fewer partial maxima to reduce,
# more bytes in flight per program.
HEAD_CANDIDATES = (*(g for g in GEMV_CANDIDATES if g.block_n >= HEAD_MIN_ROWS),
                   GemvConfig(32, 256, 8), GemvConfig(64, 128, 8), GemvConfig(32, 512, 8), GemvConfig(64, 256, 16))


@dataclass(frozen=True)
class AttentionConfig:
    """Launch shape of `attention_kernel`: cache slots per tile, warps."""

    block_t: int
    num_warps: int


ATTENTION_TUNE_SLOT = 256  # cache length the attention candidates are timed at
ADVANCE_BLOCK = 4096  # partial maxima the greedy reduction reads per iteration
ATTENTION_CANDIDATES = (AttentionConfig(64, 4), AttentionConfig(32, 4), AttentionConfig(128, 4),
                        AttentionConfig(128, 8), AttentionConfig(256, 8))


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (a kernel starts before the previous one ends; CUDA graphs keep the
    edge): an sm_90+ GPU and a Triton with the ``launch_pdl`` option."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    from triton.backends.nvidia.compiler import CUDAOptions

    return "launch_pdl" in CUDAOptions.__dataclass_fields__


def _pdl(pdl: bool, dependent: bool = True) -> dict[str, bool]:
    """Launch arguments of a kernel with a ``PDL`` switch (Triton's interpreter takes no ``launch_pdl``). Not
    ``dependent``: the kernel still lets its successor launch early, but is itself launched in stream order."""
    return {"PDL": True, "launch_pdl": dependent} if pdl else {"PDL": False}


def segments(w: Tensor | tuple[Tensor, Tensor, Tensor], bias: Tensor | tuple[Tensor, Tensor, Tensor] | None,
             out: Tensor, block_n: int) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor], int, int,
                                                 int]:
    """A GEMV's weight and bias as three row segments (`_segment`; a stand-in where there is no bias), the rows
    before the second and third, and the rows per program: for split weights they divide each segment (blocks
    stay inside one; a power of two, so the head's partial count never changes: its weight is one segment)."""
    N = out.shape[-1]
    ws = w if isinstance(w, tuple) else (w, w, w)
    bs = bias if isinstance(bias, tuple) else ((bias, bias, bias) if bias is not None else (out, out, out))
    if not isinstance(w, tuple):
        return ws, bs, N, N, block_n
    n1 = ws[0].shape[0]
    n2 = n1 + ws[1].shape[0]
    return ws, bs, n1, n2, math.gcd(block_n, n1, n2 - n1)


def gemv(x: Tensor, w: Tensor | tuple[Tensor, Tensor, Tensor], out: Tensor, config: GemvConfig, *,
         bias: Tensor | tuple[Tensor, Tensor, Tensor] | None = None, norm: tuple[int, Tensor, Tensor | None, float]
         | None = None, act: int = ACT_NONE, up: tuple[Tensor, Tensor | None] | None = None,
         residual: Tensor | None = None, partial: tuple[Tensor, ...] | None = None, rows: int = 0,
         pdl: bool = False) -> None:
    """Launch `gemv_kernel`: ``out = act(W·norm(x) + b) (+ residual)``, for one vector or ``rows`` of them.

    Args:
        x: (K,) input vector, or (R, K) with ``rows`` > 0 (then out, residual and partials have R rows).
        w: (N, K) weight, or three row segments (N1, K), (N2 - N1, K), (N - N2, K).
        out: (N,) output.
        config: Launch shape.
        bias: (N,) bias, or one per segment.
        norm: (NORM_LAYER | NORM_RMS, weight, bias or None, eps) applied to x first.
        act: ACT_* epilogue; ACT_SWIGLU needs ``up``.
        up: SwiGLU's up projection (N, K) and its bias.
        residual: (N,) added last.
        partial: fp32 and int32 buffers of at least cdiv(N, block_n): each program's largest output
            and its row (for `advance`); a third fp32 buffer gets its Σ exp(out - largest) (for `exit_`).
        pdl: Launch as a programmatic dependent of the previous kernel (`pdl_supported`).
    """
    ws, bs, n1, n2, block_n = segments(w, bias, out, config.block_n)
    N, K = out.shape[-1], x.shape[-1]
    kind, nw, nb, eps = norm if norm is not None else (NORM_NONE, x, None, 0.0)
    wu, bu = up if up is not None else (ws[0], None)
    grid = (max(rows, 1), triton.cdiv(N, block_n))
    pmax, pidx, psum = (*partial, out)[:3] if partial is not None else (out, out, out)
    stride_p = pmax.shape[-1] if rows and partial is not None else 0
    gemv_kernel[grid](x, nw, nb if nb is not None else nw, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], wu,
                      bu if bu is not None else bs[0], residual if residual is not None else out, out, pmax, pidx,
                      psum, n1, n2, N, K, eps, K if rows else 0, N if rows else 0, stride_p, NORM=kind, ACT=act,
                      HAS_BIAS=bias is not None, HAS_RES=residual is not None, ARGMAX=partial is not None,
                      SUMEXP=partial is not None and len(partial) == 3, BLOCK_N=block_n,
                      BLOCK_K=config.block_k, K_POW2=triton.next_power_of_2(K), num_warps=config.num_warps,
                      **_pdl(pdl))


def attention(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, rope: Tensor, out: Tensor, slot: Tensor, pos: Tensor,
              n_head: int, n_kv_head: int, head_dim: int, rotary_dim: int, config: AttentionConfig,
              rows: int = 0, pdl: bool = False) -> None:
    """Launch `attention_kernel` over the heads (caches (1, HKV, S, D); rope (2, L, R) fp32 or empty).

    ``rows`` > 0: that many consecutive tokens (qkv (R, ·), out (R, H·D)) whose keys and values
    `kv_rows` has written already.
    """
    S = k_cache.shape[2]
    rope_len = rope.shape[1] if rope.numel() else 0
    attention_kernel[(n_head, max(rows, 1))](qkv, k_cache, v_cache, rope if rope.numel() else qkv, out, slot, pos, S,
                                             rope_len, head_dim ** -0.5, qkv.shape[-1], H=n_head, HKV=n_kv_head,
                                             D=head_dim, D_POW2=triton.next_power_of_2(head_dim), R=rotary_dim,
                                             BLOCK_T=config.block_t, WRITE=rows == 0, num_warps=config.num_warps,
                                             **_pdl(pdl))


def advance(partial: tuple[Tensor, Tensor] | None, n_parts: int, tok: Tensor, tokens: Tensor, t: Tensor,
            slot: Tensor, pos: Tensor, finished: Tensor, eos_id: int | None, block: int, pdl: bool = False) -> None:
    """Launch `advance_kernel` (batch 1): advance slot and position; with ``partial`` (the head's
    partial maxima) also emit the greedy token into ``tok``, ``tokens[t]`` and step ``t``. ``pdl``: as a
    programmatic dependent of the previous kernel (`advance_kernel`)."""
    pmax, pidx = partial if partial is not None else (tok, tok)
    advance_kernel[(1,)](pmax, pidx, n_parts, tok, tokens, t, slot, pos, finished.view(torch.int8),
                         eos_id if eos_id is not None else -1, GREEDY=partial is not None, HAS_EOS=eos_id is not None,
                         BLOCK=min(triton.next_power_of_2(max(n_parts, 1)), block), **_pdl(pdl))


@dataclass
class StepState:
    """Device scalars of a batch-1 early-exit decode (every kernel reads them: nothing on the host).

    Attributes:
        tok: (1, 1) the next input token.
        tokens: (N,) emitted tokens; ``t`` (1,) of them written.
        exited: (N,) int8: token i came from the shallow exit.
        finished: (1,) bool: EOS was emitted.
        pos: (1,) position (and lower-cache slot) of the next input.
    """

    tok: Tensor
    tokens: Tensor
    t: Tensor
    exited: Tensor
    finished: Tensor
    pos: Tensor


def exit_(partial: tuple[Tensor, Tensor, Tensor], n_parts: int, tau: Tensor, deep: Tensor, state: StepState,
          eos_id: int | None, block: int, fill: tuple[Tensor, Tensor, Tensor] | None = None, advance: bool = False,
          pdl: bool = False) -> None:
    """Launch `exit_kernel`: the shallow exit's decision; ``fill`` = (queue length, bucket sizes, flush flags);
    ``advance``: an exiting token advances ``state.pos`` (skip mode); ``pdl``: as a programmatic dependent of
    the exit's head."""
    q, buckets, flush = fill if fill is not None else (state.pos, state.pos, deep)
    n_b = buckets.numel() if fill is not None else 1
    exit_kernel[(1,)](*partial, n_parts, tau, deep.view(torch.int8), state.exited, state.tok, state.tokens, state.t,
                      state.finished.view(torch.int8), eos_id if eos_id is not None else -1, q, buckets,
                      flush.view(torch.int8), n_b, state.pos, HAS_EOS=eos_id is not None, FILL=fill is not None,
                      ADVANCE=advance, BLOCK=min(triton.next_power_of_2(max(n_parts, 1)), block),
                      BLOCK_B=triton.next_power_of_2(n_b), **_pdl(pdl))


def emit(partial: tuple[Tensor, ...], n_parts: int, tok: Tensor, tokens: Tensor, t: Tensor, finished: Tensor,
         eos_id: int | None, block: int, counter: Tensor | None = None, pos: Tensor | None = None,
         pdl: bool = False) -> None:
    """Launch `emit_kernel`: append the greedy token of a head's partials; step ``counter`` and ``pos`` where
    given; ``pdl``: as a programmatic dependent of the head."""
    emit_kernel[(1,)](partial[0], partial[1], n_parts, tok, tokens, t, finished.view(torch.int8),
                      eos_id if eos_id is not None else -1, counter if counter is not None else t,
                      pos if pos is not None else t, HAS_EOS=eos_id is not None, HAS_COUNTER=counter is not None,
                      HAS_POS=pos is not None, BLOCK=min(triton.next_power_of_2(max(n_parts, 1)), block), **_pdl(pdl))


def tick(pos: Tensor, fill: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
    """Launch `tick_kernel`: the position advances; ``fill`` = (queue length, flush flags, flush counter)."""
    q, flush, count = fill if fill is not None else (pos, pos, pos)
    n_b = flush.numel() if fill is not None else 1
    tick_kernel[(1,)](pos, q, flush.view(torch.int8) if fill is not None else pos, n_b, count, FILL=fill is not None,
                      BLOCK_B=triton.next_power_of_2(n_b))


def embed(tok: Tensor, pos: Tensor, wte: Tensor, wpe: Tensor | None, out: Tensor, block: int) -> None:
    """Launch `embed_kernel`: out = wte[tok] (+ wpe[pos])."""
    embed_kernel[(1,)](tok, pos, wte, wpe if wpe is not None else wte, out, out.numel(), HAS_WPE=wpe is not None,
                       BLOCK=block)

