"""A whole batch-1 decode step as one persistent Triton kernel (one launch per token).

The five-kernel blocks of `legolm.kernels.decode` still pay a kernel boundary per GEMV: ~64
launches of ~3.8 µs for GPT-2, against ~0.05 ms to read its weights. Here one launch of P programs
(one per SM, all resident) runs every phase of the step; a grid barrier (~0.9 µs on an H200)
replaces each kernel boundary, and the programs split each phase's rows between them. A program
holds its whole share of a phase's weight as one register tile, loaded *before* the barrier that
precedes the phase, so the weights' memory latency overlaps the wait::

    every program: x = wte[tok] (+ wpe[pos])   (each writes the same x: no barrier needed)
    per block:  qkv rows ─┃─ attention heads ─┃─ proj rows ─┃─ up rows ─┃─ down rows ─┃
                (parallel residual: proj and up rows in one phase, as both read only attn and x)
    head rows (partial max per program) ─ the last program to finish: greedy token, slot and position + 1

(┃ = `_grid_sync`). A phase's arithmetic is the five-kernel step's (its norm, epilogue and attention
device functions; one K tile instead of several, so sums may differ in the last bits); activations
written in the same launch are read with the ".cg" cache modifier (L2, never a stale L1 line).
Weights are read in place through a table of per-layer addresses. The tiles bound the model size:
a program's share of each weight must fit its registers (`PersistentShape.tile`).

The barrier needs every program resident at once: the launch takes at most one program per SM,
and nothing else may run beside it (a CUDA graph replays it alone on its stream). Triton's CPU
interpreter runs programs one after another, so the tests run one program (every barrier passes
at once) and the GPU tests run the full grid.
"""

from __future__ import annotations

import triton
import triton.language as tl

from legolm.kernels.decode import _attend, _emit, _epilogue, _gemv_rows, _greedy, _normed, _stats

# The per-layer address table: one row of NS int64 addresses per block, in this order.
SLOTS = ("norm1_w", "norm1_b", "w1", "b1", "w2", "b2", "w3", "b3", "proj_w", "proj_b", "norm2_w", "norm2_b", "up_w",
         "up_b", "up2_w", "up2_b", "down_w", "down_b", "k_cache", "v_cache")
NS = len(SLOTS)


@triton.jit
def _grid_sync(sync_ptr, target):
    """Wait until the barrier count reaches ``target`` (barrier i of a launch: (i + 1) · programs).

    Each program adds its arrival (release: its writes go with it) and spins until every program has arrived
    (acquire). The count only grows during a launch; the last program of the step resets it. (On an H200 this
    costs ~0.9 µs, half a barrier that resets itself with a generation counter.)
    """
    tl.debug_barrier()  # every thread of this program has written its part
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
    while tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _addr(tab_ptr, layer, slot: tl.constexpr, like, NS: tl.constexpr):
    """The address in table row ``layer``, column ``slot`` (`SLOTS`), as a pointer of ``like``'s type (the host
    checks that it is 16-byte aligned)."""
    return tl.multiple_of(tl.load(tab_ptr + layer * NS + slot).to(like.dtype), 16)


@triton.jit
def _share(N, pid, NP):
    """The rows start..end of an N-row weight that program ``pid`` of NP computes."""
    per = tl.cdiv(N, NP)
    start = pid * per
    return start, tl.minimum(start + per, N)


@triton.jit
def _tile(w_ptr, wu_ptr, N, K, pid, NP, BN: tl.constexpr, BK: tl.constexpr, ACT: tl.constexpr):
    """This program's whole share of an (N, K) weight as one register tile [BN, BK] (and SwiGLU's up tile).

    Loaded before the barrier that precedes its phase: weights never change, so their memory latency
    overlaps the previous phase's wait (what programmatic dependent launch does for the five-kernel step).
    """
    start, end = _share(N, pid, NP)
    rows = start + tl.arange(0, BN)
    cols = tl.arange(0, BK)
    mask = (rows < end)[:, None] & (cols < K)[None, :]
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    wu = w
    if ACT == 3:
        wu = tl.load(wu_ptr + offs, mask=mask, other=0.0)
    return w, wu


