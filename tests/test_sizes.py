"""Absurd sizes are refused before anything big is allocated, and what is allocated follows what a run uses.

* RoPE tables grow with the positions a run reaches (not the config's context).
* A fresh model whose weights alone exceed the machine's memory is one `ConfigError`.
* Loaders (legolm, Hugging Face, GGUF) check the weights' shapes in the file headers against the
  config before any weight is read or dequantised.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import legolm
from legolm.checkpoints import gguf as gguf_io
from legolm.checkpoints import hf as hf_io
from legolm.checkpoints.gguf import _LAYER_KEYS, _TOP_KEYS
from legolm.checkpoints.native import export_hf, save_checkpoint
from legolm.core.config import MAX_BLOCK_SIZE, ModelConfig
from legolm.core.rope import rope_tables
from legolm.errors import CheckpointError, ConfigError, LegolmError
from legolm.generation import GenerationConfig, generate
from legolm.generation.decoder import DecodeSession
from legolm.model import transformer
from legolm.model.transformer import ROPE_MIN_ROWS, TransformerLM


def _llama(**overrides: object) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(ModelConfig.from_name("tiny-llama", **overrides))


# -- the 1B-class preset ---------------------------------------------------------------------------------
TINYLLAMA_PARAMS = 1_100_048_384  # TinyLlama-1.1B's published count (its Hugging Face checkpoint: 1.10 B)


def test_tinyllama_preset_has_the_real_models_parameters_without_allocating() -> None:
    """Built on the meta device (no weight allocated): TinyLlama-1.1B's count and shapes, as transformers builds it."""
    import transformers

    from legolm.checkpoints.hf import export_hf_state

    config = ModelConfig.from_name("tinyllama-1.1b")
    with torch.device("meta"):
        model = TransformerLM(config)
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters() == TINYLLAMA_PARAMS
    assert f"{model.num_parameters() / 1e9:.2f}" == "1.10"
    assert (config.n_layer, config.n_embd, config.n_head, config.kv_heads, config.intermediate_size,
            config.vocab_size, config.block_size, config.rope_base, config.tie_embeddings) == (
        22, 2048, 32, 4, 5632, 32000, 2048, 10000.0, False)
    hf_cfg, state = export_hf_state(config, model.state_dict())
    cfg = transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in hf.parameters()) == TINYLLAMA_PARAMS
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == hf_shapes  # every tensor, same name and shape
    assert hf_shapes["model.layers.0.self_attn.k_proj.weight"] == (256, 2048)  # 4 KV heads of 64


# -- RoPE tables ---------------------------------------------------------------------------------------
def test_rope_tables_follow_the_positions_used_not_the_context() -> None:
    model = _llama(block_size=MAX_BLOCK_SIZE)  # a 2**20-position context: full tables would be 128 MiB here
    assert model.rope.shape[1] == 0
    model(torch.zeros(1, 10, dtype=torch.long))
    assert model.rope.shape[1] == ROPE_MIN_ROWS
    model(torch.zeros(1, 300, dtype=torch.long))
    assert model.rope.shape[1] == 512  # the next power of two
    model.reserve_positions(100)  # never shrinks
    assert model.rope.shape[1] == 512 and model.rope.dtype == torch.float32
    assert torch.equal(model.rope, rope_tables(model.config.rotary_dim, 4096, model.config.rope_base)[:, :512])


def test_rope_tables_stop_at_the_context() -> None:
    model = _llama(block_size=100)
    model.reserve_positions(10_000)
    assert model.rope.shape[1] == 100


def test_grown_tables_give_the_logits_of_full_tables() -> None:
    small, big = _llama(), _llama(block_size=1 << 16)
    big.load_state_dict(small.state_dict())
    small.reserve_positions(small.config.block_size)  # the whole context, as before tables grew
    idx = torch.randint(0, 512, (2, 40))
    assert torch.equal(small(idx), big(idx)) and big.rope.shape[1] == ROPE_MIN_ROWS


def test_generation_on_a_long_context_model_builds_tables_for_its_cache_only() -> None:
    model = _llama(block_size=MAX_BLOCK_SIZE).eval()
    generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=5, greedy=True))
    assert 8 <= model.rope.shape[1] <= 256


def test_a_decode_session_reserves_its_cache_length() -> None:
    """Fused steps read ``model.rope`` directly (and CUDA graphs capture it): the session covers its cache first."""
    model = _llama(block_size=4096).eval()
    DecodeSession(model, batch=1, max_len=300, greedy=True, eos_id=None)
    assert model.rope.shape[1] >= 300


def test_a_replaced_table_stays_alive() -> None:
    """CUDA graphs captured with the old table keep its address: it must not be freed."""
    model = _llama()
    model.reserve_positions(10)
    old = model.rope
    model.reserve_positions(100)
    assert model.rope is not old and any(t is old for t in model._retired_rope)


# -- a fresh model's weights against the memory ------------------------------------------------------
def test_weights_beyond_the_memory_are_refused_before_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transformer, "memory_bytes", lambda device: 100_000)  # 100 kB of "memory"
    with pytest.raises(ConfigError, match=r"parameters need .* more than the 0.0 GB of memory"):
        _llama()
    with torch.device("meta"):  # loaders build on the meta device: not checked, nothing allocated
        TransformerLM(ModelConfig.from_name("tiny-llama"))


