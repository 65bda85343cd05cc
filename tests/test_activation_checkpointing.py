"""Activation checkpointing per block (``run.activation_checkpointing``): same loss and gradients, really recomputed.

fp32 on CPU: ``blocks`` and ``selective`` replay the same kernels on the same inputs, so the
gradients must match the plain model's to rounding (they are in fact bitwise equal); op counts in
backward show that each mode recomputes what it claims (a mode silently left off would fail them).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from legolm.adapters.inject import LoRAConfig, inject_lora
from legolm.cli.main import main
from legolm.core.config import ModelConfig
from legolm.core.kv_cache import KVCache
from legolm.errors import ConfigError
from legolm.layers.memory_state import carry_memory
from legolm.model.transformer import TransformerLM
from legolm.train.activation_checkpointing import (
    apply_activation_checkpointing,
    checkpointing_mode,
    remove_activation_checkpointing,
)
from legolm.train.head_loss import token_cross_entropy

MODES = ["none", "blocks", "selective"]
VOCAB, B, T = 512, 2, 32
MEMORY = {"segment_len": 8}  # 4 segments per 32-token window: the memory is read and written in the graph


def tiny(preset: str, seed: int = 0, **overrides: Any) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig.from_name(preset, vocab_size=VOCAB, **overrides))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g), torch.randint(0, VOCAB, (B, T), generator=g)


def next_token_loss(model: nn.Module) -> torch.Tensor:
    idx, labels = batch()
    return token_cross_entropy(model(idx), labels)


def loss_and_grads(model: nn.Module, mode: str, loss_fn: Callable[[nn.Module], torch.Tensor] = next_token_loss
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one step with ``mode`` (dropout, if any, drawn from the same seed)."""
    apply_activation_checkpointing(model, mode)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    loss = loss_fn(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    remove_activation_checkpointing(model)
    return loss.detach(), grads


def assert_same_step(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor] = next_token_loss) -> None:
    ref_loss, ref = loss_and_grads(model, "none", loss_fn)
    assert ref and all(g.abs().max() > 0 for g in ref.values() if g.numel() > 1)
    for mode in ("blocks", "selective"):
        loss, grads = loss_and_grads(model, mode, loss_fn)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
        assert grads.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-7, msg=f"{mode}: {name}")


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-pythia", "tiny-llama"])
def test_same_loss_and_gradients_with_and_without_checkpointing(preset: str) -> None:
    assert_same_step(tiny(preset))


@pytest.mark.parametrize("layer", ["infini", "multi_memory", "hierarchical"])
def test_memory_layers_checkpoint_to_the_same_gradients(layer: str) -> None:
    model = tiny("tiny-pythia", layers=[layer, "pythia"], extra={layer: MEMORY})
    assert_same_step(model)


def test_lora_with_dropout_checkpoints_to_the_same_gradients() -> None:
    """The adapters' dropout mask is drawn again in the recomputation: the RNG state is replayed."""
    model = tiny("tiny-llama")
    inject_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=0.2, target_modules=["all-linear"]))
    for name, p in model.named_parameters():  # B = 0 would zero most gradients: give the adapters a value
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    ref_loss, ref = loss_and_grads(model, "none")
    assert ref and all("lora_" in n for n in ref)  # only the adapters train
    for mode in ("blocks", "selective"):
        loss, grads = loss_and_grads(model, mode)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
        for name in ref:
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-7, msg=f"{mode}: {name}")


def test_lego_phase2_loss_checkpoints_to_the_same_gradients() -> None:
    """Phase 2 runs the upper blocks on stored lower-layer states (the lower ones frozen, not run)."""
    from legolm.lego.train import HardTokenLoss
    from legolm.model.lego import LegoLM

    torch.manual_seed(0)
    model = LegoLM(ModelConfig.from_name("tiny-pythia", vocab_size=VOCAB))
    model.mark_trained()
    model.extend(4, routing_threshold=0.5, identity_init=False)
    g = torch.Generator().manual_seed(2)
    stored = {"hidden": torch.randn(B, T, model.config.n_embd, generator=g), "labels": batch()[1],
              "hard": torch.rand(B, T, generator=g) < 0.5, "shallow_logp": -5 * torch.rand(B, T, generator=g),
              "conf": torch.rand(B, T, generator=g)}
    loss = HardTokenLoss("routed", easy_weight=0.3)
    assert_same_step(model, lambda m: loss(m, stored)[0])


