"""Skip2-LoRA: the wiring (hand-checked), no gradient or graph through the backbone, the Skip-Cache
(cached == uncached gradients, storage by budget, fingerprints, disk reuse), save/load, validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from legolm.adapters.skip2lora import Skip2LoRAConfig, Skip2LoRAModel, SkipAdapter, load_skip2lora, save_skip2lora
from legolm.adapters.skip2lora_train import Skip2LoRALoss, build_skip_cache
from legolm.adapters.skip_cache import SkipCache, SkipCacheConfig, cache_nbytes, choose_storage, fingerprint
from legolm.core.config import ModelConfig
from legolm.errors import CheckpointError, ConfigError
from legolm.model.transformer import TransformerLM
from legolm.train.batches import WindowBatches
from legolm.utils.params import count_parameters

T = 16


def _base(preset: str = "tiny-pythia", seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig.from_name(preset))


def _model(preset: str = "tiny-pythia", indices: list[int] | None = None, head: bool = False,
           tap_norm: str = "none") -> Skip2LoRAModel:
    model = Skip2LoRAModel(_base(preset), Skip2LoRAConfig(block_indices=indices or [0, 1], r=4, alpha=8.0,
                                                          lora_head=head, tap_norm=tap_norm))
    with torch.no_grad():
        for adapter in model.adapters.values():
            assert isinstance(adapter, SkipAdapter)
            adapter.lora_B.normal_(std=0.1)  # B = 0 at start; make the adapters matter
    return model


@pytest.mark.parametrize("preset, tap_norm", [("tiny-gpt2", "none"), ("tiny-pythia", "none"), ("tiny-llama", "none"),
                                              ("tiny-llama", "final"), ("tiny-gpt2", "final")])
def test_logits_are_head_of_final_norm_plus_adapted_block_outputs(preset: str, tap_norm: str) -> None:
    model = _model(preset, tap_norm=tap_norm).eval()
    base = model.base
    idx = torch.randint(0, 512, (2, T))
    with torch.no_grad():
        h0 = base(idx, end=1)  # output of block 0
        pos = torch.arange(T).expand(2, T)
        h1 = base.blocks[1](h0, base.make_context(pos, h0.dtype))  # output of block 1 (the top)
        ad = model.adapters
        x = base.norm(h1)
        for h, a in ((h0, ad["0"]), (h1, ad["1"])):
            assert isinstance(a, SkipAdapter)
            tap = base.norm(h) if tap_norm == "final" else h  # the adapter's input
            x = x + (a.lora_B @ (a.lora_A @ tap.unsqueeze(-1))).squeeze(-1) * (8.0 / 4)
        expected = base.lm_head(x)
    torch.testing.assert_close(model(idx), expected, atol=1e-5, rtol=1e-5)


def test_fresh_adapters_leave_the_base_model_unchanged() -> None:
    base = _base()
    idx = torch.randint(0, 512, (2, T))
    ref = base(idx).detach()
    model = Skip2LoRAModel(base, Skip2LoRAConfig(block_indices=[1], r=4, lora_head=True))
    torch.testing.assert_close(model(idx), ref)


def test_no_gradient_and_no_graph_through_the_backbone() -> None:
    model = _model(head=True).train()
    blocks_out: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: blocks_out.append(o)) for b in model.base.blocks]
    loss = model(torch.randint(0, 512, (2, T))).logsumexp(-1).mean()
    for h in hooks:
        h.remove()
    assert blocks_out and not any(o.requires_grad for o in blocks_out)  # no autograd graph in any block
    leaves: set[int] = set()
    stack, seen = [loss.grad_fn], set()
    while stack:  # every parameter the graph reaches
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    trainable = {id(p) for p in model.trainable()}
    assert leaves == trainable
    loss.backward()
    for name, p in model.base.named_parameters():
        if id(p) not in trainable:
            assert p.grad is None, name
    assert all(p.grad is not None for p in model.trainable())


def test_trainable_count_matches_the_seed_example() -> None:
    cfg = ModelConfig.from_name("tiny-llama", n_embd=4096, n_head=32, n_kv_head=8, intermediate_size=64,
                                layers=["llama"] * 6, vocab_size=64)
    with torch.device("meta"):
        model = Skip2LoRAModel(TransformerLM(cfg), Skip2LoRAConfig(block_indices=list(range(6)), r=32))
    per = [a.lora_A.numel() + a.lora_B.numel() for a in model.adapters.values() if isinstance(a, SkipAdapter)]
    assert per == [262_144] * 6 and sum(p.numel() for p in model.trainable()) == 1_572_864
    assert "trainable 1,572,864 of" in model.report()


def test_head_lora_is_counted_once() -> None:
    """tiny-pythia has 165,632 weights (2 x 32,768 embedding/head, 128 final norm, 2 x 49,984 per block); two
    skip adapters add 2·(4·64 + 64·4) = 1,024 and the head LoRA 4·64 + 512·4 = 2,304, which lives inside the
    base model: the total is 165,632 + 3,328 = 168,960, not 171,264 (the head LoRA counted twice)."""
    model = _model(head=True)
    assert count_parameters(model) == (3_328, 168_960)  # what `fit` prints
    assert model.report().splitlines()[-1] == "trainable 3,328 of 168,960 parameters (1.97%)"


@pytest.mark.parametrize(("indices", "match"), [([], "at least one"), ([0, 2], "out of range"),
                                                ([-1], "out of range"), ([1, 1], "more than once")])
def test_bad_block_indices(indices: list[int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Skip2LoRAModel(_base(), Skip2LoRAConfig(block_indices=indices))


def _batches(n: int = 6) -> WindowBatches:
    ids = np.random.default_rng(0).integers(0, 512, n * T + 1).astype(np.uint16)
    return WindowBatches(ids, T, 2, shuffle=True, seed=0)


def _grads(model: Skip2LoRAModel, loss_fn: Skip2LoRALoss, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss, _, _ = loss_fn(model, batch)
    loss.backward()
    return [p.grad.clone() for p in model.trainable() if p.grad is not None]


def test_cached_and_uncached_steps_give_the_same_gradients(tmp_path: Path) -> None:
    model = _model(head=True).train()
    data = _batches()
    cache = SkipCache(data.n_windows, 3, T, 64, torch.float32, "cpu", torch.device("cpu"), "k")
    cached, plain = Skip2LoRALoss(cache), Skip2LoRALoss(None)
    batches = list(data)
    for batch in batches:  # first epoch fills the cache
        assert all(torch.equal(a, b) for a, b in zip(_grads(model, cached, batch), _grads(model, plain, batch),
                                                      strict=True))
    assert bool(cache.filled.all())
    calls = []
    hook = model.base.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    for batch in batches:  # later epochs: the backbone does not run, gradients are the same
        g_cached = _grads(model, cached, batch)
        assert not calls
        hook.remove()
        g_plain = _grads(model, plain, batch)
        hook = model.base.blocks[0].register_forward_hook(lambda *a: calls.append(1))
        assert all(torch.equal(a, b) for a, b in zip(g_cached, g_plain, strict=True))
    hook.remove()


def test_evaluation_runs_the_backbone_not_the_training_cache() -> None:
    model = _model().eval()
    data = _batches()
    cache = SkipCache(data.n_windows, 3, T, 64, torch.float32, "cpu", torch.device("cpu"), "k")
    cache.data.fill_(123.0)
    cache.filled[:] = True  # poisoned: must not be read in eval mode
    batch = next(iter(data))
    loss, _, _ = Skip2LoRALoss(cache)(model, batch)
    ref, _, _ = Skip2LoRALoss(None)(model, batch)
    assert torch.equal(loss, ref)


def test_storage_follows_budgets_and_refuses_when_nothing_fits(tmp_path: Path) -> None:
    n = cache_nbytes(100, 3, 128, 512, torch.bfloat16)
    assert n == 100 * 3 * 128 * 512 * 2
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert choose_storage(SkipCacheConfig(), n, gpu, tmp_path) == "gpu"
    assert choose_storage(SkipCacheConfig(), n, cpu, tmp_path) == "cpu"
    assert choose_storage(SkipCacheConfig(gpu_budget_mb=1, cpu_budget_mb=1), n, gpu, tmp_path) == "disk"
    with pytest.raises(ConfigError, match="fits none of the allowed storages"):
        choose_storage(SkipCacheConfig(storage=["gpu", "cpu"], gpu_budget_mb=1, cpu_budget_mb=1), n, gpu, tmp_path)


def test_fingerprint_changes_with_weights_data_window_indices_and_dtype() -> None:
    base, ids = _base(), np.arange(200, dtype=np.uint16)
    ref = fingerprint(base, ids, T, [0, 1], torch.bfloat16, "none")
    assert fingerprint(base, ids, T, [0, 1], torch.bfloat16, "none") == ref
    other = _base(seed=1)
    changed = [fingerprint(other, ids, T, [0, 1], torch.bfloat16, "none"),
               fingerprint(base, ids[::-1].copy(), T, [0, 1], torch.bfloat16, "none"),
               fingerprint(base, ids, T + 1, [0, 1], torch.bfloat16, "none"),
               fingerprint(base, ids, T, [1], torch.bfloat16, "none"),
               fingerprint(base, ids, T, [0, 1], torch.float16, "none"),
               fingerprint(base, ids, T, [0, 1], torch.bfloat16, "final")]
    assert ref not in changed and len(set(changed)) == 6


def test_disk_cache_is_reused_when_valid_and_rebuilt_when_stale(tmp_path: Path) -> None:
    model = _model().train()
    data = _batches()
    cfg = SkipCacheConfig(storage=["disk"], dtype="bfloat16", dir=str(tmp_path / "skip_cache"))
    tokens = data.ids
    cache = build_skip_cache(model, tokens, data.n_windows, T, cfg, torch.device("cpu"))
    assert cache.storage == "disk" and not cache.reused
    loss_fn = Skip2LoRALoss(cache)
    for batch in data:
        loss_fn(model, batch)
    cache.flush()
    stored = cache.data.clone()
    again = build_skip_cache(model, tokens, data.n_windows, T, cfg, torch.device("cpu"))
    assert again.reused and bool(again.filled.all()) and torch.equal(again.data, stored)
    with torch.no_grad():
        model.base.blocks[0].attn.qkv.weight.add_(0.01)  # another backbone: the cache is stale
    stale = build_skip_cache(model, tokens, data.n_windows, T, cfg, torch.device("cpu"))
    assert not stale.reused and not bool(stale.filled.any())
    assert json.loads((tmp_path / "skip_cache" / "manifest.json").read_text())["key"] == stale.key


def test_save_and_load_round_trip_and_refuse_another_model(tmp_path: Path) -> None:
    model = _model("tiny-llama", indices=[1], head=True).eval()
    with torch.no_grad():
        for p in model.trainable():
            p.normal_(std=0.05)
    idx = torch.randint(0, 512, (2, T))
    ref = model(idx)
    save_skip2lora(model, tmp_path / "a")
    loaded = load_skip2lora(_base("tiny-llama"), tmp_path / "a").eval()
    torch.testing.assert_close(loaded(idx), ref)
    with pytest.raises(CheckpointError, match="n_embd"):
        load_skip2lora(TransformerLM(ModelConfig.from_name("tiny-llama", n_embd=32, n_head=2, n_kv_head=1)),
                       tmp_path / "a")
    with pytest.raises(Exception, match="exists"):
        save_skip2lora(model, tmp_path / "a")


def test_unknown_tap_norm_is_refused() -> None:
    with pytest.raises(ConfigError, match="tap_norm must be one of none, final"):
        Skip2LoRAModel(_base(), Skip2LoRAConfig(block_indices=[0], tap_norm="rms"))


def test_stacked_adapters_give_the_per_adapter_sum_and_its_gradients() -> None:
    """head_input runs the K adapters as two matmuls; values and gradients equal K separate adapters."""
    model = _model("tiny-gpt2", indices=[0, 1])
    feats = torch.randn(2, 3, T, model.base.config.n_embd)  # K = 2 taps + the final norm's output
    got = model.head_input(feats)
    grads = torch.autograd.grad(got.square().sum(), list(model.trainable()))
    adapters = [a for a in model.adapters.values() if isinstance(a, SkipAdapter)]
    want = feats[:, -1] + sum(a(feats[:, k]) for k, a in enumerate(adapters))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), list(model.trainable())), strict=True):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_head_parts_read_the_taps_in_place_without_dropout() -> None:
    """Without tap dropout no op of head_parts writes a new tensor as large as the K taps (B, K, T, C): the A
    products read the contiguous features in place. (Slicing the K taps and multiplying them copied them.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self, size: int) -> None:
            super().__init__()
            self.size, self.found = size, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            for o in torch.utils._pytree.tree_leaves(out):
                if isinstance(o, torch.Tensor) and o.numel() >= self.size and (
                        o.untyped_storage().data_ptr() not in inputs):
                    self.found.append(str(func))
            return out

    model = _model("tiny-gpt2", indices=[0, 1])
    feats = torch.randn(2, 3, T, model.base.config.n_embd)  # K = 2 taps + the final norm's output
    with Copies(feats[:, :2].numel()) as mode:
        model.head_parts(feats)
    assert mode.found == []


def test_a_complete_cache_answers_missing_without_reading_the_ids() -> None:
    """Once every window is stored, `missing` does not copy the ids back from the device (no sync per step):
    ids on the meta device (which cannot be copied to the host) then work; before, they are read."""
    cache = SkipCache(3, 2, T, 8, torch.float32, "cpu", torch.device("cpu"), "k")
    meta_ids = torch.empty(2, dtype=torch.long, device="meta")
    with pytest.raises((NotImplementedError, RuntimeError)):
        cache.missing(meta_ids)
    cache.put(torch.tensor([0, 2]), torch.zeros(2, 2, T, 8))
    assert cache.missing(torch.tensor([0, 1, 2])).tolist() == [False, True, False]
    cache.put(torch.tensor([1]), torch.zeros(1, 2, T, 8))
    assert cache.missing(meta_ids).tolist() == [False, False]
