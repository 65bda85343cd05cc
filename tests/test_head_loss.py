"""Chunked cross-entropy through the LM head: the same loss and gradients as the whole-logits loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from legolm.adapters import LoRAConfig, inject_lora
from legolm.adapters.skip2lora import Skip2LoRAConfig, Skip2LoRAModel
from legolm.adapters.skip2lora_train import Skip2LoRALoss
from legolm.core.config import ModelConfig
from legolm.errors import ConfigError
from legolm.model.transformer import TransformerLM
from legolm.train.batches import WindowBatches
from legolm.train.config import AUTO_LOSS_CHUNK, FitConfig
from legolm.train.fit import NextTokenLoss
from legolm.train.head_loss import IGNORE_INDEX, head_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernels' tests: Triton's interpreter on a CPU


def _inputs(n: int = 37, c: int = 8, v: int = 29, dtype: torch.dtype = torch.float64
            ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 5, 6, 36]] = IGNORE_INDEX  # unscored rows, in the first and the last chunk too
    return x, labels


def _grads(head: nn.Module, x: torch.Tensor, labels: torch.Tensor, chunk: int, vocab_chunk: int = 0
           ) -> list[torch.Tensor]:
    x.grad = None
    head.zero_grad(set_to_none=True)
    loss = head_cross_entropy(head, x, labels, chunk, vocab_chunk=vocab_chunk)
    loss.backward()
    assert x.grad is not None
    return [loss.detach(), x.grad.clone(), *(p.grad.clone() for p in head.parameters() if p.grad is not None)]


@pytest.mark.parametrize(("chunk", "vocab_chunk"), [(1, 0), (5, 0), (36, 0), (5, 4), (36, 29), (1, 64)])
@pytest.mark.parametrize("trainable_head", [True, False])
def test_fused_linear_path_equals_the_whole_logits_loss(chunk: int, vocab_chunk: int, trainable_head: bool) -> None:
    """Token chunks, and dW by vocabulary chunks (one that does not divide V, one as large as V, one larger)."""
    torch.manual_seed(1)
    head = nn.Linear(8, 29, bias=False).double().requires_grad_(trainable_head)
    x, labels = _inputs()
    ref = _grads(head, x, labels, 0)
    assert torch.allclose(ref[0], F.cross_entropy(head(x), labels, ignore_index=IGNORE_INDEX))
    out = _grads(head, x, labels, chunk, vocab_chunk)
    assert len(out) == len(ref) == (3 if trainable_head else 2)
    for a, b in zip(out, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_checkpointed_path_for_a_lora_head_equals_the_whole_logits_loss() -> None:
    torch.manual_seed(2)
    model = TransformerLM(ModelConfig.from_name("tiny-gpt2", vocab_size=29, n_embd=8, n_head=2)).double()
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["lm_head"]))
    for p in model.lm_head.parameters():  # B != 0, so the adapter changes the logits
        if p.requires_grad:
            p.data.normal_()
    x, labels = _inputs()
    ref, out = _grads(model.lm_head, x, labels, 0), _grads(model.lm_head, x, labels, 7)
    assert len(out) == 4  # loss, x, lora A, lora B
    for a, b in zip(out, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_a_second_backward_through_the_fused_loss_is_refused() -> None:
    """Its gradients are scaled in place (no second copy of dx and dW at the peak), so a second backward of
    the same graph would scale them twice: refused with the fix, not silently wrong."""
    head = nn.Linear(8, 29, bias=False).double()
    x, labels = _inputs()
    loss = head_cross_entropy(head, x, labels, 5) * 3.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"backward ran twice.*loss_chunk_tokens 0"):
        loss.backward()


def test_without_autograd_chunks_are_summed() -> None:
    head = nn.Linear(8, 29, bias=False).double()
    x, labels = _inputs()
    with torch.no_grad():
        assert torch.allclose(head_cross_entropy(head, x, labels, 4), head_cross_entropy(head, x, labels, 0))


def test_bf16_autocast_stays_close_to_fp32() -> None:
    torch.manual_seed(3)
    head = nn.Linear(64, 300, bias=False)
    x, labels = _inputs(n=96, c=64, v=300, dtype=torch.float32)
    ref = _grads(head, x, labels, 0)
    x.grad = head.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_cross_entropy(head, x, labels, 32)
    loss.backward()
    assert abs(loss.item() - ref[0].item()) / ref[0].item() < 1e-2
    for got, want in ((x.grad, ref[1]), (head.weight.grad, ref[2])):
        assert got is not None and got.dtype == torch.float32
        assert ((got - want).norm() / want.norm()).item() < 3e-2


def _tiny_batch(vocab: int) -> dict[str, torch.Tensor]:
    ids = np.random.default_rng(0).integers(0, vocab, 4 * 16 + 1).astype(np.uint16)
    return next(iter(WindowBatches(ids, 16, 4, shuffle=False)))


def test_next_token_loss_chunked_equals_whole_on_a_model() -> None:
    torch.manual_seed(4)
    model = TransformerLM(ModelConfig.from_name("tiny-pythia"))
    batch = _tiny_batch(model.config.vocab_size)
    results = []
    for chunk, vocab_chunk in ((0, 0), (24, 0), (24, 100)):  # the head's dW by vocabulary chunks in the last
        model.zero_grad(set_to_none=True)
        loss, n, _ = NextTokenLoss(chunk, vocab_chunk=vocab_chunk)(model, batch)
        loss.backward()
        results.append((loss.detach(), n, [p.grad.clone() for p in model.parameters()]))
    (l0, n0, g0), *chunked = results
    for l1, n1, g1 in chunked:
        assert int(n0) == int(n1) == 64
        assert torch.allclose(l0, l1, atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1, strict=True))


def test_skip2lora_loss_chunked_equals_whole() -> None:
    torch.manual_seed(5)
    base = TransformerLM(ModelConfig.from_name("tiny-pythia"))
    model = Skip2LoRAModel(base, Skip2LoRAConfig(block_indices=[0, 1], r=4, alpha=8.0)).train()
    for p in model.trainable():
        p.data.normal_(std=0.1)
    batch = _tiny_batch(base.config.vocab_size)
    grads = []
    for chunk in (0, 20):
        model.zero_grad(set_to_none=True)
        loss, _, _ = Skip2LoRALoss(None, chunk)(model, batch)
        loss.backward()
        grads.append([loss.detach(), *(p.grad.clone() for p in model.trainable())])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize(("head_grad", "kernel", "want"),
                         [("low-rank", "triton", 0), ("chain", "triton", AUTO_LOSS_CHUNK), ("chain", "torch", 0)])
def test_skip2lora_loss_left_unchunked_by_the_user_takes_the_measured_fastest_chunking(
        head_grad: str, kernel: str, want: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """chunk_tokens None (loss_chunk_tokens unset): the low-rank way scores whole batches, the chain chunks of
    `AUTO_LOSS_CHUNK` with the Triton step (whole logits with torch ops); the loss path sees that chunk."""
    import legolm.adapters.skip2lora_train as st

    seen: list[int] = []
    monkeypatch.setattr(st, "low_rank_head_cross_entropy", lambda w, h, z, b, labels, chunk, kernel: (
        seen.append(chunk), torch.zeros(()))[1])
    monkeypatch.setattr(st, "head_cross_entropy", lambda head, x, labels, chunk, kernel, vocab_chunk: (
        seen.append(chunk), torch.zeros(()))[1])
    base = TransformerLM(ModelConfig.from_name("tiny-pythia"))
    model = Skip2LoRAModel(base, Skip2LoRAConfig(block_indices=[0, 1], r=4, alpha=8.0)).train()
    Skip2LoRALoss(None, None, kernel, head_grad=head_grad)(model, _tiny_batch(base.config.vocab_size))  # type: ignore[arg-type]
    assert seen == [want]


def test_bad_chunk_settings_are_refused() -> None:
    cfg = FitConfig(loss_chunk_tokens=-1)
    with pytest.raises(ConfigError, match="loss_chunk_tokens must be >= 0"):
        cfg.validate()
    with pytest.raises(ConfigError, match="loss_vocab_chunk must be >= 0"):
        FitConfig(loss_chunk_tokens=8, loss_vocab_chunk=-1).validate()
    with pytest.raises(ConfigError, match=r"loss_vocab_chunk \(64\) needs loss_chunk_tokens > 0"):
        FitConfig(loss_vocab_chunk=64, loss_chunk_tokens=0).validate()
    with pytest.raises(ConfigError, match="needs a model with an lm_head"):
        NextTokenLoss(8)(nn.Embedding(10, 4), {"input_ids": torch.zeros(1, 4, dtype=torch.long),
                                               "labels": torch.zeros(1, 4, dtype=torch.long)})


@pytest.mark.parametrize(("chunk", "v", "block_v", "vocab_chunk"),
                         [(5, 29, 8, 0), (36, 29, 32, 0), (16, 700, 256, 0), (5, 29, 8, 11), (16, 700, 256, 300)])
@pytest.mark.parametrize("trainable_head", [True, False])
def test_the_triton_softmax_step_equals_the_whole_logits_loss(chunk: int, v: int, block_v: int, vocab_chunk: int,
                                                              trainable_head: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton kernels (Triton's interpreter off the GPU), fp32, several tiles per row and a partial last
    tile, the rows' pad columns loaded and masked (29 words: 32 loaded of 64), unscored rows, dW accumulated
    over token chunks or by vocabulary chunks (the columns kernel, several tiles per chunk): loss and gradients
    of x and W against the whole-logits loss in fp64."""
    import legolm.kernels.cross_entropy as kce

    monkeypatch.setattr(kce.ce_grad_, "__defaults__", (kce.StepLaunch(block_v=block_v), False))
    monkeypatch.setattr(kce.ce_grad_columns_, "__defaults__", (block_v,))
    torch.manual_seed(3)
    head64 = nn.Linear(8, v, bias=False).double().requires_grad_(trainable_head)
    x64, labels = _inputs(v=v)
    ref = _grads(head64, x64, labels, 0)
    head = nn.Linear(8, v, bias=False, device=DEVICE).requires_grad_(trainable_head)
    with torch.no_grad():
        head.weight.copy_(head64.weight)
    x = x64.detach().float().to(DEVICE).requires_grad_(True)
    loss = head_cross_entropy(head, x, labels.to(DEVICE), chunk, kernel="triton", vocab_chunk=vocab_chunk)
    loss.backward()
    assert x.grad is not None
    got = [loss.detach(), x.grad, *([head.weight.grad] if trainable_head else [])]
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.double().cpu(), b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("pad_scratch", [False, True])
def test_the_triton_kernel_writes_every_gradient_and_zero_for_unscored_rows(pad_scratch: bool) -> None:
    """Tiles of 16, rows of 50 logits: exactly 50 columns (a partial last tile), or the first 50 of rows of 64
    whose pad columns hold huge values: 64 are loaded, the 14 past V masked (they would dominate the softmax)
    and set to 0."""
    from legolm.kernels.cross_entropy import StepLaunch, ce_grad_

    g = torch.Generator().manual_seed(4)
    buf = torch.full((6, 64), 1e4, device=DEVICE)
    logits = buf[:, :50] if pad_scratch else torch.empty(6, 50, device=DEVICE)
    logits.copy_(torch.randn(6, 50, generator=g))
    labels = torch.tensor([3, IGNORE_INDEX, 0, 49, 7, IGNORE_INDEX], device=DEVICE)
    want = torch.softmax(logits, -1) - F.one_hot(labels.clamp(min=0), 50)
    want[labels == IGNORE_INDEX] = 0.0
    lse = torch.logsumexp(logits, -1)
    want_loss = torch.where(labels == IGNORE_INDEX, 0.0, lse - logits.gather(1, labels.clamp(min=0)[:, None])[:, 0])
    rows, row_lse = torch.full((6,), float("nan"), device=DEVICE), torch.full((6,), float("nan"), device=DEVICE)
    ce_grad_(logits, labels, rows, row_lse, IGNORE_INDEX, StepLaunch(block_v=16), pad_scratch)
    torch.testing.assert_close(rows, want_loss)
    torch.testing.assert_close(row_lse, lse)
    torch.testing.assert_close(logits, want)
    if pad_scratch:
        assert (buf[:, 50:] == 0).all()


