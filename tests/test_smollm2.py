"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the shared data) against transformers' own GGUF loader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import legolm
from legolm.generation import GenerationConfig, generate, generate_text

pytestmark = pytest.mark.slow

N_TOKENS = 4096


@pytest.fixture(scope="module")
def loaded(smollm2_gguf: Path) -> tuple[legolm.TransformerLM, legolm.Tokenizer]:
    return legolm.load(smollm2_gguf)


@pytest.fixture(scope="module")
def model(loaded: tuple[legolm.TransformerLM, legolm.Tokenizer]) -> legolm.TransformerLM:
    return loaded[0]


@pytest.fixture(scope="module")
def tokenizer(loaded: tuple[legolm.TransformerLM, legolm.Tokenizer]) -> legolm.Tokenizer:
    return loaded[1]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp of the mean next-token cross-entropy; logits (1, T, V), ids (1, T)."""
    return math.exp(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item())


def test_config_is_smollm2_135m(model: legolm.TransformerLM) -> None:
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_embeddings and model.lm_head.weight is model.wte.weight
    assert model.num_parameters() == 134_515_008  # the same count as the smollm2-135m preset
    assert not model.training and model.wte.weight.dtype == torch.float32


def test_tokenizer_matches_transformers(tokenizer: legolm.Tokenizer, hf_tokenizer, shakespeare_text: str) -> None:
    ours = tokenizer.encode(shakespeare_text)
    theirs = hf_tokenizer(shakespeare_text)["input_ids"]
    assert len(ours) > N_TOKENS
    assert ours == theirs
    assert (tokenizer.bos_id, tokenizer.eos_id) == (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id)
    sample = shakespeare_text[:2000]
    assert tokenizer.decode(tokenizer.encode(sample)) == sample
    # SmolLM splits digits one by one, like transformers does.
    assert tokenizer.encode("in 1234 years") == hf_tokenizer("in 1234 years")["input_ids"]


def test_perplexity_matches_transformers(model: legolm.TransformerLM, tokenizer: legolm.Tokenizer,
                                         smollm2_gguf: Path, shakespeare_text: str) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([tokenizer.encode(shakespeare_text)[:N_TOKENS]])
    assert ids.shape == (1, N_TOKENS)
    with torch.inference_mode():
        ours_logits = model(ids)
        ours = _ppl(ours_logits, ids)
        ours_last = ours_logits[0, -64:].clone()
        del ours_logits
    hf = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                              dtype=torch.float32).eval()
    with torch.inference_mode():
        hf_logits = hf(ids).logits
        theirs = _ppl(hf_logits, ids)
        hf_last = hf_logits[0, -64:].clone()
        del hf_logits
    assert 5.0 < theirs < 200.0, f"transformers' perplexity {theirs:.2f} is implausible for English text"
    assert abs(ours - theirs) / theirs <= 0.005, f"legolm ppl {ours:.4f} vs transformers {theirs:.4f}"
    assert (ours_last - hf_last).abs().max().item() < 1e-2


def test_greedy_continuation_knows_paris(model: legolm.TransformerLM, tokenizer: legolm.Tokenizer) -> None:
    cfg = GenerationConfig(greedy=True, max_new_tokens=12)
    (text,) = generate_text(model, tokenizer, ["The capital of France is"], cfg)
    assert "Paris" in text


def test_kv_cache_decoding_equals_full_recompute(model: legolm.TransformerLM, tokenizer: legolm.Tokenizer) -> None:
    prompt = tokenizer.encode("Once upon a time, in a small village,")
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    cfg = GenerationConfig(greedy=True, max_new_tokens=8, stop_at_eos=False)
    assert generate(model, [prompt], cfg).tokens[0] == seq[len(prompt):]


def test_batched_generation_equals_one_by_one(model: legolm.TransformerLM, tokenizer: legolm.Tokenizer) -> None:
    prompts = ["The capital of France is", "Water boils at a temperature of"]
    cfg = GenerationConfig(greedy=True, max_new_tokens=6, stop_at_eos=False)
    ids = [tokenizer.encode(p) for p in prompts]
    assert len(ids[0]) != len(ids[1])
    batch = generate(model, ids, cfg).tokens
    assert batch == [generate(model, [p], cfg).tokens[0] for p in ids]
