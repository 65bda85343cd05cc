"""Cross-entropy through a frozen LM head whose input moves only in a low-rank subspace: x = h + z bᵀ.

Skip2-LoRA's head input is norm(h_L-1) + Σᵢ sᵢ Bᵢ Aᵢ tᵢ = h + z bᵀ, with z = [A₁t₁ … A_K t_K] (N, R) and
b = [s₁B₁ … s_K B_K] (C, R), R = K·r (`legolm.adapters.skip2lora.Skip2LoRAModel.head_parts`). The head W
(V, C) and h are frozen, so the adapters' gradients can go through the head projected onto the R
directions b spans::

    x = h + z bᵀ                   (n, C)   per chunk of n tokens
    logits = x Wᵀ                  (n, V)   the one full-size GEMM
    G = softmax(logits) − onehot   (n, V)   in place (`legolm.train.head_loss.softmax_step`)
    dz = G U,  U = W b             (n, R)   U (V, R) made once per call
    Gᵀz summed over chunks         (V, R)   then db = Wᵀ (Gᵀz)   (C, R)

The usual chain, dx = G W (n, C) then dz = dx b and db = dxᵀ z, spends a second full-size GEMM (its
reduction over the whole vocabulary) on a gradient nobody keeps: h and W are frozen. Here the two products
with G cost R/C of it each (R = 80 against C = 768 for ten rank-8 taps on GPT-2), and no (n, C) gradient
exists. The gradients are the same in exact arithmetic; in bf16 each takes two roundings as before, at
other points (U instead of dx). With the head-GEMM floor of `benchmarks.skip2lora` defined as the two
GEMMs (logits and dx), a cached Skip2-LoRA epoch can now go below that floor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from legolm.train.head_loss import (
    IGNORE_INDEX,
    LossKernel,
    ProductSum,
    accumulates_in_place,
    head_rows,
    save_for_scaling,
    scale_once_,
    softmax_chunks,
    softmax_step,
)

VOCAB_SLICE = 8192  # rows of W at a time when db = Wᵀ (Gᵀz) is summed in fp32 (bounds its fp32 copy of W)


def low_rank_head_cross_entropy(weight: Tensor, h: Tensor, z: Tensor, b: Tensor, labels: Tensor,
                                chunk_tokens: int = 0, kernel: LossKernel = "torch") -> Tensor:
    """Mean next-token cross-entropy of the logits (h + z bᵀ) Wᵀ over the labels that are not ``IGNORE_INDEX``.

    Args:
        weight: The frozen head W (V, C) (a bias-free head).
        h: Frozen head-input part (..., C).
        z: Low-rank coordinates (..., R): gradients flow to it.
        b: The directions (C, R): gradients flow to it.
        labels: Targets (...), ``IGNORE_INDEX`` where a position is not scored.
        chunk_tokens: Rows of logits alive at a time (0 = all at once).
        kernel: The softmax step of a chunk: torch ops, or the Triton kernel.
    """
    if h.requires_grad or weight.requires_grad:
        raise ValueError("low_rank_head_cross_entropy computes gradients for z and b only; h and the head weight "
                         "must be frozen (use head_cross_entropy when they train)")
    C, R = h.shape[-1], z.shape[-1]
    h, z, labels = h.reshape(-1, C), z.reshape(-1, R), labels.reshape(-1)  # (N, C), (N, R), (N,)
    chunk = chunk_tokens if chunk_tokens > 0 else h.shape[0]
    grads = torch.is_grad_enabled() and (z.requires_grad or b.requires_grad)
    total = _low_rank_cross_entropy(h, z, b, weight, labels, chunk, kernel == "triton", grads)
    return total / (labels != IGNORE_INDEX).sum()  # 0/0 = nan when nothing is scored, as F.cross_entropy gives


@torch.compiler.disable
def _low_rank_cross_entropy(h: Tensor, z: Tensor, b: Tensor, weight: Tensor, labels: Tensor, chunk: int,
                            triton_step: bool, grads: bool) -> Tensor:
    """`_LowRankHeadCrossEntropy` run eagerly inside a compiled step, as `head_loss._fused_linear_cross_entropy`."""
    return _LowRankHeadCrossEntropy.apply(h, z, b, weight, labels, chunk, triton_step, grads)


class _LowRankHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy chunk by chunk; dz and db computed in forward (module docstring), scaled in backward."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, z: Tensor, b: Tensor, weight: Tensor, labels: Tensor, chunk: int,
                triton_step: bool, grads: bool) -> Tensor:
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        with torch.autocast(device, enabled=False):
            acc = torch.promote_types(dtype, torch.float32)
            w, bd = head_rows(weight, dtype, frozen=True), b.to(dtype)  # (V', C): zero rows pad V; (C, R)
            u = torch.mm(w, bd) if grads else None  # (V', R): the head along b's directions
            grad_z = torch.empty(z.shape, device=h.device, dtype=z.dtype) if grads else None
            gtz = ProductSum((w.shape[0], z.shape[1]), dtype, h.device) if grads else None
            total = torch.zeros((), device=h.device, dtype=acc)
            zd = z.to(dtype)  # (N, R): the head input's and Gᵀz's factor, converted once

            def x_of(start: int, end: int) -> Tensor:  # as `Skip2LoRAModel.head_input`: h + (z bᵀ rounded)
                # one in-place add: it computes in the promoted type and rounds once, the same bits as
                # (h.to(acc) + (z bᵀ).to(acc)).to(dtype) in four elementwise passes (h in dtype or fp32)
                return torch.mm(zd[start:end], bd.T).add_(h[start:end])

            for start, x, g, loss, _ in softmax_chunks(x_of, h.shape[0], w, weight.shape[0], labels, chunk,
                                                       softmax_step(triton_step), dtype):
                total += loss
                if grad_z is not None and gtz is not None and u is not None:
                    end = start + x.shape[0]
                    grad_z[start:end] = torch.mm(g, u)  # (n, R); pad columns meet U's zero rows
                    gtz.add_(g.T, zd[start:end])  # (V', R) += Gᵀ z
            grad_b = None if gtz is None else _head_transpose_times(w, gtz.total).to(b.dtype)
        save_for_scaling(ctx, grad_z, grad_b)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grad_z, grad_b = scale_once_(ctx, grad_out, "the low-rank head cross-entropy",
                                     "backpropagate once per forward")
        return None, grad_z, grad_b, None, None, None, None, None


def _head_transpose_times(w: Tensor, m: Tensor) -> Tensor:
    """Wᵀ m (C, R) for W (V', C) in a low dtype and m (V', R) in fp32, summed in fp32.

    Where cuBLAS adds a low-dtype product into an fp32 output (`accumulates_in_place`), m is split into two
    terms of W's dtype, m ≈ hi + lo (16 leading bits of each entry, relative error ≤ 2⁻¹⁶), and the two
    products run as tensor-core GEMMs into one fp32 sum: an fp32 GEMM of this shape runs on the CUDA cores
    (0.23 ms a step on the H200 for GPT-2's head, 2026-11-30). Elsewhere, slices of `VOCAB_SLICE` rows of W
    are converted to fp32 one at a time."""
    out = torch.zeros(w.shape[1], m.shape[1], device=w.device, dtype=m.dtype)
    if w.dtype != m.dtype and accumulates_in_place(w.device, w.dtype, m.dtype):
        hi = m.to(w.dtype)
        lo = (m - hi.to(m.dtype)).to(w.dtype)
        for term in (hi, lo):
            torch.addmm(out, w.T, term, out_dtype=out.dtype, out=out)
        return out
    for v0 in range(0, w.shape[0], VOCAB_SLICE):
        out.addmm_(w[v0:v0 + VOCAB_SLICE].T.to(m.dtype), m[v0:v0 + VOCAB_SLICE])
    return out
