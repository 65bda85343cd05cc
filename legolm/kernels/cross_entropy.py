"""Triton kernels of the chunked linear cross-entropy's softmax step: loss and gradient of each row, in place.

`legolm.train.head_loss` computes the logits of a chunk of tokens with one matmul, then needs, per
row, log-sum-exp, the target's logit, and the gradient softmax − onehot. In torch that is about seven
passes over an fp32 copy of the chunk's logits (upcast, logsumexp, gather, subtract, exp, scatter,
mask, downcast). These kernels read the logits in their own dtype (bf16 under autocast) and write the
gradient over them, in place. A row that fits one program's registers (`StepLaunch.row_max`, GPT-2's and
SmolLM2's vocabularies) is read once::

    whole row:  x = row; m = max x; e = exp(x − m); s = Σ e   → lse = m + log s, loss = lse − x[label]
                g = e / s − [v == label]                        → written over the row (its dtype)

Longer rows (Llama 3's 128,256 words) go by tiles in two passes, reading the row twice::

    pass 1: online max and Σ exp over the row's tiles          → lse, loss = lse − logit[label]
    pass 2: g = exp(logit − lse) − [v == label]                 → written over the logits (their dtype)

Rows whose label is the ignore index get loss 0 and gradient 0. Arithmetic in fp32.

`ce_grad_columns_` is the same gradient for a block of columns (vocabulary entries v0 .. v0 + m) of every
row, given each row's lse from the first kernel: the weight-gradient pass of the chunked loss that
recomputes the logits per vocabulary chunk (`legolm.train.head_loss`, ``vocab_chunk``).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def ce_grad_row_kernel(logits_ptr, labels_ptr, loss_ptr, lse_ptr, V, stride, ignore_index, BLOCK_V: tl.constexpr):
    """One row held whole (BLOCK_V >= V): read once, one exp per logit; loss, log-sum-exp, gradient over it."""
    row = tl.program_id(0)
    ptr = logits_ptr + row.to(tl.int64) * stride
    label = tl.load(labels_ptr + row)
    scored = label != ignore_index
    target = tl.where(scored, label, 0)
    v = tl.arange(0, BLOCK_V)
    x = tl.load(ptr + v, mask=v < V, other=float("-inf")).to(tl.float32)  # (BLOCK_V,)
    m = tl.max(x, 0)
    e = tl.exp(x - m)  # 0 past the row's end
    s = tl.sum(e, 0)
    lse = m + tl.log(s)
    picked = tl.load(ptr + target).to(tl.float32)  # before the row is overwritten
    tl.store(loss_ptr + row, tl.where(scored, lse - picked, 0.0))
    tl.store(lse_ptr + row, lse)
    g = e * (1.0 / s) - tl.where(v == target, 1.0, 0.0)
    g = g * scored.to(tl.float32)
    tl.store(ptr + v, g.to(logits_ptr.dtype.element_ty), mask=v < V)


@triton.jit
def ce_grad_kernel(logits_ptr, labels_ptr, loss_ptr, lse_ptr, V, stride, ignore_index, BLOCK_V: tl.constexpr):
    """One row: its loss into ``loss[row]``, its log-sum-exp into ``lse[row]``, its gradient over its logits."""
    row = tl.program_id(0)
    ptr = logits_ptr + row.to(tl.int64) * stride
    label = tl.load(labels_ptr + row)
    scored = label != ignore_index
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(ptr + v, mask=v < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.where(scored, label, 0)
    picked = tl.load(ptr + target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(scored, lse - picked, 0.0))
    tl.store(lse_ptr + row, lse)
    keep = scored.to(tl.float32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(ptr + v, mask=v < V, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(v == target, 1.0, 0.0)
        tl.store(ptr + v, (g * keep).to(logits_ptr.dtype.element_ty), mask=v < V)


@dataclass(frozen=True)
class StepLaunch:
    """How `ce_grad_` runs over rows of V logits.

    Rows with V <= ``row_max`` (after rounding V up to a power of two) are held whole by one program of
    ``row_warps`` warps and read once; longer rows go in two passes over tiles of ``block_v`` logits with
    ``num_warps`` warps. ``num_stages``: Triton's software pipelining of the two-pass loops (None = Triton's
    default). `benchmarks.ce_step` sweeps all five."""

    row_max: int = 65536
    row_warps: int = 16
    block_v: int = 4096
    num_warps: int = 4
    num_stages: int | None = None

    def whole_row(self, V: int) -> bool:
        return triton.next_power_of_2(V) <= self.row_max


# The library's launch settings, chosen on the H200 by `benchmarks.ce_step` (GPT-2's 16,384 x 50,257 bf16 logits
# of real text, 2026-11-30): README, "the softmax step"
CE_STEP = StepLaunch()
CE_COLUMNS_BLOCK = 4096  # logits per tile of the columns kernel (a power of two)


def ce_grad_(logits: Tensor, labels: Tensor, loss: Tensor, lse: Tensor, ignore_index: int,
             launch: StepLaunch = CE_STEP) -> None:
    """Per row of ``logits`` (n, V): the loss into ``loss`` (n,) fp32, the log-sum-exp into ``lse`` (n,) fp32,
    softmax − onehot written over the logits; whole rows or tiles as ``launch`` says."""
    n, V = logits.shape
    if launch.whole_row(V):
        ce_grad_row_kernel[(n,)](logits, labels, loss, lse, V, logits.stride(0), ignore_index,
                                 BLOCK_V=triton.next_power_of_2(V), num_warps=launch.row_warps)
        return
    stages = {} if launch.num_stages is None else {"num_stages": launch.num_stages}
    ce_grad_kernel[(n,)](logits, labels, loss, lse, V, logits.stride(0), ignore_index,
                         BLOCK_V=min(launch.block_v, triton.next_power_of_2(V)), num_warps=launch.num_warps, **stages)


@triton.jit
def ce_grad_columns_kernel(logits_ptr, labels_ptr, lse_ptr, v0, m, stride, ignore_index, BLOCK: tl.constexpr):
    """One tile of one row of a column block: exp(logit − lse) − [v0 + col == label], 0 where unscored."""
    row, tile = tl.program_id(0), tl.program_id(1)
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    ptr = logits_ptr + row.to(tl.int64) * stride + cols
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    x = tl.load(ptr, mask=cols < m, other=0.0).to(tl.float32)
    g = tl.exp(x - lse) - tl.where(v0 + cols == label, 1.0, 0.0)
    g = tl.where(label != ignore_index, g, 0.0)
    tl.store(ptr, g.to(logits_ptr.dtype.element_ty), mask=cols < m)


def ce_grad_columns_(logits: Tensor, labels: Tensor, lse: Tensor, v0: int, ignore_index: int,
                     block: int = CE_COLUMNS_BLOCK) -> None:
    """``logits`` (n, m): the logits of vocabulary entries v0 .. v0 + m of n rows (any row stride); softmax −
    onehot of those entries written over them, from each row's ``lse`` (n,) fp32."""
    n, m = logits.shape
    block = min(block, triton.next_power_of_2(m))
    ce_grad_columns_kernel[(n, triton.cdiv(m, block))](logits, labels, lse, v0, m, logits.stride(0), ignore_index,
                                                       BLOCK=block)