@triton.jit
def _finish(w, wu, x_ptr, nw_ptr, nb_ptr, b_ptr, bu_ptr, res_ptr, out_ptr, N, K, eps, pid, NP, NORM: tl.constexpr,
            ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[rows] = act(W·norm(x) + b) (+ res) for this program's share, from its tile (`_tile`): one load of x
    (".cg": other programs wrote it), the norm statistics from those registers (`legolm.kernels.decode`)."""
    start, end = _share(N, pid, NP)
    rows = start + tl.arange(0, BN)
    rmask = rows < end
    cols = tl.arange(0, BK)
    kmask = cols < K
    x = tl.load(x_ptr + cols, mask=kmask, other=0.0, cache_modifier=".cg").to(tl.float32)
    if NORM != 0:
        mean, rstd = _stats(x, cols, K, eps, NORM)
        x = _normed(x, cols, kmask, mean, rstd, nw_ptr, nb_ptr, NORM)
    y = tl.sum(w.to(tl.float32) * x[None, :], 1)
    u = y
    if ACT == 3:
        u = tl.sum(wu.to(tl.float32) * x[None, :], 1)
    y = _epilogue(y, u, b_ptr, bu_ptr, res_ptr, rows, rows, rmask, ACT, HAS_BIAS, HAS_RES, ".cg")
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _qkv_tiles(tab_ptr, layer, like, N1, N2, QW, C, pid, NP, NS: tl.constexpr, BN_Q: tl.constexpr,
               BN_K: tl.constexpr, BN_V: tl.constexpr, C_POW2: tl.constexpr):
    """Block ``layer``'s q, k and v weight tiles of this program (`_tile`)."""
    tq, _ = _tile(_addr(tab_ptr, layer, 2, like, NS), like, N1, C, pid, NP, BN_Q, C_POW2, 0)
    tk, _ = _tile(_addr(tab_ptr, layer, 4, like, NS), like, N2 - N1, C, pid, NP, BN_K, C_POW2, 0)
    tv, _ = _tile(_addr(tab_ptr, layer, 6, like, NS), like, QW - N2, C, pid, NP, BN_V, C_POW2, 0)
    return tq, tk, tv


@triton.jit
def persistent_step_kernel(
        tab_ptr, NS: tl.constexpr, wte_ptr, wpe_ptr, fnw_ptr, fnb_ptr, head_w_ptr, head_b_ptr, rope_ptr,
        x_ptr, h_ptr, qkv_ptr, attn_ptr, act_ptr, logits_ptr, pmax_ptr, pidx_ptr, sync_ptr,
        tok_ptr, tokens_ptr, t_ptr, slot_ptr, pos_ptr, finished_ptr, eos_id,
        n_layer, C, N1, N2, QW, F, V, S, rope_len, scale, eps_1, eps_2, eps_f,
        NORM_1: tl.constexpr, NORM_2: tl.constexpr, NORM_F: tl.constexpr, ACT: tl.constexpr,
        QKV_BIAS: tl.constexpr, PROJ_BIAS: tl.constexpr, UP_BIAS: tl.constexpr, DOWN_BIAS: tl.constexpr,
        HEAD_BIAS: tl.constexpr, HAS_WPE: tl.constexpr, PARALLEL: tl.constexpr,
        H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, D_POW2: tl.constexpr, R: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, C_POW2: tl.constexpr, HD_POW2: tl.constexpr,
        F_POW2: tl.constexpr, BN_Q: tl.constexpr, BN_K: tl.constexpr, BN_V: tl.constexpr, BN_P: tl.constexpr,
        BN_U: tl.constexpr, BN_D: tl.constexpr, BN_HEAD: tl.constexpr, BK_HEAD: tl.constexpr,
        GREEDY: tl.constexpr, HAS_EOS: tl.constexpr, BLOCK_P: tl.constexpr):
    """One decode step of a batch-1 `TransformerLM` (module docstring); grid (P,), P <= the SM count.

    ``tab_ptr``: (n_layer, NS) int64 addresses (`SLOTS`) of each block's weights (the model's dtype)
    and KV caches ((HKV, S, D) each). Rows of the qkv weight: < N1 in w1, < N2 in w2, the rest in w3
    (one fused weight: N1 = N2 = QW). ``sync_ptr``: two int32 counters (barrier arrivals, programs done with
    the step), zero before the first launch (every launch leaves them so). The residual stream x and h is
    fp32, attn and act the model's dtype.
    """
    pid = tl.program_id(0)
    NP = tl.num_programs(0)
    tok = tl.load(tok_ptr).to(tl.int64)
    pos = tl.load(pos_ptr)
    slot = tl.load(slot_ptr)
    for c0 in range(0, C, BLOCK_C):  # every program writes the same embedding: no barrier before block 0
        c = c0 + tl.arange(0, BLOCK_C)
        e = tl.load(wte_ptr + tok * C + c, mask=c < C, other=0.0).to(tl.float32)
        if HAS_WPE:
            e += tl.load(wpe_ptr + pos * C + c, mask=c < C, other=0.0).to(tl.float32)
        tl.store(x_ptr + c, e, mask=c < C)
    tl.debug_barrier()
    w = wte_ptr  # the weights' pointer type
    barrier = 0  # barrier arrivals to wait for (NP per barrier passed in this launch)
    tq, tk, tv = _qkv_tiles(tab_ptr, 0, w, N1, N2, QW, C, pid, NP, NS, BN_Q, BN_K, BN_V, C_POW2)
    for layer in range(n_layer):
        # every address of the block first: one memory round trip, not one before each phase
        n1w, n1b = _addr(tab_ptr, layer, 0, w, NS), _addr(tab_ptr, layer, 1, w, NS)
        qb, kb, vb = _addr(tab_ptr, layer, 3, w, NS), _addr(tab_ptr, layer, 5, w, NS), _addr(tab_ptr, layer, 7, w, NS)
        pw, pb = _addr(tab_ptr, layer, 8, w, NS), _addr(tab_ptr, layer, 9, w, NS)
        n2w, n2b = _addr(tab_ptr, layer, 10, w, NS), _addr(tab_ptr, layer, 11, w, NS)
        uw, ub = _addr(tab_ptr, layer, 12, w, NS), _addr(tab_ptr, layer, 13, w, NS)
        u2w, u2b = _addr(tab_ptr, layer, 14, w, NS), _addr(tab_ptr, layer, 15, w, NS)
        dw, db = _addr(tab_ptr, layer, 16, w, NS), _addr(tab_ptr, layer, 17, w, NS)
        kc, vc = _addr(tab_ptr, layer, 18, w, NS), _addr(tab_ptr, layer, 19, w, NS)
        # q, k and v rows (one fused weight: all in the first, N1 = N2 = QW)
        _finish(tq, tq, x_ptr, n1w, n1b, qb, qb, x_ptr, qkv_ptr, N1, C, eps_1, pid, NP, NORM_1, 0, QKV_BIAS, False,
                BN_Q, C_POW2)
        _finish(tk, tk, x_ptr, n1w, n1b, kb, kb, x_ptr, qkv_ptr + N1, N2 - N1, C, eps_1, pid, NP, NORM_1, 0, QKV_BIAS,
                False, BN_K, C_POW2)
        _finish(tv, tv, x_ptr, n1w, n1b, vb, vb, x_ptr, qkv_ptr + N2, QW - N2, C, eps_1, pid, NP, NORM_1, 0, QKV_BIAS,
                False, BN_V, C_POW2)
        tp, _ = _tile(pw, pw, C, H * D, pid, NP, BN_P, HD_POW2, 0)
        if PARALLEL:  # its MLP phase comes right after the projection, without a barrier: load it now
            tu, tu2 = _tile(uw, u2w, F, C, pid, NP, BN_U, C_POW2, ACT)
        barrier += NP
        _grid_sync(sync_ptr, barrier)
        for head in range(pid, H, NP):
            _attend(qkv_ptr, kc, vc, rope_ptr, attn_ptr, head, slot, pos, S, rope_len, scale, H, HKV, D, D_POW2, R,
                    BLOCK_T, True, ".cg")
        barrier += NP
        _grid_sync(sync_ptr, barrier)
        _finish(tp, tp, attn_ptr, pw, pw, pb, pb, x_ptr, h_ptr, C, H * D, 0.0, pid, NP, 0, 0, PROJ_BIAS, True, BN_P,
                HD_POW2)
        if not PARALLEL:  # the MLP reads h: after the projection (parallel: x, in the same phase)
            tu, tu2 = _tile(uw, u2w, F, C, pid, NP, BN_U, C_POW2, ACT)
            barrier += NP
            _grid_sync(sync_ptr, barrier)
        _finish(tu, tu2, x_ptr if PARALLEL else h_ptr, n2w, n2b, ub, u2b, x_ptr, act_ptr, F, C, eps_2, pid, NP, NORM_2,
                ACT, UP_BIAS, False, BN_U, C_POW2)
        td, _ = _tile(dw, dw, C, F, pid, NP, BN_D, F_POW2, 0)
        barrier += NP
        _grid_sync(sync_ptr, barrier)
        _finish(td, td, act_ptr, dw, dw, db, db, h_ptr, x_ptr, C, F, 0.0, pid, NP, 0, 0, DOWN_BIAS, True, BN_D, F_POW2)
        # the next block's q/k/v tiles (the table has a spare last row: nothing past it is read)
        tq, tk, tv = _qkv_tiles(tab_ptr, layer + 1, w, N1, N2, QW, C, pid, NP, NS, BN_Q, BN_K, BN_V, C_POW2)
        barrier += NP
        _grid_sync(sync_ptr, barrier)
    # the head: each program's rows, its largest logit and row (the first of ties) as a partial
    per = tl.cdiv(V, NP)
    start = pid * per
    end = tl.minimum(start + per, V)
    best = float("-inf")
    arg = 2147483647
    for r0 in range(start, end, BN_HEAD):
        rows = r0 + tl.arange(0, BN_HEAD)
        rmask = rows < end
        y = _gemv_rows(x_ptr, fnw_ptr, fnb_ptr, head_w_ptr, head_b_ptr, head_w_ptr, head_b_ptr, x_ptr, rows, rows,
                       rmask, C, eps_f, NORM_F, 0, HEAD_BIAS, False, BK_HEAD, C_POW2, False, ".cg")
        tl.store(logits_ptr + rows, y, mask=rmask)
        y = tl.where(rmask, y, float("-inf"))
        top = tl.max(y, 0)
        take = top > best  # chunks ascend: a tie keeps the earlier row
        arg = tl.where(take, tl.min(tl.where(y == top, rows, V), 0), arg)
        best = tl.where(take, top, best)
    tl.store(pmax_ptr + pid, best)
    tl.store(pidx_ptr + pid, arg)
    tl.debug_barrier()
    if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu") == NP - 1:  # the last program ends the step
        tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed", scope="gpu")  # every program has passed every barrier
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
        tl.store(slot_ptr, slot + 1)
        tl.store(pos_ptr, pos + 1)
        if GREEDY:
            _, nxt = _greedy(pmax_ptr, pidx_ptr, NP, BLOCK_P, ".cg")
            _emit(nxt, nxt >= 0, tok_ptr, tokens_ptr, t_ptr, finished_ptr, eos_id, HAS_EOS)


def share_rows(n: int, programs: int) -> int:
    """Rows of a program's tile for an n-row weight: its share, rounded up to a power of two (at least 1)."""
    return triton.next_power_of_2(max(triton.cdiv(n, programs), 1))
