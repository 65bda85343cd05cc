"""Triton kernels of the low-rank head loss that never write the gradient of the logits (`legolm.train.low_rank_head`).

Skip2-LoRA's head loss through a frozen head W (V, C) needs, per chunk of logits X (n, V), the softmax gradient
G = softmax(X) − onehot only through two narrow products: dz = G U (n, R), U = W b, and Gᵀz (V, R). Written
out, G costs a write and three reads of the logits' size (the softmax step's second pass, then one read per
product). These two kernels read the logits three times and write nothing of their size::

    rows_kernel     a block of BLOCK_M rows:  pass 1  online max / Σ exp over vocabulary tiles → lse, loss
                                              pass 2  g = exp(x − lse) − onehot ; dz += g @ U[tile]
    columns_kernel  a tile of BLOCK_V words:  over all row blocks: g as above ; Gᵀz[tile] += gᵀ @ z[rows]

Each output belongs to one program (dz to its row block, Gᵀz to its vocabulary tile): no atomics, and the
sums run in a fixed order. g enters the products in the factors' dtype (bf16 under autocast), as the
written-out G does in the GEMMs it replaces; sums are fp32. Rows whose label is the ignore index give loss 0
and no gradient. The logits are the first V columns of rows whose storage holds W >= V columns (the chunked
loss pads the head to a multiple of 64): the loads run over W columns (aligned vectors) and the columns past
V are masked in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from legolm.kernels.cross_entropy import load_width


@triton.jit
def rows_kernel(logits_ptr, labels_ptr, u_ptr, loss_ptr, lse_ptr, dz_ptr, N, V, W, stride, ignore_index, R,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """Rows pid·BLOCK_M ..: their loss, log-sum-exp and dz = G U (R columns of R_PAD), G never stored."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < N
    labels = tl.load(labels_ptr + rows, mask=in_rows, other=ignore_index)
    keep = labels != ignore_index
    target = tl.where(keep, labels, 0)
    base = logits_ptr + rows.to(tl.int64)[:, None] * stride  # (BLOCK_M, 1)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    picked = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(0, W, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + v[None, :], mask=in_rows[:, None] & (v < W)[None, :], other=0.0).to(tl.float32)
        x = tl.where((v < V)[None, :], x, float("-inf"))  # (BLOCK_M, BLOCK_V)
        m_new = tl.maximum(m, tl.max(x, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
        m = m_new
        picked += tl.sum(tl.where(v[None, :] == target[:, None], x, 0.0), 1)
    lse = m + tl.log(s)
    tl.store(loss_ptr + rows, tl.where(keep, lse - picked, 0.0), mask=in_rows)
    tl.store(lse_ptr + rows, lse, mask=in_rows)
    r = tl.arange(0, R_PAD)
    acc = tl.zeros([BLOCK_M, R_PAD], tl.float32)
    for v0 in range(0, W, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + v[None, :], mask=in_rows[:, None] & (v < W)[None, :], other=0.0).to(tl.float32)
        x = tl.where((v < V)[None, :], x, float("-inf"))
        g = tl.exp(x - lse[:, None]) - tl.where(v[None, :] == target[:, None], 1.0, 0.0)
        g = tl.where(keep[:, None], g, 0.0)
        u = tl.load(u_ptr + v[:, None] * R + r[None, :], mask=(v < V)[:, None] & (r < R)[None, :], other=0.0)
        acc += tl.dot(g.to(u.dtype), u, input_precision=PRECISION)  # (BLOCK_M, R_PAD)
    tl.store(dz_ptr + rows[:, None] * R + r[None, :], acc, mask=in_rows[:, None] & (r < R)[None, :])


@triton.jit
def columns_kernel(logits_ptr, labels_ptr, lse_ptr, z_ptr, gtz_ptr, N, V, W, stride, ignore_index, R,
                   BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """Words pid·BLOCK_V ..: Gᵀz of their rows added into ``gtz`` (fp32), over all N rows, G never stored."""
    v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    r = tl.arange(0, R_PAD)
    acc = tl.zeros([BLOCK_V, R_PAD], tl.float32)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        in_rows = rows < N
        labels = tl.load(labels_ptr + rows, mask=in_rows, other=ignore_index)
        keep = labels != ignore_index
        lse = tl.load(lse_ptr + rows, mask=in_rows, other=0.0)
        x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride + v[None, :],
                    mask=in_rows[:, None] & (v < W)[None, :], other=0.0).to(tl.float32)
        g = tl.exp(tl.where((v < V)[None, :], x, float("-inf")) - lse[:, None])
        g = g - tl.where(v[None, :] == labels[:, None], 1.0, 0.0)
        g = tl.where(keep[:, None], g, 0.0)  # (BLOCK_M, BLOCK_V)
        z = tl.load(z_ptr + rows[:, None] * R + r[None, :], mask=in_rows[:, None] & (r < R)[None, :], other=0.0)
        acc += tl.dot(tl.trans(g.to(z.dtype)), z, input_precision=PRECISION)  # (BLOCK_V, R_PAD)
    out = gtz_ptr + v[:, None] * R + r[None, :]
    mask = (v < V)[:, None] & (r < R)[None, :]
    tl.store(out, tl.load(out, mask=mask, other=0.0) + acc, mask=mask)


@dataclass(frozen=True)
class TileLaunch:
    """One kernel's tiles, BLOCK_M rows by BLOCK_V words, its warps and the software pipelining of its loops
    (``num_stages``; None = Triton's default). `benchmarks.low_rank_ce` sweeps them on real logits."""

    block_m: int
    block_v: int
    num_warps: int = 4
    num_stages: int | None = None

    def options(self) -> dict[str, int]:
        """The launch keywords Triton takes."""
        return {"num_warps": self.num_warps, **({} if self.num_stages is None else {"num_stages": self.num_stages})}


@dataclass(frozen=True)
class LowRankLaunch:
    """The tiles of the two kernels."""

    rows: TileLaunch = TileLaunch(64, 128)
    columns: TileLaunch = TileLaunch(64, 128)


LOW_RANK_LAUNCH = LowRankLaunch()


def _padded_rank(R: int) -> int:
    return max(16, triton.next_power_of_2(R))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 factors: exact products (tests, CPU)


def low_rank_rows_(logits: Tensor, labels: Tensor, u: Tensor, loss: Tensor, lse: Tensor, dz: Tensor,
                   ignore_index: int, launch: TileLaunch) -> None:
    """`rows_kernel` over logits (n, V): per-row loss and log-sum-exp into ``loss``, ``lse`` (n,) fp32, dz = G U
    into ``dz`` (n, R) fp32."""
    n, V = logits.shape
    R = u.shape[1]
    rows_kernel[(triton.cdiv(n, launch.block_m),)](
        logits, labels, u, loss, lse, dz, n, V, load_width(logits), logits.stride(0), ignore_index, R,
        BLOCK_M=launch.block_m, BLOCK_V=launch.block_v, R_PAD=_padded_rank(R), PRECISION=_precision(u.dtype),
        **launch.options())


def low_rank_columns_(logits: Tensor, labels: Tensor, lse: Tensor, z: Tensor, gtz: Tensor, ignore_index: int,
                      launch: TileLaunch) -> None:
    """`columns_kernel` over logits (n, V) and the rows' ``lse``: Gᵀz added into ``gtz`` (≥ V, R) fp32."""
    n, V = logits.shape
    R = z.shape[1]
    columns_kernel[(triton.cdiv(V, launch.block_v),)](
        logits, labels, lse, z, gtz, n, V, load_width(logits), logits.stride(0), ignore_index, R,
        BLOCK_M=launch.block_m, BLOCK_V=launch.block_v, R_PAD=_padded_rank(R), PRECISION=_precision(z.dtype),
        **launch.options())


def low_rank_softmax_(logits: Tensor, labels: Tensor, u: Tensor, z: Tensor, loss: Tensor, lse: Tensor,
                      dz: Tensor, gtz: Tensor, ignore_index: int, launch: LowRankLaunch = LOW_RANK_LAUNCH) -> None:
    """For logits (n, V) (the first V columns of padded rows, which stay as they are): per-row loss and
    log-sum-exp into ``loss``, ``lse`` (n,) fp32; dz = G U into ``dz`` (n, R) fp32; Gᵀz added into ``gtz``
    (≥ V, R) fp32, with G = softmax − onehot (0 on unscored rows). ``u`` (≥ V, R) and ``z`` (n, R): contiguous, in
    the dtype the products take."""
    if not (u.is_contiguous() and z.is_contiguous() and dz.is_contiguous() and gtz.is_contiguous()):
        raise ValueError("low_rank_softmax_ needs contiguous u, z, dz and gtz")
    low_rank_rows_(logits, labels, u, loss, lse, dz, ignore_index, launch.rows)
    low_rank_columns_(logits, labels, lse, z, gtz, ignore_index, launch.columns)
