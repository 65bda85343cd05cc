"""legolm LoRA against peft on tiny random Hugging Face GPT-2, Llama (GQA) and GPT-NeoX models, CPU, fp32.

* adapters saved by legolm load with `peft.PeftModel.from_pretrained` and give the same logits;
* adapters saved by peft load with `legolm.adapters.load_adapter` and give the same logits;
* target matching picks exactly the modules peft picks, for the same `target_modules`;
* the trainable-parameter count of GPT-2 124M with r=8 on c_attn,c_proj is peft's;
* adapters for another architecture or of other shapes are refused, leaving the model untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from tiny_hf import VOCAB, make_hf

import legolm
from legolm.adapters import LoRAConfig, adapter_layers, adapter_parameters, inject_lora, load_adapter, save_adapter
from legolm.adapters.inject import hf_family, hf_module_names
from legolm.errors import CheckpointError

TOL = 1e-4

# (HF kind, target_modules, extra LoraConfig settings): every family and the peft options legolm supports.
CASES: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "gpt2": ("gpt2", ["c_attn", "c_proj"], {}),
    "gpt2-all-bias-saved-norm": ("gpt2", ["c_fc"], {"bias": "all", "modules_to_save": ["ln_f"], "use_rslora": True}),
    "llama-gqa-patterns": ("llama-tied", ["q_proj", "v_proj", "down_proj"],
                           {"rank_pattern": {"v_proj": 3}, "alpha_pattern": {"down_proj": 5.0}}),
    "llama-untied-all-linear": ("llama-untied", "all-linear", {"lora_dropout": 0.1}),
    "neox-qkv-lora-only-bias": ("neox", ["query_key_value", "dense_4h_to_h"], {"bias": "lora_only"}),
}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for kind in {c[0] for c in CASES.values()}:
        d = tmp_path_factory.mktemp(kind)
        make_hf(kind).save_pretrained(d)
        dirs[kind] = d
    return dirs


@torch.no_grad()
def _perturb_trainable(params: list[torch.nn.Parameter], seed: int) -> None:
    """Random adapter weights (B != 0) and shifted biases / norms, so every saved tensor matters."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _legolm_config(targets: Any, extra: dict[str, Any]) -> LoRAConfig:
    extra = dict(extra)
    dropout = extra.pop("lora_dropout", 0.0)
    if isinstance(targets, str) and targets != "all-linear":
        return LoRAConfig(r=4, alpha=7.0, dropout=dropout, target_regex=targets, **extra)
    return LoRAConfig(r=4, alpha=7.0, dropout=dropout, target_modules=[targets] if isinstance(targets, str)
                      else targets, **extra)


