"""CUDA-only fast paths (run on the GPU machine; CI has no GPU, so they are reported as skipped there)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import pytest
import torch
from torch import Tensor

from legolm.core.config import ModelConfig
from legolm.generation import GenerationConfig, generate
from legolm.model.transformer import TransformerLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def _model(preset: str, dtype: torch.dtype) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(ModelConfig.from_name(preset)).to("cuda", dtype).eval()


@pytest.mark.parametrize("preset", ["gpt2", "pythia-160m", "smollm2-135m"])
def test_cuda_graph_and_compile_decode_match_eager(preset: str) -> None:
    model = _model(preset, torch.float32)
    prompts = [[5, 17, 99, 3, 42, 7], [8, 1000, 12]]  # different lengths: left padding in the graph too
    tokens = {}
    for name, graph, comp in [("eager", False, False), ("graph", True, False), ("compile", True, True)]:
        cfg = GenerationConfig(max_new_tokens=24, greedy=True, stop_at_eos=False, cuda_graph=graph, compile=comp)
        tokens[name] = generate(model, prompts, cfg).tokens
    assert tokens["graph"] == tokens["eager"]
    assert tokens["compile"] == tokens["eager"]


def test_bf16_logits_close_to_fp32_and_generation_runs() -> None:
    import copy

    model32 = _model("gpt2", torch.float32)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    idx = torch.randint(0, 50257, (2, 64), device="cuda")
    with torch.no_grad():
        ref, out = model32(idx), model16(idx).float()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2
    cfg = GenerationConfig(max_new_tokens=16, greedy=True, stop_at_eos=False)
    assert len(generate(model16, [[464, 3139, 286, 4881, 318]], cfg).tokens[0]) == 16


def test_autotuned_compile_decode_matches_eager() -> None:
    model = _model("gpt2", torch.float32)
    prompts = [[5, 17, 99, 3, 42, 7]]
    eager = generate(model, prompts, GenerationConfig(max_new_tokens=16, greedy=True, stop_at_eos=False,
                                                      cuda_graph=False)).tokens
    cfg = GenerationConfig(max_new_tokens=16, greedy=True, stop_at_eos=False, compile=True,
                           compile_mode="max-autotune-no-cudagraphs")
    assert generate(model, prompts, cfg).tokens == eager


def test_train_step_takes_batches_already_on_the_gpu() -> None:
    """Batches built on the GPU (as the benchmarks do) are used in place, CPU ones are copied over."""
    from contextlib import nullcontext

    from legolm.train.config import OptimConfig, ScheduleConfig
    from legolm.train.fit import NextTokenLoss, TrainStep
    from legolm.train.optim import LRSchedule, build_optimizer
    from legolm.utils.params import trainable_parameters

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig.from_name("tiny-gpt2")).to("cuda").train()
    device = torch.device("cuda")  # no index: the batches' device is cuda:0
    optimizer = build_optimizer(trainable_parameters(model), OptimConfig(lr=1e-3), device)
    step = TrainStep(model, NextTokenLoss(), optimizer, LRSchedule(1e-3, ScheduleConfig(warmup_steps=0), 4),
                     1.0, nullcontext(), device, False, "default")
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    for where in ("cuda:0", "cpu"):
        batch = {"input_ids": ids[:, :-1].to(where), "labels": ids[:, 1:].to(where)}
        loss = step([batch], 0)[0]
        assert torch.isfinite(torch.as_tensor(loss))


def test_fit_defaults_to_the_chunked_triton_loss_on_the_gpu_and_trains_like_the_whole_logits(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """FitConfig's loss left at its defaults resolves to the Triton step in chunks on the GPU; `fit` runs it (a
    spy sees the kernel) and moves the weights as the same run with the whole-logits loss does (bf16 autocast:
    the updates agree to 15% in norm over all parameters; a wrong gradient would not)."""
    import importlib

    import numpy as np

    from legolm.train import FitConfig, WindowBatches, fit

    fit_module = importlib.import_module("legolm.train.fit")  # the package's `fit` attribute is the function
    from legolm.train.config import AUTO_LOSS_CHUNK

    seen: list[tuple[int, str]] = []
    real = fit_module.head_cross_entropy

    def spy(head: Any, x: Tensor, labels: Tensor, chunk: int, kernel: Any, vocab_chunk: int) -> Tensor:
        seen.append((chunk, kernel))
        return real(head, x, labels, chunk, kernel, vocab_chunk)

    monkeypatch.setattr(fit_module, "head_cross_entropy", spy)
    ids = np.random.default_rng(0).integers(0, ModelConfig.from_name("tiny-gpt2").vocab_size, 20000).astype(np.uint16)
    deltas = []
    for name, chunk in (("default", None), ("whole", 0)):
        torch.manual_seed(0)
        model = TransformerLM(ModelConfig.from_name("tiny-gpt2"))
        init = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        cfg = FitConfig(window=64, batch_size=4, max_steps=3, loss_chunk_tokens=chunk)
        cfg.run.out_dir, cfg.run.progress, cfg.run.plot, cfg.run.device = str(tmp_path / name), False, False, "cuda"
        cfg.eval.every = 0
        if chunk is None:
            assert (cfg.resolved_loss_kernel(), cfg.resolved_loss_chunk()) == ("triton", AUTO_LOSS_CHUNK)
        fit(model, WindowBatches(ids, 64, 4, seed=0), cfg)
        deltas.append(torch.cat([p.detach().float().cpu().flatten() for p in model.parameters()]) - init)
    assert seen and set(seen) == {(AUTO_LOSS_CHUNK, "triton")}
    assert deltas[1].norm() > 0
    assert ((deltas[0] - deltas[1]).norm() / deltas[1].norm()).item() < 0.15


def test_fit_with_a_whole_step_cuda_graph_trains_as_the_eager_steps(tmp_path: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`run.cuda_graph` (fp32, a warmup-then-cosine schedule: the rate changes every step): the graph is captured
    once and replayed for every step after the warm-up ones, and the weights move as eager steps move them (to
    1e-3 of the update's norm: the capturable AdamW computes its bias corrections on the device, in fp32, and
    Adam's normalised update turns such last-bit differences of near-zero gradients into lr-sized ones)."""
    import numpy as np

    import legolm.train.step_graph as sg
    from legolm.train import FitConfig, WindowBatches, fit

    replays: list[int] = []
    real = sg.StepGraph.replay

    def counted(self: Any, batches: Any) -> Any:
        replays.append(1)
        return real(self, batches)

    monkeypatch.setattr(sg.StepGraph, "replay", counted)
    ids = np.random.default_rng(0).integers(0, ModelConfig.from_name("tiny-gpt2").vocab_size, 20000).astype(np.uint16)
    deltas = []
    for graph in (False, True):
        torch.manual_seed(0)
        model = TransformerLM(ModelConfig.from_name("tiny-gpt2"))
        init = torch.cat([p.detach().flatten() for p in model.parameters()])
        cfg = FitConfig(window=64, batch_size=4, max_steps=8, loss_chunk_tokens=0, loss_kernel="torch")
        cfg.schedule.warmup_steps = 3
        cfg.run.out_dir, cfg.run.progress, cfg.run.plot = str(tmp_path / str(graph)), False, False
        cfg.run.device = "cuda"
        cfg.run.precision, cfg.run.tf32, cfg.run.cuda_graph, cfg.eval.every = "fp32", False, graph, 0
        fit(model, WindowBatches(ids, 64, 4, seed=0), cfg)
        deltas.append(torch.cat([p.detach().flatten() for p in model.parameters()]).cpu() - init)
    assert len(replays) == 8 - cfg.run.cuda_graph_warmup
    assert deltas[0].norm() > 0 and ((deltas[1] - deltas[0]).norm() / deltas[0].norm()).item() < 1e-3


