"""legolm against Hugging Face transformers on tiny random GPT-2, GPT-NeoX and Llama models.

Covers: logits parity after `load_pretrained(dir)`, greedy generation (one prompt and a
left-padded batch) against `generate`, KV-cached decoding against full recomputation, export to
a transformers-loadable directory, the native checkpoint round trip and pytorch_model.bin loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from tiny_hf import BOS, EOS, KINDS, PAD, VOCAB, make_hf, randomize_

import legolm
from legolm.errors import CheckpointError, LegolmError
from legolm.generation import GenerationConfig, generate

N_NEW = 12
TOL = 1e-4


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory) -> tuple[str, transformers.PreTrainedModel, legolm.TransformerLM, Path]:
    """(kind, HF model, legolm model loaded from the HF directory, that directory)."""
    kind = request.param
    d = tmp_path_factory.mktemp(kind)
    hf = make_hf(kind, seed=KINDS.index(kind))
    hf.save_pretrained(d)
    model = legolm.load_pretrained(d)
    return kind, hf, model, d


def _batch(seed: int = 0, shape: tuple[int, int] = (2, 24)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, shape, generator=g)  # avoid pad/bos/eos ids in prompts


def _hf_logits(hf: transformers.PreTrainedModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(x).logits


def _ours_logits(model: legolm.TransformerLM, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _hf_greedy(hf: transformers.PreTrainedModel, prompts: list[list[int]]) -> list[list[int]]:
    """HF greedy continuation, prompts left-padded with PAD and masked out."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW,
                          min_new_tokens=N_NEW, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
                          num_beams=1)
    return out[:, P:].tolist()


def _ours_greedy(model: legolm.TransformerLM, prompts: list[list[int]]) -> list[list[int]]:
    cfg = GenerationConfig(greedy=True, max_new_tokens=N_NEW, stop_at_eos=False)
    return generate(model, prompts, cfg, eos_id=EOS).tokens


# -- loading ---------------------------------------------------------------------------------------
def test_config_translated(pair) -> None:
    kind, hf, model, _ = pair
    c, h = model.config, hf.config
    assert c.vocab_size == VOCAB and c.n_layer == 2 and c.n_embd == 64 and c.n_head == 4
    assert (c.bos_token_id, c.eos_token_id) == (BOS, EOS)
    assert c.tie_embeddings == h.tie_word_embeddings
    assert (model.lm_head.weight is model.wte.weight) == h.tie_word_embeddings
    if kind.startswith("llama"):
        assert c.n_kv_head == 2 and c.rope_base == 1000.0 and c.rotary_dim == 16
    if kind == "neox":
        assert c.rotary_pct == 0.25 and c.rotary_dim == 4 and c.rope_base == 10000.0
    if kind == "neox-rope-params":
        assert c.rotary_pct == 0.5 and c.rotary_dim == 8 and c.rope_base == 500.0
    if kind.startswith("gpt2"):
        assert c.positions == "learned" and c.rotary_dim == 0


def test_logits_match(pair) -> None:
    _, hf, model, _ = pair
    x = _batch()
    ref, ours = _hf_logits(hf, x), _ours_logits(model, x)
    assert ours.shape == ref.shape == (2, 24, VOCAB)
    assert ref.std() > 0.5, "test model too close to zero to detect anything"
    assert (ours - ref).abs().max().item() <= TOL


def test_logits_match_after_a_bf16_round_trip(pair) -> None:
    """A model cast to bf16 and back equals HF holding the same bf16-rounded weights: the RoPE tables
    stay fp32 through casts (bf16 tables cost 3e-3 of the logits of the real SmolLM2-135M)."""
    import copy

    _, hf, model, _ = pair
    hf, model = copy.deepcopy(hf), copy.deepcopy(model)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.to(torch.bfloat16)
    assert model.rope.dtype == torch.float32
    x = _batch()
    assert (_ours_logits(model.float(), x) - _hf_logits(hf, x)).abs().max().item() <= TOL


def test_greedy_single_prompt_matches_hf(pair) -> None:
    _, hf, model, _ = pair
    prompt = _batch(1, (1, 9))[0].tolist()
    ours = _ours_greedy(model, [prompt])
    assert ours == _hf_greedy(hf, [prompt])
    assert len(ours[0]) == N_NEW


def test_greedy_batch_left_padded_matches_hf(pair) -> None:
    _, hf, model, _ = pair
    long, short = _batch(2, (1, 11))[0].tolist(), _batch(3, (1, 4))[0].tolist()
    ours = _ours_greedy(model, [long, short])
    assert ours == _hf_greedy(hf, [long, short])
    # Padding must not change a row: each row equals its prompt decoded alone.
    assert ours == [_ours_greedy(model, [long])[0], _ours_greedy(model, [short])[0]]


