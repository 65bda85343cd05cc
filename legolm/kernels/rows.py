"""Triton kernels for a few tokens at once through the upper layers (batch 1), and LEGO's bookkeeping.

Self-speculative verification (the d drafted tokens and the last accepted one) and lazy KV fill
(the queued exited tokens and the deep one) both run the upper layers over T consecutive
positions whose lower-layer states are known. They run the one-token kernels of
`legolm.kernels.decode` with a row axis (each program computes one row exactly as one-token
decoding does, consecutive programs share a weight tile, so the weights are read from memory
about once), plus one kernel here that writes the keys and values of all rows first, so that
each row attends to the rows before it::

    X ─┬─[1 norm₁ → qkv (+bias), every row]─[2 RoPE k, write k/v of all rows]─[3 attention, every row]
       │          ─[4 proj + bias + X]─ H ─[5 norm₂ → up → GELU | SwiGLU]─[6 down + bias + H]─ X

The same arithmetic as one-token decoding means the verified logits are bit for bit those of
full-depth decoding: self-speculative greedy output equals full-depth greedy output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from legolm.kernels.decode import _rope


@triton.jit
def kv_rows_kernel(qkv_ptr, k_cache_ptr, v_cache_ptr, rope_ptr, start_ptr, S, rope_len, q_width,
                   H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, D_POW2: tl.constexpr, R: tl.constexpr):
    """Row m's key (RoPE at position start + m) and value of kv head g into cache slot start + m."""
    m, g = tl.program_id(0), tl.program_id(1)
    pos = tl.load(start_ptr) + m
    d = tl.arange(0, D_POW2)
    dmask = d < D
    row = qkv_ptr + m * q_width
    k = _rope(row + (H + g) * D, d, pos, rope_ptr, rope_len, R, D, "")
    v = tl.load(row + (H + HKV + g) * D + d, mask=dmask, other=0.0)
    base = g.to(tl.int64) * S * D + pos * D
    tl.store(k_cache_ptr + base + d, k.to(k_cache_ptr.dtype.element_ty), mask=dmask)
    tl.store(v_cache_ptr + base + d, v.to(v_cache_ptr.dtype.element_ty), mask=dmask)


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
                  eos_id, pos_ptr, dpos_ptr, start_ptr, di_ptr, stats_ptr, limit_ptr, live_ptr, HAS_EOS: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK: tl.constexpr):
    """Self-speculative verification (LayerSkip, arXiv 2404.16710), greedy, batch 1.

    Row m of the deep head predicts the token after input m (inputs: the last accepted token and
    the d = T - 1 drafts). The first j drafts that equal those predictions are kept, then the deep
    token z_j (the correction, or a bonus token when all d match): j + 1 tokens, EOS rules kept.
    The position advances by j + 1 (also the draft position and the next row pass's first position,
    ``start``); ``stats`` accumulates (accepted drafts, rounds). ``live`` says
    whether another round is wanted (fewer than ``limit`` tokens and no EOS yet): the gate of the next
    round's IF node.
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
    t = tl.load(t_ptr)
    live = t + j + 1 < tl.load(limit_ptr)
    if HAS_EOS:
        done = tl.load(finished_ptr).to(tl.int1)
        first_eos = tl.min(tl.where(keep & (out == eos_id), ms, BLOCK_T), 0)
        out = tl.where(done | (ms > first_eos), eos_id, out)
        ended = done | (first_eos <= j)
        tl.store(finished_ptr, ended.to(tl.int8))
        live = live & ~ended
    tl.store(live_ptr, live.to(tl.int8))
    tl.store(tokens_ptr + t + ms, out, mask=keep)
    tl.store(t_ptr, t + j + 1)
    tl.store(tok_ptr, tl.sum(tl.where(ms == j, out, 0), 0))
    pos = tl.load(pos_ptr) + j + 1
    tl.store(pos_ptr, pos)
    tl.store(dpos_ptr, pos)
    tl.store(start_ptr, pos)
    tl.store(di_ptr, 0)
    tl.store(stats_ptr, tl.load(stats_ptr) + j)
    tl.store(stats_ptr + 1, tl.load(stats_ptr + 1) + 1)


def kv_rows(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, rope: Tensor, start: Tensor, rows: int, n_head: int,
            n_kv_head: int, head_dim: int, rotary_dim: int) -> None:
    """Launch `kv_rows_kernel`: the keys/values of ``rows`` rows of qkv (R, q_width) into slots start.. of the cache."""
    rope_len = rope.shape[1] if rope.numel() else 0
    kv_rows_kernel[(rows, n_kv_head)](qkv, k_cache, v_cache, rope if rope.numel() else qkv, start, k_cache.shape[2],
                                      rope_len, qkv.shape[1], H=n_head, HKV=n_kv_head, D=head_dim,
                                      D_POW2=triton.next_power_of_2(head_dim), R=rotary_dim)


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
           t: Tensor, finished: Tensor, eos_id: int | None, pos: Tensor, dpos: Tensor, start: Tensor, di: Tensor,
           stats: Tensor, limit: Tensor, live: Tensor, block: int) -> None:
    """Launch `accept_kernel` over ``rows`` = d + 1 verified rows (``n_parts`` head programs per row);
    ``live`` (one bool) is set where t < ``limit`` and no EOS came."""
    accept_kernel[(1,)](partial[0], partial[1], n_parts, partial[0].shape[1], drafts, rows, tok, tokens, t,
                        finished.view(torch.int8), eos_id if eos_id is not None else -1, pos, dpos, start, di, stats,
                        limit, live.view(torch.int8), HAS_EOS=eos_id is not None, BLOCK_T=triton.next_power_of_2(rows),
                        BLOCK=min(triton.next_power_of_2(n_parts), block))


__all__ = ["accept", "gather_rows", "kv_rows", "put_row", "select_row"]