def test_skip2lora_cached_steps_in_one_graph_train_as_eager_steps() -> None:
    """Skip2-LoRA with its Skip-Cache on the GPU, `TrainStep(cuda_graph=True)`: epoch 1 fills the cache eagerly
    (not capturable), epoch 2 warms up and captures, later ones replay; a batch of another shape runs eagerly.
    Losses and adapter weights follow the eager steps, run with the same capturable AdamW (fp32, tap dropout on:
    the graph draws the same masks)."""
    from contextlib import nullcontext

    from legolm.adapters.skip2lora import Skip2LoRAConfig, Skip2LoRAModel
    from legolm.adapters.skip2lora_train import Skip2LoRALoss
    from legolm.adapters.skip_cache import SkipCache
    from legolm.train.config import OptimConfig, ScheduleConfig
    from legolm.train.fit import TrainStep
    from legolm.train.optim import LRSchedule, build_optimizer
    from legolm.train.step_graph import capturable_

    device = torch.device("cuda")
    torch.manual_seed(0)
    base = TransformerLM(ModelConfig.from_name("tiny-pythia")).to(device)
    c, B, T = base.config, 2, 16
    ids = torch.randint(0, c.vocab_size, (4, B, T + 1), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": x[:, :-1], "labels": x[:, 1:], "sample_ids": torch.arange(i * B, (i + 1) * B)}
               for i, x in enumerate(ids)]
    odd = {k: v[:1] for k, v in batches[1].items()}  # one window: not the captured shape
    runs = []
    for graph in (False, True):
        torch.manual_seed(2)
        model = Skip2LoRAModel(base, Skip2LoRAConfig(block_indices=list(range(c.n_layer)), r=4, alpha=8.0,
                                                     dropout=0.1)).to(device)
        for p in model.trainable():  # B = 0 at the start: give the adapters weights, so every step moves them
            torch.nn.init.normal_(p, std=0.02)
        cache = SkipCache(len(batches) * B, c.n_layer + 1, T, c.n_embd, torch.float32, "gpu", device, "t")
        opt = build_optimizer(list(model.trainable()), OptimConfig(lr=1e-2), device)
        schedule = LRSchedule(1e-2, ScheduleConfig(warmup_steps=5, decay="cosine"), 20)
        capturable_(opt, device)  # both runs: the optimizer a graph replays
        step = TrainStep(model, Skip2LoRALoss(cache, 0, "torch", head_grad="low-rank"), opt, schedule, 1.0,
                         nullcontext(), device, cuda_graph=graph)
        model.train()
        losses = [step([b], i)[0].item() for i, b in enumerate(batches * 4)]
        losses.append(step([odd], 16)[0].item())
        losses += [step([b], 17 + i)[0].item() for i, b in enumerate(batches[:2])]
        assert (step.graph is not None) == graph
        runs.append((losses, [p.detach().clone() for p in model.trainable()]))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-4, abs=1e-6)
    for got, want in zip(runs[1][1], runs[0][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_fit_refuses_a_graph_for_a_loss_that_cannot_say_when_it_may_be_captured(tmp_path: Any) -> None:
    import numpy as np

    from legolm.errors import ConfigError
    from legolm.train import FitConfig, WindowBatches, fit
    from legolm.train.fit import NextTokenLoss

    cfg = FitConfig(window=16, batch_size=2, max_steps=1)
    cfg.run.out_dir, cfg.run.device, cfg.run.cuda_graph = str(tmp_path / "r"), "cuda", True
    ids = np.zeros(200, dtype=np.uint16)
    loss = NextTokenLoss()
    with pytest.raises(ConfigError, match=r"this run's loss \(function\) does not say when its steps may be captured"):
        fit(TransformerLM(ModelConfig.from_name("tiny-gpt2")), WindowBatches(ids, 16, 2, seed=0), cfg,
            loss_fn=lambda m, b: loss(m, b))
    assert not (tmp_path / "r").exists()


def test_skip_cache_in_cpu_ram_serves_gpu_batches() -> None:
    from legolm.adapters.skip_cache import SkipCache

    cache = SkipCache(6, 3, 8, 16, torch.bfloat16, "cpu", torch.device("cuda"), "k")
    feats = torch.randn(2, 3, 8, 16, device="cuda")
    cache.put(torch.tensor([4, 1]), feats)
    got = cache.get(torch.tensor([1, 4]), torch.device("cuda"))
    assert got.is_cuda and torch.equal(got, feats.to(torch.bfloat16)[[1, 0]])


def _autocast_loss(loss_fn: Any) -> Any:
    def run(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return loss_fn(model, batch)[0]
    return run


@pytest.mark.parametrize("compiled", [False, True])
def test_chunked_head_loss_gradients_match_unchunked_under_bf16_autocast(compiled: bool) -> None:
    """The fused chunked cross-entropy trains like the plain loss, also when the step is compiled
    (a compiled trace once computed no gradients at all: the model never trained)."""
    from legolm.train.fit import NextTokenLoss
    from legolm.train.head_loss import accumulates_in_place

    # dW accumulates in fp32 straight from the GEMM here (no bf16 product per chunk): the path this tests
    assert accumulates_in_place(torch.device("cuda"), torch.bfloat16, torch.float32)
    grads = []
    for chunk in (0, 48):
        torch.manual_seed(0)
        model = TransformerLM(ModelConfig.from_name("tiny-gpt2")).to("cuda").train()  # tied head
        ids = torch.randint(0, model.config.vocab_size, (2, 65), device="cuda")
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
        step = _autocast_loss(NextTokenLoss(chunk))
        (torch.compile(step) if compiled else step)(model, batch).backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters()})
    for name, ref in grads[0].items():
        assert grads[1][name].abs().sum() > 0, name
        assert ((grads[1][name] - ref).norm() / ref.norm()).item() < 3e-2, name


@pytest.mark.parametrize("pad_scratch", [True, False])
def test_the_softmax_step_kernel_at_a_real_vocabulary_matches_torch_in_fp32(pad_scratch: bool) -> None:
    """The Triton softmax step with its default launch settings at GPT-2's 50,257 words (a partial last tile),
    rows of exactly V or the first V of rows padded to 50,304 (aligned loads, the pad masked and set to 0),
    unscored rows, against torch's fp32 softmax of the same bf16 logits."""
    import torch.nn.functional as F

    from legolm.kernels.cross_entropy import ce_grad_
    from legolm.train.head_loss import IGNORE_INDEX

    gen = torch.Generator(device="cuda").manual_seed(0)
    buf = torch.full((64, 50304), 100.0, device="cuda", dtype=torch.bfloat16)
    logits = buf[:, :50257] if pad_scratch else torch.empty(64, 50257, device="cuda", dtype=torch.bfloat16)
    logits.copy_(torch.randn(64, 50257, generator=gen, device="cuda") * 3)
    labels = torch.randint(0, 50257, (64,), generator=gen, device="cuda")
    labels[[0, 63]] = IGNORE_INDEX
    ref = logits.float()
    want = torch.softmax(ref, -1) - F.one_hot(labels.clamp(min=0), 50257)
    want[labels == IGNORE_INDEX] = 0.0
    loss, lse = torch.empty(64, device="cuda"), torch.empty(64, device="cuda")
    ce_grad_(logits, labels, loss, lse, IGNORE_INDEX, pad_scratch=pad_scratch)
    torch.testing.assert_close(lse, torch.logsumexp(ref, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(ref, labels, ignore_index=IGNORE_INDEX, reduction="none"),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.float(), want, rtol=1e-2, atol=1e-5)  # bf16 storage of the gradient


def test_the_low_rank_heads_w_transpose_product_keeps_fp32_accuracy_from_two_bf16_terms() -> None:
    """Wᵀ m with W in bf16 and m an fp32 sum: the two-term tensor-core path against fp64 (its error is
    that of m's 16 leading bits, far below a bf16 rounding of m)."""
    from legolm.train.low_rank_head import _head_transpose_times

    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(50304, 768, generator=gen, device="cuda").to(torch.bfloat16)
    m = torch.randn(50304, 96, generator=gen, device="cuda") * torch.logspace(-3, 3, 96, device="cuda")
    want = w.double().T @ m.double()
    got = _head_transpose_times(w, m)
    assert got.dtype == torch.float32
    err = ((got.double() - want).norm() / want.norm()).item()
    bf16_err = ((w.double().T @ m.to(torch.bfloat16).double() - want).norm() / want.norm()).item()
    assert err < 1e-5 and err < bf16_err / 50, (err, bf16_err)


@pytest.mark.parametrize("preset", ["gpt2", "pythia-160m", "smollm2-135m"])
def test_fused_decode_matches_torch_decode(preset: str) -> None:
    """The compiled fused Triton step (tuned, captured in a CUDA graph) against the torch step, fp32."""
    model = _model(preset, torch.float32)
    prompts = [[5, 17, 99, 3, 42, 7] * 12]  # 72 cached tokens: two attention tiles
    cfg = GenerationConfig(max_new_tokens=32, greedy=True, stop_at_eos=False)
    want = generate(model, prompts, cfg).tokens
    cfg.fused = True
    assert generate(model, prompts, cfg).tokens == want


def test_fused_decode_logits_in_bf16_close_to_fp32() -> None:
    from legolm.generation.decoder import DecodeSession
    from legolm.generation.fused import FusedDecodeStep

    model32 = _model("pythia-160m", torch.float32)
    model16 = _model("pythia-160m", torch.bfloat16)
    prompt = torch.tensor([[5, 17, 99, 3, 42, 7] * 12], device="cuda")
    lengths = torch.tensor([prompt.shape[1]], device="cuda")
    ref = DecodeSession(model32, 1, 128, greedy=False, eos_id=None)
    fused = DecodeSession(model16, 1, 128, greedy=False, eos_id=None, cuda_graph=True,
                          step=FusedDecodeStep(model16, 64, 1024))
    with torch.inference_mode():
        for s in (ref, fused):
            s.start(s.prefill(prompt, lengths).argmax(-1), prompt.shape[1], lengths)
        for _ in range(3):
            want, got = ref.step(), fused.step()
            assert ((got - want).norm() / want.norm()).item() < 2e-2
            nxt = want.argmax(-1)
            ref.emit(nxt)
            fused.emit(nxt)


@pytest.mark.parametrize("preset", ["gpt2", "pythia-160m", "smollm2-135m"])
def test_fused_decode_with_pdl_equals_without(preset: str) -> None:
    """Programmatic dependent launch changes when kernels start, never what they compute: the logits of every
    step of a replayed graph are bit-identical with and without it (a kernel reading its input before the
    previous one finished would show here as a difference)."""
    from legolm.generation.fused import FusedDecodeStep
    from legolm.kernels.decode import pdl_supported

    if not pdl_supported(torch.device("cuda")):
        pytest.skip("this GPU or Triton has no programmatic dependent launch")
    model = _model(preset, torch.bfloat16)
    steps = [FusedDecodeStep(model, 64, 1024, tune=False, pdl=pdl) for pdl in (False, True)]
    assert [s.stack.pdl for s in steps] == [False, True]
    _replay_side_by_side(model, steps, torch.equal)


def _replay_side_by_side(model: Any, steps: list[Any], same: Callable[[Tensor, Tensor], bool]) -> None:
    """300 replayed bf16 steps of two step functions fed the first one's greedy tokens: ``same(got, want)`` holds
    for the logits of every step."""
    from legolm.generation.decoder import DecodeSession

    prompt = torch.tensor([[5, 17, 99, 3, 42, 7] * 12], device="cuda")
    lengths = torch.tensor([prompt.shape[1]], device="cuda")
    sessions = [DecodeSession(model, 1, 512, greedy=False, eos_id=None, cuda_graph=True, step=s) for s in steps]
    with torch.inference_mode():
        for s in sessions:
            s.start(s.prefill(prompt, lengths).argmax(-1), prompt.shape[1], lengths)
        for _ in range(300):
            want, got = (s.step().clone() for s in sessions)
            assert same(got, want)
            nxt = want.argmax(-1)
            for s in sessions:
                s.emit(nxt)


@pytest.mark.parametrize("kernel", ["persistent", "splitk", "splitk-exact"])
@pytest.mark.parametrize("preset", ["gpt2", "pythia-160m", "smollm2-135m"])
def test_persistent_and_split_k_decode_match_torch_decode(preset: str, kernel: str) -> None:
    """The persistent step on every SM (real grid barriers) and the split-K blocks (real atomics), captured in a
    CUDA graph and tuned: the torch step's greedy tokens, fp32."""
    model = _model(preset, torch.float32)
    prompts = [[5, 17, 99, 3, 42, 7] * 12]
    cfg = GenerationConfig(max_new_tokens=32, greedy=True, stop_at_eos=False)
    want = generate(model, prompts, cfg).tokens
    cfg.fused, cfg.fused_kernel = True, kernel
    assert generate(model, prompts, cfg).tokens == want


@pytest.mark.parametrize("kernel", ["torch", "blocks", "splitk", "splitk-exact"])
def test_steps_chained_in_one_graph_give_the_eager_tokens(kernel: Literal["torch", "blocks", "splitk",
                                                                          "splitk-exact"]) -> None:
    """8 greedy steps per replayed graph (39 new tokens: 4 replays of 8, then single steps), with and without
    an EOS mid-way: the eager torch loop's tokens. In the fused split-K step the first cache tile is loaded
    before the PDL wait, which is only right if the previous step ended before the next began."""
    model = _model("gpt2", torch.float32)
    prompts = [[5, 17, 99, 3, 42, 7] * 12]
    ref = GenerationConfig(max_new_tokens=40, greedy=True, stop_at_eos=False, cuda_graph=False)
    cfg = GenerationConfig(max_new_tokens=40, greedy=True, stop_at_eos=False, graph_steps=8,
                           fused=kernel != "torch", fused_kernel="blocks" if kernel == "torch" else kernel)
    want = generate(model, prompts, ref).tokens
    assert generate(model, prompts, cfg).tokens == want
    row = want[0]
    eos = row[20]  # first emitted at row.index(eos) <= 20: decoding stops well before 40 tokens
    ref.stop_at_eos = cfg.stop_at_eos = True
    stopped = generate(model, prompts, cfg, eos_id=eos)
    assert stopped.tokens == [row[:row.index(eos) + 1]] and stopped.steps < 40


@pytest.mark.parametrize("preset", ["gpt2", "pythia-160m", "smollm2-135m"])
def test_split_k_decode_follows_the_blocks_step_in_bf16(preset: str) -> None:
    """300 replayed bf16 steps fed the same tokens: the split-K blocks' logits stay within rounding of the
    five-kernel step's (an atomic add into a buffer not cleared, or read too early, would show as a large error)."""
    from legolm.generation.fused import FusedDecodeStep

    model = _model(preset, torch.bfloat16)
    steps = [FusedDecodeStep(model, 64, 1024, tune=False, split_k=split_k) for split_k in (False, True)]
    _replay_side_by_side(model, steps,
                         lambda got, want: ((got - want).norm() / want.norm()).item() < 1e-2)


@pytest.mark.parametrize("preset", ["gpt2", "smollm2-135m"])
def test_split_k_decode_gives_the_same_bits_on_every_run(preset: str) -> None:
    """Two split-K steps (own buffers, tuned launch shapes: hundreds of programs adding into each channel in
    whatever order they arrive) over 300 replayed bf16 steps: identical logits, bit for bit. Their fixed-point
    sums are exact; fp32 atomic adds would differ in the last bits."""
    from legolm.generation.fused import FusedDecodeStep

    model = _model(preset, torch.bfloat16)
    steps = [FusedDecodeStep(model, 64, 1024, tune=True, split_k=True, exact_sums=True) for _ in range(2)]
    _replay_side_by_side(model, steps, torch.equal)


@pytest.mark.parametrize("preset", ["gpt2", "smollm2-135m"])
def test_persistent_decode_follows_the_blocks_step_in_bf16(preset: str) -> None:
    """300 replayed bf16 steps fed the same tokens: the persistent step's logits stay within rounding of the
    five-kernel step's (a program reading a phase's input before the barrier would show as a large error), and
    every launch leaves the barrier counters at rest."""
    from legolm.generation.fused import FusedDecodeStep
    from legolm.generation.persistent import PersistentDecodeStep, PersistentShape

    model = _model(preset, torch.bfloat16)
    persistent = PersistentDecodeStep(model, PersistentShape(), 64, 1024)
    _replay_side_by_side(model, [FusedDecodeStep(model, 64, 1024, tune=False), persistent],
                         lambda got, want: ((got - want).norm() / want.norm()).item() < 1e-2)
    assert persistent.sync.tolist() == [0, 0]


def test_prefill_graphs_match_eager_prefill() -> None:
    """A prompt length's captured prefill replays with new prompts; a new length evicts the oldest."""
    model = _model("pythia-160m", torch.float32)
    eager = GenerationConfig(max_new_tokens=12, greedy=True, stop_at_eos=False, prefill_graphs=0)
    graphs = GenerationConfig(max_new_tokens=12, greedy=True, stop_at_eos=False, prefill_graphs=1)
    batches = [[[5, 17, 99, 3], [8, 9]], [[8, 1000, 12, 7, 9, 10], [3, 4, 5]], [[42, 43, 44, 45], [7, 7, 7]],
               [[1, 2], [9, 8, 7, 6]]]
    for prompts in batches:
        assert generate(model, prompts, graphs).tokens == generate(model, prompts, eager).tokens


def _lego(preset: str, split: int = 2, layers: int = 6, agree: bool = False) -> Any:
    """A LEGO model on the GPU (random weights): ``agree`` makes the deep exit mostly agree with the shallow one."""
    from legolm.model.lego import LegoLM

    torch.manual_seed(0)
    cfg = ModelConfig.from_name(preset, layers=[ModelConfig.from_name(preset).layers[0]] * split)
    model = LegoLM(cfg)
    model.mark_trained()
    model.extend(layers, 0.5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 / p.shape[-1] ** 0.5 * 8)
        if agree:
            assert model.shallow_exit is not None
            model.norm.load_state_dict(model.shallow_exit.norm.state_dict())
            model.lm_head.weight.copy_(model.shallow_exit.head.weight)
            for block in model.blocks[split:]:
                for name, p in block.named_parameters():
                    if name.endswith(("proj.weight", "down.weight")):
                        p.mul_(0.15)
    return model.to("cuda").eval()


def test_if_node_bodies_never_share_a_stream_with_the_capture() -> None:
    """torch's `Stream()` hands out 32 pool streams round-robin: captures on 40 fresh streams in a row each meet
    every pool stream, so an IF body on a pool stream would find it already capturing (CUresult 401) once."""
    from legolm.kernels import graph_if

    assert graph_if.unavailable_reason() is None, graph_if.unavailable_reason()
    flag, x = torch.ones((), dtype=torch.bool, device="cuda"), torch.zeros(1, device="cuda")
    for _ in range(40):
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.graph(graph, stream=stream), graph_if.if_node(flag):
            x.add_(1)
        graph.replay()
    torch.cuda.synchronize()
    assert x.item() == 40


def test_if_node_runs_its_body_only_on_replays_where_the_flag_is_set() -> None:
    """An IF node inside a torch capture (`legolm.kernels.graph_if`): the body follows the flag of each replay,
    the work after the node waits for it, and the capture around it is unchanged."""
    from legolm.kernels import graph_if

    assert graph_if.unavailable_reason() is None, graph_if.unavailable_reason()
    flag = torch.zeros((), dtype=torch.bool, device="cuda")
    x, y = torch.zeros(4, device="cuda"), torch.zeros(4, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.add_(1)
        with graph_if.if_node(flag):
            y.add_(x)
            y.mul_(3)
        x.mul_(2)
    x.zero_()
    y.zero_()
    hx = hy = 0.0
    for f in (False, True, True, False, True):
        flag.fill_(f)
        graph.replay()
        hx += 1
        hy = (hy + hx) * 3 if f else hy
        hx *= 2
    torch.cuda.synchronize()
    assert x.tolist() == [hx] * 4 and y.tolist() == [hy] * 4
    with pytest.raises(graph_if.GraphIfError, match="capturing"), graph_if.if_node(flag):
        pass


@pytest.mark.parametrize("if_nodes", [False, True])
@pytest.mark.parametrize("kernel", ["blocks", "splitk", "splitk-exact"])
@pytest.mark.parametrize("preset", ["gpt2", "pythia-160m", "smollm2-135m"])
@pytest.mark.parametrize("kv_mode", ["skip", "fill"])
def test_fused_early_exit_graphs_match_the_torch_loop(preset: str, kv_mode: str,
                                                      kernel: Literal["blocks", "splitk", "splitk-exact"],
                                                      if_nodes: bool) -> None:
    """CUDA graphs (one graph per part of a step and a host read, or several steps per graph with IF nodes): same
    tokens and exits as the eager early-exit loop (fp32), with five-kernel or split-K blocks."""
    from legolm.generation.early_exit import generate_with_early_exit
    from legolm.kernels import graph_if
    from legolm.model.lego import confidence

    if if_nodes:  # else the decoder would fall back to the host read and this test would not test IF nodes
        assert graph_if.unavailable_reason() is None, graph_if.unavailable_reason()
    model = _lego(preset)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        tau = float(confidence(model.forward_exits(ids).shallow_logits).median())
    ref = generate_with_early_exit(model, ids, 40, tau, kv_mode=kv_mode)
    cfg = GenerationConfig(max_new_tokens=40, greedy=True, stop_at_eos=False, early_exit="threshold", threshold=tau,
                           kv_mode=kv_mode, fused=True, graph_steps=8, fused_tune=False, fused_kernel=kernel,
                           fused_if_nodes=if_nodes)
    got = generate(model, ids.tolist(), cfg)
    assert got.tokens == ref.tokens.tolist()
    assert got.early_exit is not None and got.early_exit.shallow_ratio == pytest.approx(ref.stats.shallow_ratio)
    again = generate(model, ids.tolist(), cfg)  # the session's graphs replayed for a second call
    assert again.tokens == got.tokens


@pytest.mark.parametrize("kv_mode", ["skip", "fill"])
def test_the_start_graph_reads_each_calls_prompt_and_threshold(kv_mode: str) -> None:
    """`start` replays one graph per prompt length (prefill, reset, first token): calls of one session with other
    prompts of that length and other thresholds decode as the eager loop does at theirs (nothing baked in)."""
    from legolm.generation.early_exit import generate_with_early_exit
    from legolm.model.lego import confidence

    model = _lego("pythia-160m")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1000, (1, 12), generator=gen).cuda() for _ in range(2)]
    with torch.no_grad():
        conf = confidence(model.forward_exits(torch.cat(prompts)).shallow_logits)
    taus = [float(conf.quantile(q)) for q in (0.3, 0.7)]
    cfg = GenerationConfig(max_new_tokens=24, greedy=True, stop_at_eos=False, early_exit="threshold", kv_mode=kv_mode,
                           fused=True, graph_steps=8, fused_tune=False, fused_kernel="splitk-exact")
    ratios = []
    for ids, tau in [(prompts[0], taus[0]), (prompts[1], taus[1]), (prompts[1], taus[0]), (prompts[0], taus[1])]:
        ref = generate_with_early_exit(model, ids, 24, tau, kv_mode=kv_mode)
        got = generate(model, ids.tolist(), replace(cfg, threshold=tau))
        assert got.tokens == ref.tokens.tolist()
        assert got.early_exit is not None and got.early_exit.shallow_ratio == pytest.approx(ref.stats.shallow_ratio)
        ratios.append(got.early_exit.shallow_ratio)
    assert len(set(ratios)) > 1  # the thresholds routed differently: the test can tell them apart


@pytest.mark.parametrize("preset", ["gpt2", "pythia-160m", "smollm2-135m"])
@pytest.mark.parametrize("prompt_len", [2, 70])
@pytest.mark.parametrize("split_k", [False, True], ids=["five-kernels", "split-k-exact"])
def test_a_row_pass_gives_the_one_token_steps_bit_for_bit_on_the_gpu(preset: str, prompt_len: int,
                                                                     split_k: bool) -> None:
    """The compiled kernels (not the interpreter) in bf16: the upper blocks over 3 rows equal 3 one-token steps
    bit for bit (64-slot tiles: the rows in the first tile, or in the second); split-K with real atomics."""
    from tests.test_lego_decoding import assert_row_pass_is_one_token_steps

    assert_row_pass_is_one_token_steps(_lego(preset).to(torch.bfloat16), prompt_len, block=64, split_k=split_k)


@pytest.mark.parametrize("preset", ["gpt2", "smollm2-135m"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["blocks", "splitk"])
def test_fused_speculative_equals_fused_full_depth_greedy(preset: str, dtype: torch.dtype,
                                                          kernel: Literal["blocks", "splitk"]) -> None:
    """Self-speculative output is the full-depth greedy output, also in bf16 against the fused decoder of the
    same blocks (split-K: its exact sums, which speculative decoding always takes; tuned launch shapes, real
    atomics)."""
    model = _lego(preset, agree=True).to(dtype)
    ids = [[5, 17, 99, 3, 42, 7, 8, 100]]
    tune = kernel == "splitk"
    full = generate(model, ids, GenerationConfig(max_new_tokens=64, greedy=True, stop_at_eos=False, fused=True,
                                                 fused_tune=tune, fused_kernel="splitk-exact" if tune else kernel))
    for d in (2, 4):
        cfg = GenerationConfig(max_new_tokens=64, greedy=True, stop_at_eos=False, early_exit="speculative",
                               draft_tokens=d, fused=True, graph_steps=4, fused_tune=tune, fused_kernel=kernel)
        got = generate(model, ids, cfg)
        assert got.tokens == full.tokens, f"d={d}"
        assert got.early_exit is not None and 0.0 < got.early_exit.acceptance_rate < 1.0
