"""Triton kernel of the chunked linear cross-entropy's softmax step: loss and gradient in two passes over a row.

`legolm.train.head_loss` computes the logits of a chunk of tokens with one matmul, then needs, per
row, log-sum-exp, the target's logit, and the gradient softmax − onehot. In torch that is about seven
passes over an fp32 copy of the chunk's logits (upcast, logsumexp, gather, subtract, exp, scatter,
mask, downcast). This kernel reads the logits in their own dtype (bf16 under autocast) twice and
writes the gradient over them once, in place::

    pass 1: online max and Σ exp over the row           → lse, loss = lse − logit[label]
    pass 2: g = exp(logit − lse) − [v == label], × scale  → written over the logits (their dtype)

Rows whose label is the ignore index get loss 0 and gradient 0. Arithmetic in fp32.

Where the caller's rows have scratch columns past V (``pad_scratch``: the chunked loss's logits are the first
V columns of rows padded to a multiple of 64), the kernel reads and writes W >= V columns, W a multiple of
`LOAD_ALIGN`, and masks the columns past V in registers (they get gradient 0): a row's tiles then load in
aligned vectors, where a mask at an odd V (GPT-2's 50,257) forces one element per load.

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
def ce_grad_kernel(logits_ptr, labels_ptr, loss_ptr, lse_ptr, V, W, stride, ignore_index, BLOCK_V: tl.constexpr):
    """One row: its loss into ``loss[row]``, its log-sum-exp into ``lse[row]``, its gradient over its first W
    logits (0 past the row's V)."""
    row = tl.program_id(0)
    ptr = logits_ptr + row.to(tl.int64) * stride
    label = tl.load(labels_ptr + row)
    scored = label != ignore_index
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    for v0 in range(0, W, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(ptr + v, mask=v < W, other=float("-inf")).to(tl.float32)
        x = tl.where(v < V, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.where(scored, label, 0)
    picked = tl.load(ptr + target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(scored, lse - picked, 0.0))
    tl.store(lse_ptr + row, lse)
    keep = scored.to(tl.float32)
    for v0 in range(0, W, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(ptr + v, mask=v < W, other=float("-inf")).to(tl.float32)
        x = tl.where(v < V, x, float("-inf"))  # pad columns: exp gives 0
        g = tl.exp(x - lse) - tl.where(v == target, 1.0, 0.0)
        tl.store(ptr + v, (g * keep).to(logits_ptr.dtype.element_ty), mask=v < W)


@dataclass(frozen=True)
class StepLaunch:
    """How `ce_grad_` runs: tiles of ``block_v`` logits (a power of two) with ``num_warps`` warps, and Triton's
    software pipelining of the row loops (``num_stages``; None = Triton's default). `benchmarks.ce_step`
    sweeps all three."""

    block_v: int = 2048
    num_warps: int = 8
    num_stages: int | None = None


# The library's launch settings, chosen on the H200 by `benchmarks.ce_step` (GPT-2's 16,384 x 50,257 bf16 logits
# of real text in the chunked loss's padded rows, 2026-11-30): docs/results/benchmarks.md, "the softmax step"
CE_STEP = StepLaunch()
CE_COLUMNS_BLOCK = 4096  # logits per tile of the columns kernel (a power of two)
LOAD_ALIGN = 16  # with pad_scratch, a row's loaded width W is V rounded up to a multiple of this


def ce_grad_(logits: Tensor, labels: Tensor, loss: Tensor, lse: Tensor, ignore_index: int,
             launch: StepLaunch = CE_STEP, pad_scratch: bool = False) -> None:
    """Per row of ``logits`` (n, V): the loss into ``loss`` (n,) fp32, the log-sum-exp into ``lse`` (n,) fp32,
    softmax − onehot written over the logits. ``pad_scratch``: the columns past V up to the row stride are the
    caller's scratch; up to `LOAD_ALIGN` − 1 of them may be read and set to 0."""
    n, V = logits.shape
    W = load_width(logits) if pad_scratch else V
    stages = {} if launch.num_stages is None else {"num_stages": launch.num_stages}
    ce_grad_kernel[(n,)](logits, labels, loss, lse, V, W, logits.stride(0), ignore_index,
                         BLOCK_V=min(launch.block_v, triton.next_power_of_2(W)), num_warps=launch.num_warps,
                         **stages)


def load_width(logits: Tensor) -> int:
    """V rounded up to a multiple of `LOAD_ALIGN` where every row of ``logits`` (n, V) has that many columns in
    its storage (row stride and the storage's end), else V."""
    n, V = logits.shape
    W = -(-V // LOAD_ALIGN) * LOAD_ALIGN
    end = logits.storage_offset() + (n - 1) * logits.stride(0) + W
    fits = logits.stride(1) == 1 and logits.stride(0) >= W and end * logits.element_size() <= (
        logits.untyped_storage().nbytes())
    return W if fits else V


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
