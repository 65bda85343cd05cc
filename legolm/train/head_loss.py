"""Cross-entropy through the LM head, optionally in chunks of tokens so the logits never exist whole.

For a 50k-word vocabulary the logits of one 16 x 1,024 batch are 16,384 x 50,304 values: 3.3 GB in
fp32, and as much again for their gradient. Chunked, only ``chunk_tokens`` rows exist at a time::

    x (N, C) ─┬─ rows 0..n   ─ x W^T ─ (n, V) fp32 ─ log-softmax, loss ─ p - onehot ─┬─ dx = g W
              ├─ rows n..2n  ─ …                                                  └─ dW += g^T x
              └─ …

For a plain bias-free `nn.Linear` head the gradients are computed in the forward pass (the loss
is the end of the graph, so they are known there) and scaled in backward: no recomputation, the
same FLOPs as the unchunked loss (the approach of Liger Kernel's fused linear cross-entropy, Hsu et
al. 2024, arXiv 2410.10989). Any other head (a LoRA-wrapped one, say) is checkpointed per chunk:
its chunk forward runs again in backward. Without autograd (evaluation) chunks are just summed.

``kernel="triton"`` does each chunk's softmax step with one Triton kernel
(`legolm.kernels.cross_entropy`): the logits stay in the matmul's dtype (bf16 under autocast) and are
read twice and overwritten once with the gradient, instead of about seven passes over an fp32 copy.

The weight's gradient sums over every token, so chunks of tokens need an fp32 accumulator as large as
the head (155 MB for 50,304 x 768). ``vocab_chunk`` > 0 trades it for one more GEMM: the token chunks
give the loss, dx and each row's log-sum-exp, then a second pass recomputes the logits of
``vocab_chunk`` vocabulary entries for all tokens at a time and finishes their rows of dW in one GEMM
(its own fp32 accumulation over all tokens, rounded once: the accuracy of the fp32 sum)::

    pass 1, rows 0..n, n..2n, …:       logits (n, V) ─ loss, lse, g ─ dx rows = g W
    pass 2, entries 0..m, m..2m, …:    logits (N, m) = x W[v]^T ─ g = exp(· − lse) − onehot ─ dW[v] = g^T x

Peak memory: dx, dW and the larger of the two passes' logits buffers (the least memory of the options;
four GEMMs instead of three).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

IGNORE_INDEX = -100
LossKernel = Literal["torch", "triton"]
LOSS_KERNELS: tuple[LossKernel, ...] = ("torch", "triton")


def head_cross_entropy(head: nn.Module, x: Tensor, labels: Tensor, chunk_tokens: int = 0,
                       kernel: LossKernel = "torch", vocab_chunk: int = 0) -> Tensor:
    """Mean next-token cross-entropy of ``head(x)`` over the labels that are not ``IGNORE_INDEX``.

    Args:
        head: The LM head, (..., C) -> (..., V).
        x: Head inputs (..., C).
        labels: Targets (...), ``IGNORE_INDEX`` where a position is not scored.
        chunk_tokens: Rows of logits alive at a time (0 = all at once, plain `F.cross_entropy`).
        kernel: The softmax step of a chunk of a plain head: torch ops, or the Triton kernels.
        vocab_chunk: A plain head's weight gradient in a second pass over chunks of this many vocabulary
            entries, recomputing their logits, instead of an fp32 accumulator summed over token chunks
            (0 = the accumulator). Needs ``chunk_tokens``.
    """
    x, labels = x.reshape(-1, x.shape[-1]), labels.reshape(-1)  # (N, C), (N,)
    if chunk_tokens <= 0 or x.shape[0] <= chunk_tokens:
        return token_cross_entropy(head(x), labels)
    n = (labels != IGNORE_INDEX).sum()
    if torch.is_grad_enabled() and isinstance(head, nn.Linear) and head.bias is None:
        total = _fused_linear_cross_entropy(x, head.weight, labels, chunk_tokens, kernel == "triton", vocab_chunk)
    else:
        total = sum(checkpoint(_chunk_loss_sum, head, xc, yc, use_reentrant=False)
                    for xc, yc in zip(x.split(chunk_tokens), labels.split(chunk_tokens), strict=True))
    return total / n  # 0/0 = nan when nothing is scored, as F.cross_entropy gives


@torch.compiler.disable
def _fused_linear_cross_entropy(x: Tensor, weight: Tensor, labels: Tensor, chunk: int, triton_step: bool,
                                vocab_chunk: int) -> Tensor:
    """`_LinearCrossEntropy` run eagerly even inside a compiled step: traced by torch.compile (2.11, CUDA,
    bf16 autocast), the function that computes its gradients in forward returned none, and the model never
    trained. The graph break costs one boundary between the compiled body and the loss."""
    return _LinearCrossEntropy.apply(x, weight, labels, chunk, triton_step, vocab_chunk)


def token_cross_entropy(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits (..., V) against labels (...), softmax in fp32, ``IGNORE_INDEX`` not scored."""
    return F.cross_entropy(_upcast(logits.reshape(-1, logits.shape[-1])), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def _upcast(logits: Tensor) -> Tensor:
    """Half-precision logits to fp32 for the softmax (fp32 and fp64 stay)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _chunk_loss_sum(head: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
    return token_cross_entropy(head(x), labels, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``x @ weight.T`` chunk by chunk, gradients computed in forward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, labels: Tensor, chunk: int, triton_step: bool,
                vocab_chunk: int) -> Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            step = softmax_step(triton_step)
            need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            w = head_rows(weight, dtype, frozen=not need_w)  # (V', C), V' >= V: zero rows pad V (VOCAB_ALIGN)
            by_vocab = need_w and vocab_chunk > 0
            total, grad_x, grad_w, lse = _token_pass(x, w, weight.shape[0], labels, chunk, step, dtype, need_x,
                                                     need_w and not by_vocab)
            if by_vocab:
                grad_w = _vocab_pass(x.to(dtype), w[:weight.shape[0]], labels, lse, vocab_chunk, triton_step)
            grad_w = None if grad_w is None else grad_w[:weight.shape[0]].to(weight.dtype)
        save_for_scaling(ctx, grad_x, grad_w)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grad_x, grad_w = scale_once_(ctx, grad_out, "the chunked linear cross-entropy",
                                     "use loss_chunk_tokens 0 to backpropagate twice")
        return grad_x, grad_w, None, None, None, None


def save_for_scaling(ctx: Any, *grads: Tensor | None) -> None:
    """Keep the gradients a loss computed in its forward for `scale_once_` in its backward."""
    ctx.save_for_backward(*grads)
    ctx.done = False


def scale_once_(ctx: Any, grad_out: Tensor, what: str, fix: str) -> list[Tensor | None]:
    """The gradients `save_for_scaling` kept, scaled by ``grad_out`` in place: a scaled copy would hold them
    twice at the peak, and they are used once. A second backward of the same graph would scale them twice:
    refused."""
    if ctx.done:
        raise RuntimeError(f"{what}'s backward ran twice (retain_graph=True): its gradients are scaled in place; "
                           f"{fix}")
    ctx.done = True
    return [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in ctx.saved_tensors]


Step = Callable[[Tensor, Tensor, torch.dtype], tuple[Tensor, Tensor, Tensor]]


def softmax_chunks(x_of: Callable[[int, int], Tensor], n: int, w: Tensor, V: int, labels: Tensor, chunk: int,
                   step: Step, dtype: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor, Tensor, Tensor]]:
    """``n`` rows of head inputs (``x_of(start, end)``, in ``dtype``) through the padded head ``w`` (V', C),
    ``chunk`` rows at a time. Per chunk: (start, its inputs, softmax − onehot (rows, V') in one buffer reused by
    every chunk (its pad columns hold the zero logits of w's zero rows), its summed loss, each row's lse)."""
    acc = torch.promote_types(dtype, torch.float32)  # fp32 accumulation (fp64 stays fp64)
    # one chunk of logits, reused by every chunk: a fresh tensor per chunk would keep the last chunk's
    # alive while the next one is computed (twice the logits at the peak)
    buf = torch.empty(min(chunk, n), w.shape[0], device=w.device, dtype=dtype)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        xc = x_of(start, end)
        logits = torch.mm(xc, w.T, out=buf[:end - start])  # (rows, V')
        loss, g, lse = step(logits[:, :V], labels[start:end], acc)  # summed loss, softmax - onehot, log-sum-exp
        if g.data_ptr() != logits.data_ptr():  # the torch step returns a new tensor
            logits[:, :V] = g
        yield start, xc, logits, loss, lse


def _token_pass(x: Tensor, w: Tensor, V: int, labels: Tensor, chunk: int, step: Step, dtype: torch.dtype,
                need_x: bool, need_w: bool) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """Chunks of tokens through the padded head ``w`` (V', C): the summed loss, dx (x's dtype), dW summed in an
    fp32 accumulator (V', C) where ``need_w``, and each row's log-sum-exp (N,) in the accumulator's dtype."""
    grad_x = torch.empty(x.shape, device=x.device, dtype=x.dtype) if need_x else None
    acc = torch.promote_types(dtype, torch.float32)
    grad_w = ProductSum(w.shape, dtype, w.device) if need_w else None
    lse = torch.empty(x.shape[0], device=x.device, dtype=acc)
    total = torch.zeros((), device=x.device, dtype=acc)
    for start, xc, g, loss, row_lse in softmax_chunks(lambda a, b: x[a:b].to(dtype), x.shape[0], w, V, labels,
                                                      chunk, step, dtype):
        end = start + xc.shape[0]
        lse[start:end] = row_lse
        total += loss
        if grad_x is not None and grad_x.dtype == dtype:
            torch.mm(g, w, out=grad_x[start:end])
        elif grad_x is not None:
            grad_x[start:end] = (g @ w).to(x.dtype)
        if grad_w is not None:
            grad_w.add_(g.T, xc)  # (V', C) += gᵀ xc
    return total, grad_x, None if grad_w is None else grad_w.total, lse  # the chunks' buffer is gone here


def _vocab_pass(x: Tensor, w: Tensor, labels: Tensor, lse: Tensor, chunk: int, triton_step: bool) -> Tensor:
    """dW (V, C) in ``w``'s dtype, ``chunk`` vocabulary entries at a time: their logits for every token,
    softmax − onehot from each row's ``lse``, and dW's rows = g^T x in one GEMM each (no partial sums)."""
    grad_w = torch.empty_like(w)
    buf = torch.empty(x.shape[0] * min(chunk, w.shape[0]), device=x.device, dtype=w.dtype)  # one chunk's logits
    for v0 in range(0, w.shape[0], chunk):
        wv = w[v0:v0 + chunk]
        logits = torch.mm(x, wv.T, out=buf[:x.shape[0] * wv.shape[0]].view(x.shape[0], wv.shape[0]))  # (N, m)
        g = _columns_step(logits, labels, lse, v0, triton_step)
        torch.mm(g.T, x, out=grad_w[v0:v0 + chunk])
    return grad_w


def _columns_step(logits: Tensor, labels: Tensor, lse: Tensor, v0: int, triton_step: bool) -> Tensor:
    """softmax − onehot of the logits (N, m) of vocabulary entries v0 .. v0 + m, 0 where a row is not scored."""
    if triton_step:
        from legolm.kernels.cross_entropy import ce_grad_columns_  # Triton is an optional dependency

        ce_grad_columns_(logits, labels, lse, v0, IGNORE_INDEX)
        return logits
    g = logits.to(lse.dtype).sub_(lse[:, None]).exp_()  # (N, m) in lse's dtype (fp32, or fp64)
    inside = (labels >= v0) & (labels < v0 + logits.shape[1])
    rows = inside.nonzero().squeeze(1)
    g[rows, labels[rows] - v0] -= 1.0
    return g.mul_((labels != IGNORE_INDEX)[:, None]).to(logits.dtype)


class ProductSum:
    """An fp32 (fp64 for fp64 inputs) sum of matrix products a @ b whose factors are ``dtype``: in the GEMM's
    own fp32 output where cuBLAS can (`accumulates_in_place`), else each product made in ``dtype`` in one
    reused buffer and added (no fp32 temporary of it)."""

    def __init__(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        acc = torch.promote_types(dtype, torch.float32)
        self.total = torch.zeros(shape, device=device, dtype=acc)
        self.in_place = acc != dtype and accumulates_in_place(device, dtype, acc)
        self.part = torch.empty(shape, device=device, dtype=dtype) if acc != dtype and not self.in_place else None

    def add_(self, a: Tensor, b: Tensor) -> None:
        if self.in_place:
            torch.addmm(self.total, a, b, out_dtype=self.total.dtype, out=self.total)
        elif self.part is not None:
            self.total.add_(torch.mm(a, b, out=self.part))
        else:  # the factors are already in the sum's dtype
            self.total.addmm_(a, b)


_IN_PLACE: dict[tuple[str, torch.dtype, torch.dtype], bool] = {}


def accumulates_in_place(device: torch.device, dtype: torch.dtype, acc: torch.dtype) -> bool:
    """Whether ``torch.addmm(c, a, b, out_dtype=acc, out=c)`` adds the product of ``dtype`` matrices into
    ``c`` (``acc``) in place: no temporary of the product, and no rounding of it to ``dtype`` first (CUDA:
    cuBLAS with an fp32 C, torch >= 2.8). Probed once per device type and dtypes (not while a CUDA graph is
    being captured: False there until a probe outside one); the CPU has no such kernel."""
    key = (device.type, dtype, acc)
    if key not in _IN_PLACE and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False  # no probe inside a CUDA-graph capture (its check reads a value back): the safe path
    if key not in _IN_PLACE:
        gen = torch.Generator(device=device).manual_seed(0)
        a, b = (torch.randn(shape, generator=gen, device=device).to(dtype) for shape in ((16, 32), (32, 8)))
        c = torch.ones(16, 8, device=device, dtype=acc)
        try:
            torch.addmm(c, a, b, out_dtype=acc, out=c)
            want = 1 + a.to(acc) @ b.to(acc)
            _IN_PLACE[key] = bool(torch.allclose(c, want, rtol=1e-2, atol=1e-2))
        except (RuntimeError, NotImplementedError, TypeError):
            _IN_PLACE[key] = False
    return _IN_PLACE[key]


VOCAB_ALIGN = 64  # the chunked loss pads the head's rows to a multiple of this: a GEMM whose K is the vocabulary
# (the input gradient, softmax @ W) leaves cuBLAS's fast kernels when K is odd (GPT-2's 50,257: 3x slower, H200)


def aligned_rows(w: Tensor) -> Tensor:
    """``w`` (V, C) with zero rows appended up to a multiple of `VOCAB_ALIGN` (itself when aligned)."""
    pad = -w.shape[0] % VOCAB_ALIGN
    return w if pad == 0 else torch.cat([w, w.new_zeros(pad, w.shape[1])])


_FROZEN_ROWS = WeakIdKeyDictionary()  # frozen head weight -> ((storage, version, dtype), its aligned rows)


def head_rows(weight: Tensor, dtype: torch.dtype, frozen: bool) -> Tensor:
    """``aligned_rows(weight.to(dtype))``: the head's rows as a loss's GEMMs read them. A ``frozen`` weight's
    copy is made once and reused while the weight is unchanged (the same storage and version counter: every
    in-place write moves the counter), so a frozen fp32 head (LoRA, Skip2-LoRA) is not cast and padded again
    at every step."""
    if not frozen or weight.is_inference():  # an inference tensor has no version counter
        return aligned_rows(weight.to(dtype))
    key = (weight.data_ptr(), weight._version, dtype)
    hit = _FROZEN_ROWS.get(weight)
    if hit is not None and hit[0] == key:
        return hit[1]
    rows = aligned_rows(weight.to(dtype))
    if rows is not weight:  # a copy: kept (the weight itself would keep its own key alive)
        _FROZEN_ROWS[weight] = (key, rows)
    return rows


def softmax_step(triton: bool) -> Step:
    """A chunk's softmax step: (logits (n, V), labels (n,), accumulation dtype) -> (summed loss, softmax − onehot
    (0 where not scored; the Triton step writes it over the logits), log-sum-exp (n,))."""
    return _triton_step if triton else _torch_step


def _torch_step(logits: Tensor, labels: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Summed loss of a chunk, its gradient softmax − onehot (0 where not scored) and each row's log-sum-exp,
    with torch ops in ``acc``."""
    dtype = logits.dtype
    logits = logits.to(acc)  # (n, V)
    scored = labels != IGNORE_INDEX
    target = torch.where(scored, labels, 0)
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    picked = logits.gather(1, target[:, None]).squeeze(1)
    loss = ((lse - picked) * scored).sum()
    g = logits.sub_(lse[:, None]).exp_()  # softmax, in place; d(sum)/d logits = softmax - onehot
    g.scatter_add_(1, target[:, None], -torch.ones_like(picked)[:, None])
    return loss, g.mul_(scored[:, None]).to(dtype), lse  # in place: one fp32 chunk alive


def _triton_step(logits: Tensor, labels: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """`_torch_step` as one Triton kernel over the logits in their own dtype (the gradient written over them)."""
    from legolm.kernels.cross_entropy import ce_grad_  # Triton is an optional dependency

    rows, lse = (torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32) for _ in range(2))
    ce_grad_(logits, labels, rows, lse, IGNORE_INDEX, pad_scratch=True)  # `softmax_chunks`' padded rows
    return rows.sum().to(acc), logits, lse
