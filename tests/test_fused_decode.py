"""The fused Triton decode step against the torch step: same logits, same KV cache, same tokens.

Off the GPU the kernels run in Triton's CPU interpreter (conftest sets ``TRITON_INTERPRET=1``), so
these tests check the kernels' arithmetic on CI; `tests/test_cuda.py` checks the compiled ones.
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch

import legolm.generation.fused as fused_mod
import legolm.kernels.decode as kd
import legolm.kernels.splitk as ks
from legolm.adapters import LoRAConfig
from legolm.adapters.inject import inject_lora
from legolm.core.config import ModelConfig
from legolm.errors import ConfigError
from legolm.generation import GenerationConfig, generate
from legolm.generation.decoder import DecodeSession, StepFn
from legolm.generation.fused import FusedDecodeStep, check_fused
from legolm.model.transformer import TransformerLM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model(preset: str, dtype: torch.dtype = torch.float32, n_layer: int | None = None) -> TransformerLM:
    torch.manual_seed(0)
    config = ModelConfig.from_name(preset)
    if n_layer is not None:
        config.layers = config.layers[:1] * n_layer
    model = TransformerLM(config).eval()
    with torch.no_grad():  # non-trivial norms and biases (the init leaves them at 1 and 0), and
        for name, p in model.named_parameters():  # activations of order 1, where GELU's shape shows
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() == 2 and "wte" not in name and "wpe" not in name:
                p.mul_(5.0)
    return model.to(DEVICE, dtype)


def _sessions(model: TransformerLM, block_t: int) -> tuple[DecodeSession, DecodeSession]:
    step = FusedDecodeStep(model, attention_block=block_t, embed_block=32, tune=False)
    return (DecodeSession(model, 1, 64, greedy=False, eos_id=None),
            DecodeSession(model, 1, 64, greedy=False, eos_id=None, step=step))


@pytest.mark.parametrize("tiles", ["one", "several"])
@pytest.mark.parametrize(("split_k", "exact"), [(False, False), (True, False), (True, True)],
                         ids=["five-kernels", "split-k", "split-k-exact"])
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-pythia", "tiny-llama"])
@torch.inference_mode()
def test_fused_step_matches_torch_step(preset: str, split_k: bool, exact: bool, tiles: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits of every step and the cache it writes, fp32, prompts longer than one attention tile; split-K blocks
    (three kernels) too, with an odd number of blocks (the result ends in the second residual buffer), summing in
    fp32 or exactly (the int64 fixed-point stream: a missing scale anywhere would show). Weight tiles that hold a
    whole row (loaded before the sync) or that a loop streams ("several")."""
    if tiles == "several":
        monkeypatch.setattr(fused_mod, "_TUNED", {})  # launch shapes are kept per model shape
        monkeypatch.setattr(fused_mod, "_TUNED_SPLIT_K", {})
        monkeypatch.setattr(kd, "INTERPRETER_GEMV", kd.GemvConfig(16, 32, 4))
        monkeypatch.setattr(ks, "INTERPRETER_MLP", ks.MlpConfig(16, 32, 16, 4))
    model = _model(preset, n_layer=3 if split_k else None)
    step = FusedDecodeStep(model, attention_block=4, embed_block=32, tune=False, split_k=split_k, exact_sums=exact)
    assert step.stack.x.dtype == (torch.int64 if exact else torch.float32)
    assert_matches_torch_step(model, step)


def assert_matches_torch_step(model: TransformerLM, step: StepFn) -> None:
    """Four decode steps of ``step`` against the torch step on a 9-token prompt (three attention tiles of 4 slots,
    the last one partial): the logits of each step, the slot it advances to, and the K/V cache it writes."""
    ref = DecodeSession(model, 1, 64, greedy=False, eos_id=None)
    fused = DecodeSession(model, 1, 64, greedy=False, eos_id=None, step=step)
    prompt = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 100, 12]], device=DEVICE)
    lengths = torch.tensor([prompt.shape[1]], device=DEVICE)
    first = ref.prefill(prompt, lengths).argmax(-1)
    fused.prefill(prompt, lengths)
    for s in (ref, fused):
        s.start(first, prompt.shape[1], lengths)
    for _ in range(4):
        want, got = ref.step(), fused.step()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        nxt = want.argmax(-1)
        ref.emit(nxt)
        fused.emit(nxt)
    assert int(fused.state.slot) == int(ref.state.slot) == prompt.shape[1] + 4
    for i in range(model.config.n_layer):
        a, b = ref.cache.layers[i], fused.cache.layers[i]
        torch.testing.assert_close(b.k, a.k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.v, a.v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["blocks", "splitk"])
@torch.inference_mode()
def test_fused_generate_gives_the_torch_tokens_and_stops_at_eos(kernel: Literal["blocks", "splitk"]) -> None:
    """Greedy tokens come from the fused head + reduction kernels; EOS stops the row there too."""
    model = _model("tiny-pythia")
    prompts = [[5, 6, 7, 8, 9, 10, 11]]
    cfg = GenerationConfig(max_new_tokens=10, greedy=True, stop_at_eos=False)
    fused = GenerationConfig(max_new_tokens=10, greedy=True, stop_at_eos=False, fused=True, fused_tune=False,
                             fused_kernel=kernel)
    want = generate(model, prompts, cfg).tokens
    assert generate(model, prompts, fused).tokens == want
    row = want[0]
    eos = next(t for i, t in enumerate(row) if i >= 2 and t not in row[:i])  # first seen mid-way: stops there
    cfg.stop_at_eos = fused.stop_at_eos = True
    stopped = generate(model, prompts, cfg, eos_id=eos).tokens
    assert stopped == [row[: row.index(eos) + 1]]
    assert generate(model, prompts, fused, eos_id=eos).tokens == stopped


@torch.inference_mode()
def test_fused_step_in_bf16_is_close_to_fp32() -> None:
    model, model16 = _model("tiny-llama"), _model("tiny-llama", torch.bfloat16)
    ref, _ = _sessions(model, block_t=8)
    _, fused = _sessions(model16, block_t=8)
    prompt = torch.tensor([[5, 17, 99, 3, 42]], device=DEVICE)
    lengths = torch.tensor([5], device=DEVICE)
    for s in (ref, fused):
        s.start(s.prefill(prompt, lengths).argmax(-1), 5, lengths)
    want, got = ref.step(), fused.step()
    assert ((got - want).norm() / want.norm()).item() < 2e-2


def test_fused_refuses_what_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("tiny-gpt2")
    with pytest.raises(ConfigError, match="batch 1"):
        check_fused(2, torch.device(DEVICE))
    inject_lora(model, LoRAConfig(r=2, target_modules=["qkv"]))
    with pytest.raises(ConfigError, match="merge adapters"):
        FusedDecodeStep(model, attention_block=64, embed_block=32)
    with pytest.raises(ConfigError, match="merge adapters"):  # through generate, as a user meets it
        generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=2, greedy=True, fused=True))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="CUDA GPU"):
        check_fused(1, torch.device("cpu"))


def test_fused_block_sizes_are_validated() -> None:
    with pytest.raises(ConfigError, match="power of two"):
        GenerationConfig(fused_attention_block=48).validate()



def test_kernels_compile_for_the_gpu() -> None:
    """Triton's real compiler (front end, LLVM, ptxas) on every kernel specialization for an H100, no GPU
    needed: the interpreter above does not check what only compilation does (e.g. loop-carried types).
    It runs in a fresh process, outside the interpreter."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("compile_kernels.py")
    root = str(Path(__file__).resolve().parents[1])  # this checkout, installed or not
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("compiled") == 39, done.stdout