@pytest.mark.parametrize("case", list(CASES))
def test_legolm_adapter_loads_in_peft(case: str, hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    kind, targets, extra = CASES[case]
    ours = legolm.load_pretrained(hf_dirs[kind])
    base_logits = ours(_ids()).detach()
    cfg = _legolm_config(targets, extra)
    inject_lora(ours, cfg)
    _perturb_trainable([p for p in ours.parameters() if p.requires_grad], seed=1)
    save_adapter(ours, tmp_path / "adapter", cfg)
    ours.eval()
    theirs = peft.PeftModel.from_pretrained(make_hf(kind), tmp_path / "adapter").eval()
    with torch.no_grad():
        ours_logits, peft_logits = ours(_ids()), theirs(_ids()).logits
    assert (ours_logits - base_logits).abs().max() > 0.1  # the adapter does change the model
    torch.testing.assert_close(ours_logits, peft_logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_legolm(case: str, hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    kind, targets, extra = CASES[case]
    theirs = peft.get_peft_model(make_hf(kind), peft.LoraConfig(r=4, lora_alpha=7, target_modules=targets, **extra))
    _perturb_trainable([p for p in theirs.parameters() if p.requires_grad], seed=2)
    theirs.save_pretrained(tmp_path / "adapter")
    theirs.eval()
    ours = legolm.load_pretrained(hf_dirs[kind])
    base_logits = ours(_ids()).detach()
    cfg = load_adapter(ours, tmp_path / "adapter")
    with torch.no_grad():
        ours_logits, peft_logits = ours(_ids()), theirs(_ids()).logits
    assert (ours_logits - base_logits).abs().max() > 0.1
    torch.testing.assert_close(ours_logits, peft_logits, atol=TOL, rtol=0)
    assert cfg.r == 4 and cfg.alpha == 7.0


# -- target matching -----------------------------------------------------------------------------
TARGETS = {
    "gpt2": [["c_proj"], ["c_attn", "c_fc"], "all-linear", r".*\.h\.1\..*c_.*", ["lm_head"],
             ["transformer.h.0.mlp.c_fc"]],
    "llama-tied": [["q_proj", "v_proj"], "all-linear", r".*layers\.0\.self_attn\.(k|o)_proj", ["mlp.up_proj"]],
    "neox": [["query_key_value"], ["dense"], "all-linear", ["attention.dense", "dense_h_to_4h"]],
}


@pytest.mark.parametrize("kind", list(TARGETS))
def test_targets_match_what_peft_matches(kind: str, hf_dirs: dict[str, Path]) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for targets in TARGETS[kind]:
        theirs = peft.get_peft_model(make_hf(kind), peft.LoraConfig(r=4, lora_alpha=7, target_modules=targets))
        peft_names = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                      if isinstance(m, BaseTunerLayer)}
        ours = legolm.load_pretrained(hf_dirs[kind])
        inject_lora(ours, _legolm_config(targets, {}))
        family = hf_family(ours.config)
        ours_names = {hf_module_names(n, family)[0] for n in adapter_layers(ours)}
        assert ours_names == peft_names, targets
        n_ours = sum(p.numel() for p in adapter_parameters(ours))
        assert n_ours == theirs.get_nb_trainable_parameters()[0], targets


def test_gpt2_124m_trainable_count_is_peft_s() -> None:
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
        ours = legolm.TransformerLM(legolm.ModelConfig.from_name("gpt2"))
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=8, target_modules=["c_attn", "c_proj"]))
    inject_lora(ours, LoRAConfig(r=8, target_modules=["c_attn", "c_proj"]))
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    total = sum(p.numel() for p in {id(p): p for p in ours.parameters()}.values())
    assert (trainable, total) == theirs.get_nb_trainable_parameters() == (811_008, 125_250_816)


# -- refusals ------------------------------------------------------------------------------------
def _peft_adapter(kind: str, targets: list[str], directory: Path) -> Path:
    theirs = peft.get_peft_model(make_hf(kind), peft.LoraConfig(r=4, target_modules=targets))
    theirs.save_pretrained(directory)
    return directory


def test_adapter_of_another_architecture_is_refused(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    adapter = _peft_adapter("gpt2", ["c_attn"], tmp_path / "gpt2-adapter")
    ours = legolm.load_pretrained(hf_dirs["llama-tied"])
    with pytest.raises(CheckpointError, match="does not fit this") as err:
        load_adapter(ours, adapter)
    assert "\n" not in str(err.value)
    assert not adapter_layers(ours)


def test_adapter_of_other_shapes_is_refused_and_model_left_alone(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    adapter = _peft_adapter("llama-tied", ["down_proj", "q_proj"], tmp_path / "llama-adapter")
    ours = legolm.load_pretrained(hf_dirs["llama-tied"])
    other = legolm.TransformerLM(legolm.ModelConfig.from_name("tiny-llama"))  # intermediate 128, adapter has 96
    x = _ids()
    before = other(x).detach()
    with pytest.raises(CheckpointError, match=r"has shape \(4, 96\) but this model needs \(4, 128\)"):
        load_adapter(other, adapter)
    assert not adapter_layers(other) and all(p.requires_grad for p in other.parameters())
    torch.testing.assert_close(other(x), before, atol=0, rtol=0)
    load_adapter(ours, adapter)  # the right model takes it
    assert len(adapter_layers(ours)) == 4


def test_not_an_adapter_and_unsupported_options_are_refused(tmp_path: Path) -> None:
    model = legolm.TransformerLM(legolm.ModelConfig.from_name("tiny-gpt2"))
    with pytest.raises(CheckpointError, match=r"no adapter_config\.json"):
        load_adapter(model, tmp_path)
    theirs = peft.get_peft_model(make_hf("gpt2"), peft.LoraConfig(r=4, target_modules=["c_attn"], use_dora=True))
    theirs.save_pretrained(tmp_path / "dora")
    with pytest.raises(CheckpointError, match=r"uses peft option\(s\) \['use_dora'\]"):
        load_adapter(model, tmp_path / "dora")
