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
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
LossKernel = Literal["torch", "triton"]
LOSS_KERNELS: tuple[LossKernel, ...] = ("torch", "triton")


def head_cross_entropy(head: nn.Module, x: Tensor, labels: Tensor, chunk_tokens: int = 0,
                       kernel: LossKernel = "torch") -> Tensor:
    """Mean next-token cross-entropy of ``head(x)`` over the labels that are not ``IGNORE_INDEX``.

    Args:
        head: The LM head, (..., C) -> (..., V).
        x: Head inputs (..., C).
        labels: Targets (...), ``IGNORE_INDEX`` where a position is not scored.
        chunk_tokens: Rows of logits alive at a time (0 = all at once, plain `F.cross_entropy`).
        kernel: The softmax step of a chunk of a plain head: torch ops, or the Triton kernel.
    """
    x, labels = x.reshape(-1, x.shape[-1]), labels.reshape(-1)  # (N, C), (N,)
    if chunk_tokens <= 0 or x.shape[0] <= chunk_tokens:
        return token_cross_entropy(head(x), labels)
    n = (labels != IGNORE_INDEX).sum()
    if torch.is_grad_enabled() and isinstance(head, nn.Linear) and head.bias is None:
        total = _fused_linear_cross_entropy(x, head.weight, labels, chunk_tokens, kernel == "triton")
    else:
        total = sum(checkpoint(_chunk_loss_sum, head, xc, yc, use_reentrant=False)
                    for xc, yc in zip(x.split(chunk_tokens), labels.split(chunk_tokens), strict=True))
    return total / n  # 0/0 = nan when nothing is scored, as F.cross_entropy gives


@torch.compiler.disable
def _fused_linear_cross_entropy(x: Tensor, weight: Tensor, labels: Tensor, chunk: int, triton_step: bool) -> Tensor:
    """`_LinearCrossEntropy` run eagerly even inside a compiled step: traced by torch.compile (2.11, CUDA,
    bf16 autocast), the function that computes its gradients in forward returned none, and the model never
    trained. The graph break costs one boundary between the compiled body and the loss."""
    return _LinearCrossEntropy.apply(x, weight, labels, chunk, triton_step)


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
    def forward(ctx: Any, x: Tensor, weight: Tensor, labels: Tensor, chunk: int, triton_step: bool) -> Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            V = weight.shape[0]
            w = aligned_rows(weight.to(dtype))  # (V', C), V' >= V: zero rows pad V to a multiple of VOCAB_ALIGN
            grad_x = torch.empty(x.shape, device=x.device, dtype=x.dtype) if ctx.needs_input_grad[0] else None
            acc = torch.promote_types(dtype, torch.float32)  # fp32 accumulation (fp64 stays fp64)
            grad_w = torch.zeros_like(w, dtype=acc) if ctx.needs_input_grad[1] else None
            # one chunk of logits and one chunk's dW product, reused by every chunk: a fresh tensor per chunk
            # would keep the last chunk's alive while the next one is computed (twice the logits at the peak)
            buf = torch.empty(min(chunk, x.shape[0]), w.shape[0], device=x.device, dtype=dtype)
            mixed = grad_w is not None and acc != dtype and accumulates_in_place(w.device, dtype, acc)
            # without cuBLAS's bf16 x bf16 -> fp32 accumulation: each chunk's product in dtype, then added
            part_w = torch.empty_like(w) if grad_w is not None and acc != dtype and not mixed else None
            total = torch.zeros((), device=x.device, dtype=acc)
            for start in range(0, x.shape[0], chunk):
                xc, yc = x[start:start + chunk].to(dtype), labels[start:start + chunk]
                logits = torch.mm(xc, w.T, out=buf[:xc.shape[0]])  # (n, V'); the pad columns are 0, as w's rows
                step = _triton_step if triton_step else _torch_step
                loss, g = step(logits[:, :V], yc, acc)  # summed loss, softmax - onehot (dtype)
                if g.data_ptr() != logits.data_ptr():  # the torch step returns a new tensor
                    logits[:, :V] = g
                total += loss
                if grad_x is not None and grad_x.dtype == dtype:
                    torch.mm(logits, w, out=grad_x[start:start + chunk])
                elif grad_x is not None:
                    grad_x[start:start + chunk] = (logits @ w).to(x.dtype)
                if grad_w is not None and mixed:  # (V', C) += logits^T xc, the GEMM's own fp32 output
                    torch.addmm(grad_w, logits.T, xc, out_dtype=acc, out=grad_w)
                elif grad_w is not None and part_w is not None:
                    grad_w.add_(torch.mm(logits.T, xc, out=part_w))  # (V', C) in dtype, added in place in acc
                elif grad_w is not None:
                    grad_w.addmm_(logits.T, xc)
            del buf, logits, part_w  # before dW's copy in the weight's dtype: the peak stays at one chunk
            grad_w = None if grad_w is None else grad_w[:V].to(weight.dtype)
        ctx.save_for_backward(grad_x, grad_w)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grad_x, grad_w = (None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors)
        return grad_x, grad_w, None, None, None


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


def _torch_step(logits: Tensor, labels: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Summed loss of a chunk and its gradient softmax − onehot (0 where not scored), with torch ops in ``acc``."""
    dtype = logits.dtype
    logits = logits.to(acc)  # (n, V)
    scored = labels != IGNORE_INDEX
    target = torch.where(scored, labels, 0)
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    picked = logits.gather(1, target[:, None]).squeeze(1)
    loss = ((lse - picked) * scored).sum()
    g = logits.sub_(lse[:, None]).exp_()  # softmax, in place; d(sum)/d logits = softmax - onehot
    g.scatter_add_(1, target[:, None], -torch.ones_like(picked)[:, None])
    return loss, g.mul_(scored[:, None]).to(dtype)  # in place: one fp32 chunk alive


def _triton_step(logits: Tensor, labels: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """`_torch_step` as one Triton kernel over the logits in their own dtype (the gradient written over them)."""
    from legolm.kernels.cross_entropy import ce_grad_  # Triton is an optional dependency

    rows = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
    ce_grad_(logits, labels, rows, IGNORE_INDEX)
    return rows.sum().to(acc), logits