def test_kv_cache_decoding_equals_full_recompute(pair) -> None:
    _, _, model, _ = pair
    prompt = _batch(4, (1, 7))[0].tolist()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(N_NEW):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert _ours_greedy(model, [prompt])[0] == seq[len(prompt):]


def test_cached_prefill_logits_equal_uncached(pair) -> None:
    """Decoding through the KV cache gives the logits of the full forward at every step."""
    _, _, model, _ = pair
    x = _batch(5, (2, 10))
    full = _ours_logits(model, x)
    cache = legolm.KVCache(model.config, 2, 10)
    with torch.no_grad():
        first = model(x[:, :6], cache=cache, input_pos=torch.arange(6))
        steps = [model(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])) for t in range(6, 10)]
    got = torch.cat([first, *steps], dim=1)
    assert (got - full).abs().max().item() <= 1e-5


# -- export and round trips ---------------------------------------------------------------------
def test_export_hf_round_trip(pair, tmp_path) -> None:
    _, hf, model, _ = pair
    out = legolm.export_hf(model, tmp_path / "exported")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == type(hf).__name__
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    x = _batch(6)
    assert (_hf_logits(back, x) - _ours_logits(model, x)).abs().max().item() <= TOL
    # legolm reads its own export back to the same config.
    again = legolm.load_pretrained(out)
    assert {k: v for k, v in again.config.to_dict().items() if k != "name"} == \
        {k: v for k, v in model.config.to_dict().items() if k != "name"}


def test_native_checkpoint_round_trip(pair, tmp_path) -> None:
    _, _, model, _ = pair
    out = legolm.save_checkpoint(model, tmp_path / "native")
    assert (out / "legolm.json").is_file() and (out / "model.safetensors").is_file()
    back = legolm.load_pretrained(out)
    assert back.config == model.config
    assert (back.lm_head.weight is back.wte.weight) == model.config.tie_embeddings
    x = _batch(7)
    assert torch.equal(_ours_logits(back, x), _ours_logits(model, x))


def test_save_checkpoint_refuses_existing_dir(pair, tmp_path) -> None:
    _, _, model, _ = pair
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(LegolmError, match="already exists"):
        legolm.save_checkpoint(model, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temp dir left behind
    legolm.save_checkpoint(model, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "legolm.json").is_file()


def test_pytorch_model_bin_loads(pair, tmp_path) -> None:
    """A directory with only pytorch_model.bin (torch.save of the HF state dict) loads via weights_only."""
    _, hf, _, _ = pair
    d = tmp_path / "bin"
    d.mkdir()
    hf.config.save_pretrained(d)
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    assert not list(d.glob("*.safetensors"))
    loaded = legolm.load_pretrained(d)
    x = _batch(8)
    assert (_ours_logits(loaded, x) - _hf_logits(hf, x)).abs().max().item() <= TOL


# -- exports of models built by legolm (not converted from HF) ----------------------------------
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-pythia", "tiny-llama"])
@pytest.mark.parametrize("tie", [True, False])
def test_export_of_legolm_preset_loads_in_transformers(preset, tie, tmp_path) -> None:
    torch.manual_seed(0)
    model = legolm.TransformerLM(legolm.ModelConfig.from_name(preset, tie_embeddings=tie)).eval()
    randomize_(model, seed=1, eos_row=None)
    legolm.export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.num_parameters() == model.num_parameters()
    x = torch.randint(0, model.config.vocab_size, (2, 20))
    ours = _ours_logits(model, x)
    assert ours.std() > 0.5
    assert (_hf_logits(hf, x) - ours).abs().max().item() <= TOL


def test_neox_transformers4_style_config_json(tmp_path) -> None:
    """A config.json written by transformers 4.x (rotary_pct / rotary_emb_base, no rope_parameters)."""
    hf = make_hf("neox-rope-params")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = legolm.load_pretrained(tmp_path)
    assert (model.config.rotary_pct, model.config.rope_base) == (0.5, 500.0)
    x = _batch(9)
    assert (_ours_logits(model, x) - _hf_logits(hf, x)).abs().max().item() <= TOL


# -- broken pytorch_model.bin files -------------------------------------------------------------
class _NotATensor:
    pass


def _gpt2_bin_dir(tmp_path: Path) -> tuple[transformers.PreTrainedModel, Path]:
    hf = make_hf("gpt2")
    d = tmp_path / "bin"
    d.mkdir()
    hf.config.save_pretrained(d)
    return hf, d


def test_pytorch_model_bin_with_arbitrary_pickle_is_refused(tmp_path) -> None:
    """weights_only=True loading refuses a pickled object; the user gets a CheckpointError."""
    _, d = _gpt2_bin_dir(tmp_path)
    torch.save({"transformer.wte.weight": _NotATensor()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        legolm.load_pretrained(d)


def test_truncated_pytorch_model_bin_is_checkpoint_error(tmp_path) -> None:
    hf, d = _gpt2_bin_dir(tmp_path)
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        legolm.load_pretrained(d)