def test_lct_parallel_forward_checkpoints_to_the_same_gradients() -> None:
    """LCT's ``lct`` method: one parallel forward reading lagged states (no cache in the blocks)."""
    from legolm.lct.context_pythia import ContextPythia

    torch.manual_seed(0)
    model = ContextPythia(ModelConfig.from_name("tiny-pythia", vocab_size=VOCAB))
    torch.nn.init.normal_(model.ctx_proj.weight, std=0.02)  # zero-initialised: give the context path a gradient
    idx, labels = batch()
    prev = torch.randn(B, T, model.config.n_embd, generator=torch.Generator().manual_seed(3))
    assert_same_step(model, lambda m: token_cross_entropy(m(idx, prev).logits, labels))


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that actually run (ops selective checkpointing returns from its store do not)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def backward_ops(mode: str) -> Counter[str]:
    model = tiny("tiny-llama")
    apply_activation_checkpointing(model, mode)
    idx, labels = batch()
    loss = token_cross_entropy(model(idx), labels)
    counter = OpCounter()
    with counter:
        loss.backward()
    return counter.counts


def test_each_mode_recomputes_what_it_says() -> None:
    """blocks: the whole block forward (matmuls included) runs again in backward; selective: the norms
    and activations run again but no matmul (their outputs were kept); none: nothing runs again."""
    none, blocks, selective = (backward_ops(m) for m in MODES)
    matmuls = ("mm", "addmm", "bmm")
    n_mm = {name: sum(c[op] for op in matmuls) for name, c in (("none", none), ("blocks", blocks),
                                                                 ("selective", selective))}
    assert n_mm["blocks"] > n_mm["none"]  # q, k, v, o, gate, up, down of each block, again
    assert n_mm["selective"] == n_mm["none"]
    for recomputed in ("silu", "rsqrt"):  # SwiGLU's activation, RMSNorm
        assert none[recomputed] == 0 < selective[recomputed] and blocks[recomputed] > 0


def test_the_model_stays_the_same_module() -> None:
    """Names, parameters, state dict and isinstance are untouched; none/remove restore the class; no_grad is plain."""
    model = tiny("tiny-pythia")
    keys, classes = list(model.state_dict()), [type(b) for b in model.blocks]
    assert apply_activation_checkpointing(model, "blocks") == model.config.n_layer
    assert list(model.state_dict()) == keys
    assert all(isinstance(b, c) for b, c in zip(model.blocks, classes, strict=True))
    assert {checkpointing_mode(b) for b in model.blocks} == {"blocks"}
    apply_activation_checkpointing(model, "selective")  # replaces, does not stack
    assert [type(b).__mro__[1] for b in model.blocks] == classes
    calls: list[int] = []
    model.blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(batch()[0])
    assert len(calls) == 1  # no checkpoint (and nothing to recompute) without autograd
    token_cross_entropy(model(batch()[0]), batch()[1]).backward()
    assert len(calls) == 3  # forward + recomputation in backward
    apply_activation_checkpointing(model, "none")
    assert [type(b) for b in model.blocks] == classes and checkpointing_mode(model.blocks[0]) == "none"
    with pytest.raises(ConfigError, match="must be one of none, blocks, selective"):
        apply_activation_checkpointing(model, "full")
    with pytest.raises(ConfigError, match="has none"):
        apply_activation_checkpointing(nn.Sequential(nn.Linear(2, 2)), "blocks")


def test_refuses_a_cache_or_carried_memory_under_autograd() -> None:
    model = tiny("tiny-pythia")
    apply_activation_checkpointing(model, "blocks")
    with pytest.raises(ConfigError, match="given a cache"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=KVCache(model.config, 1, 16), input_pos=torch.arange(4))
    with torch.no_grad():  # decoding: no autograd, so no checkpoint
        model(torch.zeros(1, 4, dtype=torch.long), cache=KVCache(model.config, 1, 16), input_pos=torch.arange(4))
    memory = tiny("tiny-pythia", layers=["infini"], extra={"infini": MEMORY})
    apply_activation_checkpointing(memory, "selective")
    with carry_memory(memory), pytest.raises(ConfigError, match="carries its memory"):
        memory(batch()[0])
    with carry_memory(memory), torch.no_grad():
        memory(batch()[0])  # no autograd: nothing is recomputed, carrying is fine


# -- fit and the CLI ------------------------------------------------------------------------------------------
def pretrain_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["pretrain", "--data.source", "tinyshakespeare", "--data.max-documents", "8", "--data.tokenizer", "bpe:512",
            "--data.cache-dir", str(tmp_path / "cache"), "--model.preset", "tiny-llama", "--window", "32",
            "--batch-size", "4", "--max-steps", "4", "--schedule.warmup-steps", "1", "--eval.every", "4",
            "--eval.max-batches", "1", "--run.device", "cpu", "--run.precision", "fp32", "--run.out-dir",
            str(tmp_path / name), "--no-run.progress", "--no-run.plot", "--sample.prompt", "", *extra]