def test_the_load_width_uses_pad_columns_only_where_every_row_has_them() -> None:
    """W = V rounded up to 16 where the rows' stride and the storage's end leave room for it, else V."""
    from legolm.kernels.cross_entropy import load_width

    assert load_width(torch.empty(6, 50)) == 50  # contiguous: the last row has no pad
    assert load_width(torch.empty(6, 64)[:, :50]) == 64
    assert load_width(torch.empty(6, 56)[:, :50]) == 50  # a stride of 56 < 64
    assert load_width(torch.empty(6, 64)[1:5, :50]) == 64
    assert load_width(torch.empty(5 * 64 + 60).as_strided((6, 50), (64, 1))) == 50  # the storage ends first
    assert load_width(torch.empty(6, 48)) == 48  # aligned already


def test_the_columns_kernel_writes_only_its_columns_from_the_rows_lse() -> None:
    """Columns 20..43 of a (6, 50) block (a view with the block's row stride, two tiles of 16, the last
    partial): softmax − onehot of those vocabulary entries from each row's lse, 0 for unscored rows; the
    labels inside (21, 40) and outside (3, 49) the columns; the other columns untouched."""
    from legolm.kernels.cross_entropy import ce_grad_columns_

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 50, generator=g).to(DEVICE)
    labels = torch.tensor([21, IGNORE_INDEX, 3, 49, 40, IGNORE_INDEX], device=DEVICE)
    lse = torch.logsumexp(logits, -1)
    want = logits.clone()
    full = torch.softmax(logits, -1) - F.one_hot(labels.clamp(min=0), 50)
    full[labels == IGNORE_INDEX] = 0.0
    want[:, 20:44] = full[:, 20:44]
    ce_grad_columns_(logits[:, 20:44], labels, lse, 20, IGNORE_INDEX, block=16)
    torch.testing.assert_close(logits, want)


