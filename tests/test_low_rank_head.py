"""The low-rank head loss: the adapters' gradients through a frozen head at their rank equal the usual chain's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from legolm.adapters.skip2lora import Skip2LoRAConfig, Skip2LoRAModel
from legolm.adapters.skip2lora_train import Skip2LoRALoss
from legolm.core.config import ModelConfig
from legolm.errors import ConfigError
from legolm.model.transformer import TransformerLM
from legolm.train.head_loss import IGNORE_INDEX
from legolm.train.low_rank_head import low_rank_head_cross_entropy

N, C, R, V = 37, 12, 5, 29  # V not a multiple of 64: the head's zero pad rows are in play


def _parts(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(V, C, generator=g, dtype=dtype)
    h = torch.randn(N, C, generator=g, dtype=dtype)
    z = torch.randn(N, R, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(C, R, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 5, 6, 36]] = IGNORE_INDEX  # unscored rows, in the first and the last chunk too
    return w, h, z, b, labels


def _chain(w: torch.Tensor, h: torch.Tensor, z: torch.Tensor, b: torch.Tensor, labels: torch.Tensor
           ) -> list[torch.Tensor]:
    """The usual chain: logits of x = h + z bᵀ, autograd through the head-input gradient."""
    z.grad = b.grad = None
    loss = F.cross_entropy(F.linear(h + z @ b.T, w).double(), labels, ignore_index=IGNORE_INDEX)
    loss.backward()
    assert z.grad is not None and b.grad is not None
    return [loss.detach(), z.grad.clone(), b.grad.clone()]


def _low_rank(w: torch.Tensor, h: torch.Tensor, z: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, chunk: int,
              kernel: str = "torch") -> list[torch.Tensor]:
    z.grad = b.grad = None
    loss = low_rank_head_cross_entropy(w, h, z, b, labels, chunk, kernel)  # type: ignore[arg-type]
    loss.backward()
    assert z.grad is not None and b.grad is not None
    return [loss.detach(), z.grad.clone(), b.grad.clone()]


@pytest.mark.parametrize("chunk", [0, 1, 5, 36])
def test_the_gradients_at_the_adapters_rank_equal_the_chain_through_the_head_input(chunk: int) -> None:
    w, h, z, b, labels = _parts()
    want = _chain(w, h, z, b, labels)
    got = _low_rank(w, h, z, b, labels, chunk)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [5, 36])
def test_the_triton_softmax_step_gives_the_same_gradients(chunk: int) -> None:
    """fp32 through the Triton kernel (the interpreter off the GPU) against the fp64 chain."""
    w, h, z, b, labels = _parts()
    want = _chain(w, h, z, b, labels)
    z32, b32 = (t.detach().float().requires_grad_(True) for t in (z, b))
    got = _low_rank(w.float(), h.float(), z32, b32, labels, chunk, "triton")
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=2e-5, atol=2e-6)


def test_bf16_autocast_stays_close_to_fp32() -> None:
    w, h, z, b, labels = (t.float() if t.is_floating_point() else t for t in _parts())
    z, b = z.detach().requires_grad_(True), b.detach().requires_grad_(True)
    want = _chain(w.double(), h.double(), z, b, labels)  # the fp32 leaves' own fp64 chain
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _low_rank(w, h, z, b, labels, 8)
    assert got[1].dtype == got[2].dtype == torch.float32
    assert abs(got[0].item() - want[0].item()) / want[0].item() < 1e-2
    for a, e in zip(got[1:], want[1:], strict=True):
        assert ((a.double() - e).norm() / e.norm()).item() < 3e-2


def test_under_bf16_the_head_input_is_rounded_as_the_models_head_input() -> None:
    """bf16 autocast, h in bf16 (as the GPU Skip-Cache holds it): x = h + (z bᵀ rounded to bf16), rounded once
    more, as `Skip2LoRAModel.head_input` computes it for evaluation; the loss is that x's to fp32 rounding. A
    single rounding of h + z bᵀ (what one fused GEMM epilogue gives) moves the loss 1e3 times further."""
    g = torch.Generator().manual_seed(0)
    n, c, r, v = 256, 64, 8, 300
    w, z = torch.randn(v, c, generator=g), torch.randn(n, r, generator=g)
    h, b = torch.randn(n, c, generator=g).to(torch.bfloat16), torch.randn(c, r, generator=g) * 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = low_rank_head_cross_entropy(w, h, z, b, labels, 0)
    twice = (h.float() + (z.bfloat16() @ b.bfloat16().T).float()).bfloat16()
    once = (h.float() + z.bfloat16().float() @ b.bfloat16().float().T).bfloat16()
    want, other = (F.cross_entropy((x @ w.bfloat16().T).float(), labels) for x in (twice, once))
    assert abs(got.item() - want.item()) <= 1e-6 * want.item()
    assert abs(other.item() - want.item()) > 1e-4 * want.item()


def test_without_autograd_it_is_the_loss_alone() -> None:
    w, h, z, b, labels = _parts()
    with torch.no_grad():
        got = low_rank_head_cross_entropy(w, h, z, b, labels, 5)
        want = F.cross_entropy(F.linear(h + z @ b.T, w), labels, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_trainable_head_or_h_is_refused_and_a_second_backward_too() -> None:
    w, h, z, b, labels = _parts()
    with pytest.raises(ValueError, match="must be frozen"):
        low_rank_head_cross_entropy(w.requires_grad_(True), h, z, b, labels)
    w.requires_grad_(False)
    loss = low_rank_head_cross_entropy(w, h, z, b, labels, 5) * 2.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def _skip2lora(lora_head: bool, blocks: list[int], r: int) -> Skip2LoRAModel:
    torch.manual_seed(5)
    base = TransformerLM(ModelConfig.from_name("tiny-pythia")).double()
    model = Skip2LoRAModel(base, Skip2LoRAConfig(block_indices=blocks, r=r, alpha=2.0 * r, dropout=0.1,
                                                 lora_head=lora_head)).double().train()  # the adapters too
    for p in model.trainable():
        p.data.normal_(std=0.1)
    return model


@pytest.mark.parametrize("lora_head", [False, True])
@pytest.mark.parametrize("chunk", [0, 20])
def test_skip2lora_loss_takes_the_same_gradients_either_way(lora_head: bool, chunk: int) -> None:
    """On a Skip2-LoRA model (fp64, dropout on the taps, the same seed for both): the same loss and gradients of
    every trainable parameter, low-rank (auto picks it: 4R = 24 <= 64) and through the head input. With a head
    LoRA the head trains: auto takes the chain, and low-rank is refused."""
    model = _skip2lora(lora_head, [0, 1], 3)
    assert model.frozen_linear_head() is not lora_head and model.rank == 6
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}
    assert Skip2LoRALoss(None, head_grad="auto").low_rank(model) is not lora_head
    grads = []
    for head_grad in ("auto", "chain"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(9)  # the taps' dropout masks
        loss, _, _ = Skip2LoRALoss(None, chunk, head_grad=head_grad)(model, batch)  # type: ignore[arg-type]
        loss.backward()
        grads.append([loss.detach(), *(p.grad.clone() for p in model.trainable() if p.grad is not None)])
    assert len(grads[0]) == len(grads[1]) == 1 + len(list(model.trainable()))
    for a, e in zip(*grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
    if lora_head:
        with pytest.raises(ConfigError, match="head_grad low-rank needs a frozen"):
            Skip2LoRALoss(None, head_grad="low-rank")(model, batch)


def test_auto_takes_the_low_rank_way_only_where_it_is_less_work() -> None:
    """Low-rank costs two products of rank R = K·r with the (tokens x vocabulary) gradient, the chain one of
    rank n_embd (64 here): auto picks low-rank up to 4R = 64, the chain above; forced low-rank runs anyway."""
    assert Skip2LoRALoss(None).low_rank(_skip2lora(False, [0, 1], 8))  # 4R = 64
    assert not Skip2LoRALoss(None).low_rank(_skip2lora(False, [0, 1], 9))  # 4R = 72
    assert Skip2LoRALoss(None, head_grad="low-rank").low_rank(_skip2lora(False, [0, 1], 9))
    assert not Skip2LoRALoss(None, head_grad="chain").low_rank(_skip2lora(False, [0, 1], 3))


def test_finetune_refuses_a_bad_head_grad_before_anything_runs() -> None:
    from legolm.recipes.finetune import FinetuneConfig

    cfg = FinetuneConfig(model="some/base", method="skip2lora", head_grad="low-rank",
                         skip2lora=Skip2LoRAConfig(block_indices=[0], lora_head=True))
    with pytest.raises(ConfigError, match=r"head_grad low-rank needs a frozen LM head.*--head-grad auto or chain"):
        cfg.validate()
    cfg = FinetuneConfig(model="some/base", method="skip2lora", head_grad="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="head_grad must be one of auto, low-rank, chain, got 'fast'"):
        cfg.validate()