def test_pretrain_flag_trains_to_the_same_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    assert main(pretrain_args(tmp_path, "none")) == 0
    assert main(pretrain_args(tmp_path, "blocks", "--run.activation-checkpointing", "blocks")) == 0
    assert "activation checkpointing blocks on 2 blocks" in capsys.readouterr().out
    assert main(pretrain_args(tmp_path, "sel", "--run.activation-checkpointing", "selective")) == 0
    ref = load_file(str(tmp_path / "none" / "model" / "model.safetensors"))
    for name in ("blocks", "sel"):
        got = load_file(str(tmp_path / name / "model" / "model.safetensors"))
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    assert "activation_checkpointing: blocks" in (tmp_path / "blocks" / "config.yaml").read_text()


def test_fit_gives_the_callers_model_back_plain(tmp_path: Path) -> None:
    import numpy as np

    from legolm.train import FitConfig, WindowBatches, fit

    model = tiny("tiny-gpt2")
    ids = np.random.default_rng(0).integers(0, VOCAB, 4000).astype(np.uint16)
    cfg = FitConfig(window=16, batch_size=4, max_steps=2)
    cfg.run.out_dir, cfg.run.progress, cfg.run.plot, cfg.run.device = str(tmp_path / "r"), False, False, "cpu"
    cfg.run.activation_checkpointing, cfg.eval.every = "selective", 0
    fit(model, WindowBatches(ids, 16, 4), cfg)
    assert {checkpointing_mode(b) for b in model.blocks} == {"none"}


def _one_line_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own errors (a value outside the choices) exit from inside
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("legolm: error:"), err
    return err[0]


def test_bad_value_and_pointless_combinations_are_one_line_errors(tmp_path: Path, shakespeare_text: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error(pretrain_args(tmp_path, "bad", "--run.activation-checkpointing", "full"), capsys)
    assert "none" in line and "selective" in line
    text = tmp_path / "text.txt"
    text.write_text(shakespeare_text[:5000])
    line = _one_line_error(["finetune", "--method", "skip2lora", "--model", "unused", "--data", str(text),
                            "--skip2lora.block-indices", "0", "--run.activation-checkpointing", "blocks",
                            "--run.out-dir", str(tmp_path / "s2l")], capsys)
    assert "Skip2-LoRA" in line and "--run.activation-checkpointing none" in line
    line = _one_line_error(["lct", "--config", "configs/lct-tiny.yaml", "--methods", "lct", "sequential",
                            "--run.activation-checkpointing", "selective", "--run.out-dir", str(tmp_path / "lct")],
                           capsys)
    assert "sequential" in line and "--run.activation-checkpointing none" in line
    assert not (tmp_path / "s2l").exists() and not (tmp_path / "lct").exists()


def test_fsdp2_one_rank_checkpointed_blocks_give_the_same_gradients(tmp_path: Path) -> None:
    """FSDP2 wraps the checkpointed blocks (its all-gathers outside the recomputed region), in this process."""
    import torch.distributed as dist

    from legolm.train.config import RunConfig
    from legolm.train.distributed import DistContext, Wrapped

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        grads = {}
        for mode in MODES:
            model = tiny("tiny-llama")
            wrapped = Wrapped(model, DistContext(strategy="fsdp2"), RunConfig(activation_checkpointing=mode,
                                                                              precision="fp32"))
            assert {checkpointing_mode(b) for b in wrapped.model.blocks} == {mode}
            idx, labels = batch()
            loss = wrapped.runner(lambda m, x, y: token_cross_entropy(m(x), y), idx, labels)
            loss.backward()
            grads[mode] = {n: p.grad.full_tensor().clone() for n, p in wrapped.model.named_parameters()}
            assert checkpointing_mode(model.blocks[0]) == "none"  # the caller's model is not the one sharded
        for mode in ("blocks", "selective"):
            for name, ref in grads["none"].items():
                torch.testing.assert_close(grads[mode][name], ref, rtol=1e-5, atol=1e-7, msg=f"{mode}: {name}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(os.environ.get("LEGOLM_COMPILE_TESTS") != "1",
                    reason="torch.compile on CPU takes about a minute per mode: set LEGOLM_COMPILE_TESTS=1")
@pytest.mark.parametrize("mode", ["blocks", "selective"])
def test_compiled_checkpointed_step_gives_the_eager_gradients(mode: str) -> None:
    """torch.compile traces the checkpointed blocks (a higher-order op; selective's policy in the partitioner)."""
    model = tiny("tiny-llama")
    ref_loss, ref = loss_and_grads(model, "none")
    compiled = torch.compile(next_token_loss)
    loss, grads = loss_and_grads(model, mode, compiled)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    for name in ref:  # inductor's fused kernels round differently from eager
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"{mode}: {name}")