def test_a_config_of_terabytes_is_one_line_in_seconds() -> None:
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="parameters need"):
        TransformerLM(ModelConfig.from_name("tiny-llama", vocab_size=1 << 24, n_embd=1 << 16, n_head=16,
                                            n_kv_head=16, intermediate_size=1 << 16))
    assert time.perf_counter() - t0 < 10


# -- loaders: shapes before reads ---------------------------------------------------------------------
def _no_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a weight was read before the shapes were checked")
    monkeypatch.setattr(hf_io, "load_file", refuse, raising=False)
    monkeypatch.setattr("safetensors.torch.load_file", refuse)
    monkeypatch.setattr(gguf_io, "_tensor", refuse)


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_legolm_checkpoint_shapes_are_checked_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = save_checkpoint(_llama(), tmp_path / "m")
    _edit_json(ckpt / "legolm.json", n_embd=128, n_head=8, n_kv_head=4)
    _no_reads(monkeypatch)
    with pytest.raises(CheckpointError, match=r"tensor wte.weight has shape \(512, 64\) but legolm.json implies "
                                              r"\(512, 128\)"):
        legolm.load_pretrained(ckpt)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_hf_shapes_are_checked_before_reading(weights: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = export_hf(TransformerLM(ModelConfig.from_name("tiny-pythia")), tmp_path / "hf")
    if weights == "bin":
        torch.save(load_file(str(out / "model.safetensors")), out / "pytorch_model.bin")
        (out / "model.safetensors").unlink()
    _edit_json(out / "config.json", num_attention_heads=2, hidden_size=32)  # qkv rows no longer split in heads
    _no_reads(monkeypatch)
    monkeypatch.setattr(hf_io, "read_weights", lambda d: pytest.fail("weights read before the shape check"))
    with pytest.raises(CheckpointError, match="does not fit a gpt_neox model of n_head=2"):
        legolm.load_pretrained(out)


def test_hf_sizes_that_disagree_with_the_weights_are_one_line(tmp_path: Path) -> None:
    out = export_hf(_llama(), tmp_path / "hf")
    _edit_json(out / "config.json", num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    with pytest.raises(CheckpointError, match=r"q_proj.weight has shape \(64, 64\) but config.json implies"):
        legolm.load_pretrained(out)


def write_llama_gguf(path: Path, model: TransformerLM, tokenizer: legolm.Tokenizer | None = None,
                     **fields: int) -> Path:
    """``model`` (a Llama stack) as a float32 GGUF file, with ``tokenizer`` (a byte-level BPE) as its vocabulary;
    ``fields`` override its metadata sizes."""
    import gguf

    c = model.config
    sizes = dict(block_count=c.n_layer, context_length=c.block_size, embedding_length=c.n_embd,
                 feed_forward_length=c.intermediate_size, head_count=c.n_head, head_count_kv=c.kv_heads,
                 vocab_size=c.vocab_size)
    sizes.update(fields)
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, value in sizes.items():
        getattr(writer, f"add_{name}")(value)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    if tokenizer is not None:
        bpe = json.loads(tokenizer.backend.to_str())["model"]
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(sorted(bpe["vocab"], key=bpe["vocab"].get))
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
        if tokenizer.eos_id is not None:
            writer.add_eos_token_id(tokenizer.eos_id)
    names = {ours: theirs for theirs, ours in _TOP_KEYS.items()}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_embeddings:
            continue
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            name = f"blk.{i}." + next(g for g, ours in _LAYER_KEYS.items() if ours == rest)
        else:
            name = names[key]
        writer.add_tensor(name, tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_shapes_are_checked_before_dequantising(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_llama_gguf(tmp_path / "m.gguf", _llama(), embedding_length=128)
    _no_reads(monkeypatch)
    with pytest.raises(CheckpointError, match=r"wte.weight has shape \(512, 64\) but the GGUF metadata implies "
                                              r"\(512, 128\)"):
        legolm.load_pretrained(path)


def test_gguf_head_counts_that_cannot_split_the_rows_are_one_line(tmp_path: Path) -> None:
    path = write_llama_gguf(tmp_path / "m.gguf", _llama(), head_count=3, head_count_kv=1)  # 64 q rows: 3 x pairs?
    with pytest.raises(CheckpointError, match="which 3 heads cannot split into rotary pairs"):
        legolm.load_pretrained(path)


def test_gguf_of_too_many_layers_is_refused_by_its_metadata(tmp_path: Path) -> None:
    path = write_llama_gguf(tmp_path / "m.gguf", _llama(), block_count=100_000)
    with pytest.raises(ConfigError, match="100,000 layers exceed the limit"):
        legolm.load_pretrained(path)


@pytest.mark.parametrize(("fields", "match"), [({"head_count": 0}, "llama.attention.head_count is 0"),
                                               ({"head_count_kv": 0}, "n_kv_head must be in"),
                                               ({"embedding_length": 0}, "n_embd must be in")])
def test_gguf_zero_sizes_are_one_line(tmp_path: Path, fields: dict[str, int], match: str) -> None:
    path = write_llama_gguf(tmp_path / "m.gguf", _llama(), **fields)
    with pytest.raises(LegolmError, match=match):
        legolm.load_pretrained(path)
