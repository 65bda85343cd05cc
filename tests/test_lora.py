"""LoRA layer values, injection by target, trainable parameters, merging and the trainable report.

Parity of saved adapters and of target matching with peft is in test_peft_parity.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import legolm
from legolm.adapters import (
    AdapterLayer,
    LoRAConfig,
    LoRALinear,
    adapter_layers,
    adapter_parameters,
    inject_lora,
    merge_adapters,
    merge_and_unload,
    trainable_report,
    unmerge_adapters,
)
from legolm.errors import ConfigError, LegolmError
from legolm.utils.params import trainable_parameters


def _tiny(preset: str = "tiny-gpt2", seed: int = 0) -> legolm.TransformerLM:
    torch.manual_seed(seed)
    return legolm.TransformerLM(legolm.ModelConfig.from_name(preset)).eval()


def _randomize_adapters(model: nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _ids(seed: int = 0, shape: tuple[int, int] = (2, 16), vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# -- the layer -----------------------------------------------------------------------------------
def _hand_layer(r: int = 1, alpha: float = 2.0, use_rslora: bool = False) -> LoRALinear:
    base = nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    return LoRALinear(base, r=r, alpha=alpha, use_rslora=use_rslora)


def test_lora_linear_hand_values() -> None:
    layer = _hand_layer()
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, -1.0]]))
        layer.lora_B.copy_(torch.tensor([[2.0], [0.5]]))
    # W0 x + b = [4.5, 9.5]; A x = 1; s = alpha/r = 2; s·B A x = [4, 1]
    y = layer(torch.tensor([[2.0, 1.0]]))
    assert torch.equal(y, torch.tensor([[8.5, 10.5]]))
    assert layer.base_layer.weight.requires_grad is False and layer.lora_A.requires_grad


def test_scaling_plain_and_rslora() -> None:
    assert _hand_layer(r=1, alpha=2.0).scaling == 2.0
    base = nn.Linear(4, 4)
    assert LoRALinear(base, r=4, alpha=8.0).scaling == 2.0  # alpha / r
    assert LoRALinear(nn.Linear(4, 4), r=4, alpha=8.0, use_rslora=True).scaling == 4.0  # alpha / sqrt(r)


def test_init_is_a_no_op_with_kaiming_uniform_a() -> None:
    torch.manual_seed(0)
    base = nn.Linear(1024, 48)
    layer = LoRALinear(base, r=8, alpha=16.0)
    bound = 1 / math.sqrt(1024)  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Linear / peft
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.99 * bound
    assert layer.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(3, 1024)
    assert torch.equal(layer(x), base(x))


def test_dropout_only_in_training() -> None:
    layer = LoRALinear(nn.Linear(16, 16), r=4, alpha=4.0, dropout=0.5)
    _randomize_adapters(layer)
    x = torch.randn(8, 16)
    layer.train()
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_merge_unmerge_exact() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 24), r=4, alpha=8.0)
    _randomize_adapters(layer)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 32)
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0 + 2.0 * layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)


# -- injection -----------------------------------------------------------------------------------
def _targets(**cfg: object) -> list[str]:
    return inject_lora(_tiny(), LoRAConfig(**cfg))  # type: ignore[arg-type]


def test_c_proj_matches_attention_and_mlp_projections() -> None:
    assert _targets(target_modules=["c_proj"]) == [
        "blocks.0.attn.proj", "blocks.0.mlp.proj", "blocks.1.attn.proj", "blocks.1.mlp.proj"]


def test_targets_by_legolm_name_hf_name_suffix_and_regex() -> None:
    assert _targets(target_modules=["blocks.0.attn.qkv"]) == ["blocks.0.attn.qkv"]
    assert _targets(target_modules=["transformer.h.1.mlp.c_fc"]) == ["blocks.1.mlp.fc"]
    assert _targets(target_modules=["fc"]) == ["blocks.0.mlp.fc", "blocks.1.mlp.fc"]
    assert _targets(target_regex=r".*\.h\.0\..*c_proj") == ["blocks.0.attn.proj", "blocks.0.mlp.proj"]
    assert _targets(target_regex=r"blocks\.1\.attn\..*") == ["blocks.1.attn.qkv", "blocks.1.attn.proj"]


def test_all_linear_skips_the_head_which_needs_asking() -> None:
    names = _targets(target_modules=["all-linear"])
    assert len(names) == 8 and "lm_head" not in names
    assert _targets(target_modules=["lm_head"]) == ["lm_head"]


def test_llama_split_projections_and_patterns() -> None:
    model = _tiny("tiny-llama")
    cfg = LoRAConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.mlp\.down_proj": 3.0})
    names = inject_lora(model, cfg)
    assert names == [f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.qkv.q_proj", "attn.qkv.v_proj", "mlp.down")]
    layers = adapter_layers(model)
    assert [layers[n].r for n in names] == [4, 2, 4, 4, 2, 4]  # type: ignore[attr-defined]
    assert [layers[n].alpha for n in names] == [8.0, 8.0, 8.0, 8.0, 8.0, 3.0]  # type: ignore[attr-defined]
    assert layers["blocks.0.attn.qkv.v_proj"].lora_B.shape == (2 * 16, 2)  # type: ignore[union-attr]


def _trainable_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in trainable_parameters(model)}


def test_only_adapters_train_by_default() -> None:
    model = _tiny()
    inject_lora(model, LoRAConfig(target_modules=["c_attn"]))
    assert _trainable_ids(model) == {id(p) for p in adapter_parameters(model)}
    assert len(adapter_parameters(model)) == 4  # A and B of two layers
    assert all(isinstance(m, AdapterLayer) for m in adapter_layers(model).values())


def test_bias_modes_and_modules_to_save() -> None:
    model = _tiny()
    inject_lora(model, LoRAConfig(target_modules=["c_attn"], bias="lora_only"))
    qkv_biases = {id(model.blocks[i].attn.qkv.base_layer.bias) for i in (0, 1)}
    assert _trainable_ids(model) == {id(p) for p in adapter_parameters(model)} | qkv_biases

    model = _tiny()
    inject_lora(model, LoRAConfig(target_modules=["c_attn"], bias="all", modules_to_save=["ln_f"]))
    biases = {id(m.bias) for m in model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}
    assert len(biases) == 2 * 6 + 1  # per block: 2 norms + qkv, proj, fc, proj; plus the final norm
    assert _trainable_ids(model) == {id(p) for p in adapter_parameters(model)} | biases | {id(model.norm.weight)}


def test_bad_settings_are_one_line_config_errors() -> None:
    bad: list[tuple[dict[str, object], str]] = [
        (dict(target_modules=["c_atn"]), "closest module names: c_attn"),
        (dict(target_modules=["c_attn", "q_prj"]), "'q_prj' matches no linear layer"),
        (dict(target_regex=r"blocks\.9\..*"), "target_regex"),
        (dict(target_modules=[]), "no targets"),
        (dict(target_modules=["c_attn"], r=0), "rank r must be a positive integer"),
        (dict(target_modules=["c_attn"], alpha=0.0), "alpha must be > 0"),
        (dict(target_modules=["c_attn"], dropout=1.0), "dropout must be in [0, 1)"),
        (dict(target_modules=["c_attn"], dropout=-0.1), "dropout must be in [0, 1)"),
        (dict(target_modules=["c_attn"], rank_pattern={"c_attn": -2}), "rank_pattern"),
        (dict(target_modules=["c_attn"], target_regex="(unclosed"), "not a valid regular expression"),
        (dict(target_modules=["c_attn"], modules_to_save=["c_attn"]), "both a LoRA target and in modules_to_save"),
        (dict(target_modules=["c_attn"], modules_to_save=["ln_g"]), "closest module names: ln_f"),
    ]
    for cfg, message in bad:
        with pytest.raises(ConfigError, match=None) as err:
            _targets(**cfg)
        assert message in str(err.value) and "\n" not in str(err.value), (cfg, str(err.value))
    model = _tiny()
    inject_lora(model, LoRAConfig(target_modules=["c_attn"]))
    with pytest.raises(LegolmError, match="already holds adapters"):
        inject_lora(model, LoRAConfig(target_modules=["c_fc"]))


# -- merging and export --------------------------------------------------------------------------
def test_merge_and_unload_gives_a_plain_model_that_exports(tmp_path: Path) -> None:
    model = _tiny()
    inject_lora(model, LoRAConfig(r=4, alpha=8.0, target_modules=["c_attn", "c_proj", "c_fc"]))
    _randomize_adapters(model, scale=0.5)
    x = _ids()
    with torch.no_grad():
        adapted = model(x)
        merge_adapters(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-4, rtol=0)
        unmerge_adapters(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-4, rtol=0)
        plain = merge_and_unload(model)
    assert plain is model and not adapter_layers(plain)
    assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())
    assert all(p.requires_grad for p in plain.parameters())
    legolm.save_checkpoint(plain, tmp_path / "ckpt")
    legolm.export_hf(plain, tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(legolm.load_pretrained(tmp_path / "ckpt")(x), adapted, atol=1e-4, rtol=0)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(hf(x).logits, adapted, atol=1e-4, rtol=0)


def test_tied_head_adapter_refuses_to_merge() -> None:
    model = _tiny()
    inject_lora(model, LoRAConfig(target_modules=["lm_head"]))
    with pytest.raises(LegolmError, match="tied embeddings"):
        merge_and_unload(model)


# -- training on real text -----------------------------------------------------------------------
def test_lora_training_moves_only_adapters(shakespeare_text: str, gpt2_tokenizer_dir: Path) -> None:
    tok = legolm.Tokenizer.from_dir(gpt2_tokenizer_dir)
    ids = torch.tensor(tok.encode(shakespeare_text[:20_000]), dtype=torch.long)
    ids = ids % 512  # the tiny model's vocabulary
    model = _tiny().train()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, LoRAConfig(r=8, alpha=16.0, target_modules=["c_attn", "c_proj"]))
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    batch = ids[: 8 * 65].view(8, 65)
    losses = []
    for _ in range(20):
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    for key, value in merge_and_unload(model).state_dict().items():
        changed = not torch.equal(value, frozen[key])
        assert changed == key.endswith(("attn.qkv.weight", "attn.proj.weight", "mlp.proj.weight")), key


# -- report --------------------------------------------------------------------------------------
def test_report_for_gpt2_124m_matches_peft_figures() -> None:
    with torch.device("meta"):
        model = legolm.TransformerLM(legolm.ModelConfig.from_name("gpt2"))
    inject_lora(model, LoRAConfig(r=8, target_modules=["c_attn", "c_proj"]))
    report = trainable_report(model)
    assert (report.trainable, report.base, report.total) == (811_008, 124_439_808, 125_250_816)
    text = report.format()
    assert "trainable params: 811,008 || all params: 125,250,816 || trainable%: 0.6475" in text
    assert "base model params: 124,439,808 (trainable = 0.65% of it)" in text
    assert "blocks.*.attn.proj (transformer.h.*.attn.c_proj)" in text
    assert "blocks.*.mlp.proj (transformer.h.*.mlp.c_proj)" in text
    assert len(report.rows) == 36 and report.rows[2].shape_a == (8, 3072) and report.rows[2].shape_b == (768, 8)


def test_half_precision_base_keeps_fp32_adapters() -> None:
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8.0)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32  # as peft's autocast_adapter_dtype
    _randomize_adapters(layer)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = base(x).float() + 2.0 * (x.float() @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.02)