def test_loss_kernel_is_a_validated_setting() -> None:
    cfg = FitConfig(loss_kernel="cuda")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="loss_kernel must be auto, torch or triton"):
        cfg.validate()


@pytest.mark.parametrize(("device", "triton_why", "kernel", "chunk"),
                         [("cuda", None, "triton", AUTO_LOSS_CHUNK), ("cuda", "needs Triton", "torch", 0),
                          ("cpu", None, "torch", 0)])
def test_the_loss_defaults_to_the_chunked_triton_step_on_a_gpu_with_triton(
        device: str, triton_why: str | None, kernel: str, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """loss_kernel auto and loss_chunk_tokens unset resolve by the planned device (Triton's interpreter on a CPU
    does not count: it is slow); explicit values stay as set; a vocabulary chunk needs the chunked loss."""
    import legolm.train.config as tc

    monkeypatch.setattr(tc, "planned_device", lambda name: torch.device(device))
    monkeypatch.setattr(tc, "triton_unavailable", lambda dev: triton_why)
    cfg = FitConfig()
    assert (cfg.resolved_loss_kernel(), cfg.resolved_loss_chunk()) == (kernel, chunk)
    assert FitConfig(loss_kernel="torch").resolved_loss_chunk() == 0
    assert FitConfig(loss_chunk_tokens=512).resolved_loss_chunk() == 512
    assert FitConfig(loss_chunk_tokens=0).resolved_loss_chunk() == 0
    vocab = FitConfig(loss_vocab_chunk=64)
    if chunk:
        vocab.validate()
    else:
        with pytest.raises(ConfigError, match="needs loss_chunk_tokens > 0"):
            vocab.validate()


def test_the_default_chunking_scores_a_model_without_an_lm_head_on_its_logits() -> None:
    """head_optional (loss_chunk_tokens unset): a model with no LM head gets the whole-logits loss, not an error."""
    emb = nn.Embedding(10, 10)
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[2, 3, IGNORE_INDEX]])}
    loss, n, _ = NextTokenLoss(8, head_optional=True)(emb, batch)
    torch.testing.assert_close(loss, F.cross_entropy(emb.weight[[1, 2]], torch.tensor([2, 3])))
    assert int(n) == 2


def test_a_frozen_heads_rows_are_made_once_and_remade_after_a_write() -> None:
    """head_rows: a frozen weight's cast, padded rows are reused while it is unchanged, remade after an in-place
    write (its version counter) or for another dtype; a trainable weight's are made at every call."""
    from legolm.train.head_loss import VOCAB_ALIGN, head_rows

    w = torch.randn(50, 8)
    first = head_rows(w, torch.bfloat16, frozen=True)
    assert first.shape == (VOCAB_ALIGN, 8) and (first[50:] == 0).all()
    torch.testing.assert_close(first[:50], w.to(torch.bfloat16))
    assert head_rows(w, torch.bfloat16, frozen=True) is first
    with torch.no_grad():
        w.mul_(2)
    again = head_rows(w, torch.bfloat16, frozen=True)
    assert again is not first
    torch.testing.assert_close(again[:50], w.to(torch.bfloat16))
    assert head_rows(w, torch.float16, frozen=True).dtype == torch.float16
    assert head_rows(w, torch.bfloat16, frozen=False) is not head_rows(w, torch.bfloat16, frozen=False)
