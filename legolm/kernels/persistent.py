"""A whole batch-1 decode step as one persistent Triton kernel (one launch per token).

The five-kernel blocks of `legolm.kernels.decode` still pay a kernel boundary per GEMV: ~64
launches of ~3.8 µs for GPT-2, against ~0.05 ms to read its weights. Here one launch of P programs
(one per SM, all resident) runs every phase of the step; a grid barrier replaces each kernel
boundary, and the programs split each phase's rows between them::

    every program: x = wte[tok] (+ wpe[pos])   (each writes the same x: no barrier needed)
    per block:  qkv rows ─┃─ attention heads ─┃─ proj rows ─┃─ up rows ─┃─ down rows ─┃
                (parallel residual: proj and up rows in one phase, as both read only attn and x)
    head rows (partial max per program) ─ the last program to finish: greedy token, slot and position + 1

(┃ = `_grid_sync`). The arithmetic of each phase is the five-kernel step's (`_gemv_rows`,
`_attend`); activations written in the same launch are read with the ".cg" cache modifier (L2,
never a stale L1 line). Weights are read in place through a table of per-layer addresses.

The barrier needs every program resident at once: the launch takes at most one program per SM,
and nothing else may run beside it (a CUDA graph replays it alone on its stream). Triton's CPU
interpreter runs programs one after another, so the tests run one program (every barrier passes
at once) and the GPU tests run the full grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from legolm.kernels.decode import _attend, _emit, _gemv_rows, _greedy

# The per-layer address table: one row of NS int64 addresses per block, in this order.
SLOTS = ("norm1_w", "norm1_b", "w1", "b1", "w2", "b2", "w3", "b3", "proj_w", "proj_b", "norm2_w", "norm2_b", "up_w",
         "up_b", "up2_w", "up2_b", "down_w", "down_b", "k_cache", "v_cache")
NS = len(SLOTS)


@dataclass(frozen=True)
class PhaseShape:
    """Rows per chunk and K tile of one GEMV phase (each program walks its row range in chunks)."""

    block_n: int
    block_k: int


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
def _gemv_phase(x_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, wu_ptr, bu_ptr, res_ptr, out_ptr, N, K, eps, pid, NP,
                NORM: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_POW2: tl.constexpr):
    """This program's contiguous share of the N output rows (`_gemv_rows`), in chunks of BLOCK_N."""
    per = tl.cdiv(N, NP)
    start = pid * per
    end = tl.minimum(start + per, N)
    for r0 in range(start, end, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        rmask = rows < end
        y = _gemv_rows(x_ptr, x_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, wu_ptr, bu_ptr, res_ptr, rows, rows, rmask, K,
                       eps, NORM, ACT, HAS_BIAS, HAS_RES, BLOCK_K, K_POW2, False, False, False, ".cg")
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rmask)


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
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, C_POW2: tl.constexpr,
        BN_QKV: tl.constexpr, BK_QKV: tl.constexpr, BN_PROJ: tl.constexpr, BK_PROJ: tl.constexpr,
        BN_UP: tl.constexpr, BK_UP: tl.constexpr, BN_DOWN: tl.constexpr, BK_DOWN: tl.constexpr,
        BN_HEAD: tl.constexpr, BK_HEAD: tl.constexpr, GREEDY: tl.constexpr, HAS_EOS: tl.constexpr,
        BLOCK_P: tl.constexpr):
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
    barrier = 0  # barriers passed in this launch
    for layer in range(n_layer):
        # every address of the block first: one memory round trip, not one before each phase
        n1w, n1b = _addr(tab_ptr, layer, 0, w, NS), _addr(tab_ptr, layer, 1, w, NS)
        qw, qb = _addr(tab_ptr, layer, 2, w, NS), _addr(tab_ptr, layer, 3, w, NS)
        kw, kb = _addr(tab_ptr, layer, 4, w, NS), _addr(tab_ptr, layer, 5, w, NS)
        vw, vb = _addr(tab_ptr, layer, 6, w, NS), _addr(tab_ptr, layer, 7, w, NS)
        pw, pb = _addr(tab_ptr, layer, 8, w, NS), _addr(tab_ptr, layer, 9, w, NS)
        n2w, n2b = _addr(tab_ptr, layer, 10, w, NS), _addr(tab_ptr, layer, 11, w, NS)
        uw, ub = _addr(tab_ptr, layer, 12, w, NS), _addr(tab_ptr, layer, 13, w, NS)
        u2w, u2b = _addr(tab_ptr, layer, 14, w, NS), _addr(tab_ptr, layer, 15, w, NS)
        dw, db = _addr(tab_ptr, layer, 16, w, NS), _addr(tab_ptr, layer, 17, w, NS)
        kc, vc = _addr(tab_ptr, layer, 18, w, NS), _addr(tab_ptr, layer, 19, w, NS)
        # q, k and v rows (one fused weight: all of them in the first, N1 = N2 = QW)
        _gemv_phase(x_ptr, n1w, n1b, qw, qb, qw, qb, x_ptr, qkv_ptr, N1, C, eps_1, pid, NP, NORM_1, 0, QKV_BIAS,
                    False, BN_QKV, BK_QKV, C_POW2)
        _gemv_phase(x_ptr, n1w, n1b, kw, kb, kw, kb, x_ptr, qkv_ptr + N1, N2 - N1, C, eps_1, pid, NP, NORM_1, 0,
                    QKV_BIAS, False, BN_QKV, BK_QKV, C_POW2)
        _gemv_phase(x_ptr, n1w, n1b, vw, vb, vw, vb, x_ptr, qkv_ptr + N2, QW - N2, C, eps_1, pid, NP, NORM_1, 0,
                    QKV_BIAS, False, BN_QKV, BK_QKV, C_POW2)
        barrier += NP
        _grid_sync(sync_ptr, barrier)
        for head in range(pid, H, NP):
            _attend(qkv_ptr, kc, vc, rope_ptr, attn_ptr, head, slot, pos, S, rope_len, scale, H, HKV, D, D_POW2, R,
                    BLOCK_T, True, ".cg")
        barrier += NP
        _grid_sync(sync_ptr, barrier)
        _gemv_phase(attn_ptr, pw, pw, pw, pb, pw, pb, x_ptr, h_ptr, C, H * D, 0.0, pid, NP, 0, 0, PROJ_BIAS, True,
                    BN_PROJ, BK_PROJ, C_POW2)
        if not PARALLEL:  # the MLP reads h: after the projection (parallel: x, in the same phase)
            barrier += NP
            _grid_sync(sync_ptr, barrier)
        _gemv_phase(x_ptr if PARALLEL else h_ptr, n2w, n2b, uw, ub, u2w, u2b, x_ptr, act_ptr, F, C, eps_2, pid, NP,
                    NORM_2, ACT, UP_BIAS, False, BN_UP, BK_UP, C_POW2)
        barrier += NP
        _grid_sync(sync_ptr, barrier)
        _gemv_phase(act_ptr, dw, dw, dw, db, dw, db, h_ptr, x_ptr, C, F, 0.0, pid, NP, 0, 0, DOWN_BIAS, True,
                    BN_DOWN, BK_DOWN, C_POW2)
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
        y = _gemv_rows(x_ptr, x_ptr, fnw_ptr, fnb_ptr, head_w_ptr, head_b_ptr, head_w_ptr, head_b_ptr, x_ptr, rows,
                       rows, rmask, C, eps_f, NORM_F, 0, HEAD_BIAS, False, BK_HEAD, C_POW2, False, False, False, ".cg")
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


def phase_shape(n: int, k: int, programs: int, max_block_n: int, tile: int) -> PhaseShape:
    """Rows per chunk: a program's whole share where it fits ``max_block_n``; the K tile fills ``tile`` elements."""
    block_n = min(triton.next_power_of_2(triton.cdiv(n, programs)), max_block_n)
    return PhaseShape(block_n, min(triton.next_power_of_2(k), max(tile // block_n, 16)))
