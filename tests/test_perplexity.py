"""Sliding-window perplexity: hand-checked windows, token-by-token reference, Hugging Face's guide, real SmolLM2."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tiny_hf import randomize_

import legolm
from legolm.core.config import ModelConfig
from legolm.data import Tokenizer
from legolm.errors import ConfigError
from legolm.eval import PPLResult, disjoint_ppl, sliding_window_ppl, windows
from legolm.eval.sanity import PPLBands


@pytest.fixture(scope="module")
def shakespeare_ids(shakespeare_text: str, gpt2_tokenizer_dir: Path) -> np.ndarray:
    """Real GPT-2 token ids of the start of Tiny Shakespeare."""
    return np.array(Tokenizer.from_dir(gpt2_tokenizer_dir).encode(shakespeare_text[:2000]), dtype=np.int64)


def _reference_nll(model: torch.nn.Module, ids: np.ndarray, max_length: int, stride: int) -> tuple[float, int]:
    """Token by token: each token's loss given exactly the context its window allows.

    Token t is scored in the first window (begins 0, stride, 2·stride, …) that reaches past it,
    i.e. begin = 0 if t < max_length else ((t - max_length) // stride + 1) · stride, with context
    ids[begin:t]; a token that starts its window (no context) is not scored.
    """
    x = torch.as_tensor(ids)
    total, count = 0.0, 0
    with torch.no_grad():
        for t in range(1, len(ids)):
            begin = 0 if t < max_length else ((t - max_length) // stride + 1) * stride
            if begin == t:
                continue
            logits = model(x[None, begin:t])[0, -1]  # prediction for position t
            total += float(-torch.log_softmax(logits.double(), -1)[x[t]])
            count += 1
    return total, count


# -- hand-checked ------------------------------------------------------------------------------------
def test_windows_hand_checked() -> None:
    # 10 tokens, windows of 4 moving by 2: every token after the first scored once.
    assert list(windows(10, 4, 2)) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    # A short last window; stride == max_length skips each window's first token (no context).
    assert list(windows(10, 4, 4)) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert list(windows(7, 4, 3)) == [(0, 4, 1), (3, 7, 4)]


def test_result_metrics_hand_checked() -> None:
    r = PPLResult(nll_sum=20.0, n_tokens=10, max_length=8, stride=4, n_bytes=40, n_words=8)
    assert r.nll == 2.0
    assert r.ppl == pytest.approx(math.exp(2.0))
    assert r.bits_per_byte == pytest.approx(20.0 / (math.log(2) * 40))
    assert r.word_ppl == pytest.approx(math.exp(20.0 / 8))
    assert PPLResult(1.0, 1, 2, 2).bits_per_byte is None


# -- against references ------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("max_length, stride, batch_size", [(16, 5, 3), (16, 16, 2), (12, 1, 4)])
def test_sliding_window_equals_token_by_token_reference(shakespeare_ids: np.ndarray, preset: str, max_length: int,
                                                        stride: int, batch_size: int) -> None:
    torch.manual_seed(0)
    model = legolm.TransformerLM(ModelConfig.from_name(preset, vocab_size=50257, block_size=32)).eval()
    ids = shakespeare_ids[:70]
    got = sliding_window_ppl(model, ids, max_length, stride, batch_size, progress=False)
    total, count = _reference_nll(model, ids, max_length, stride)
    skipped = 0 if stride < max_length else 4  # disjoint: windows at 16, 32, 48, 64 lack context for their first
    assert got.n_tokens == count == 69 - skipped
    assert got.nll_sum == pytest.approx(total, rel=1e-5)


def test_matches_hugging_face_guide_on_hf_gpt2(shakespeare_ids: np.ndarray, tmp_path: Path) -> None:
    """The guide's loop on the HF model vs legolm on the same weights loaded from the HF checkpoint."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = randomize_(transformers.GPT2LMHeadModel(cfg).eval(), eos_row=None)
    hf.save_pretrained(tmp_path)
    ours = legolm.load_pretrained(tmp_path)
    encodings = torch.as_tensor(shakespeare_ids[:300])[None]
    max_length, stride = 48, 20

    # Hugging Face, "Perplexity of fixed-length models" (sliding window strategy).
    seq_len = encodings.size(1)
    nll_sum, n_tokens, guide_sum, guide_tokens, prev_end_loc = 0.0, 0, 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = hf(input_ids, labels=target_ids)
        neg_log_likelihood = outputs.loss  # mean over the labels left after HF's internal shift
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += float(neg_log_likelihood) * num_loss_tokens
        n_tokens += num_loss_tokens
        # The guide's own count, `num_valid_tokens - batch_size`, is one short for every window after
        # the first (the label dropped by the shift is a masked one there): it weights the means a bit off.
        guide_n = (target_ids != -100).sum().item() - target_ids.size(0)
        guide_sum, guide_tokens = guide_sum + float(neg_log_likelihood) * guide_n, guide_tokens + guide_n
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break

    got = sliding_window_ppl(ours, encodings[0], max_length, stride, batch_size=4, progress=False)
    assert got.n_tokens == n_tokens == seq_len - 1
    assert got.nll_sum == pytest.approx(nll_sum, rel=1e-5)
    assert got.ppl == pytest.approx(math.exp(guide_sum / guide_tokens), rel=1e-2)


# -- the real model ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_loaded(smollm2_gguf: Path) -> tuple[legolm.TransformerLM, legolm.Tokenizer]:
    return legolm.load(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2(smollm2_loaded: tuple[legolm.TransformerLM, legolm.Tokenizer]) -> legolm.TransformerLM:
    return smollm2_loaded[0]


@pytest.fixture(scope="module")
def smollm2_shakespeare_ids(smollm2_loaded: tuple[legolm.TransformerLM, legolm.Tokenizer],
                            shakespeare_text: str) -> np.ndarray:
    tok = smollm2_loaded[1]
    return np.array(tok.encode(shakespeare_text[:4000]), dtype=np.int64)[:512]


@pytest.mark.slow
def test_more_context_lowers_real_perplexity(smollm2: legolm.TransformerLM,
                                             smollm2_shakespeare_ids: np.ndarray) -> None:
    """SmolLM2 on real Shakespeare: overlapping windows give each token more context than disjoint ones."""
    ids = smollm2_shakespeare_ids
    disjoint = disjoint_ppl(smollm2, ids, 128, batch_size=4, progress=False)
    strided = sliding_window_ppl(smollm2, ids, 128, 64, batch_size=4, progress=False)
    assert strided.ppl < disjoint.ppl
    assert disjoint.n_tokens == len(ids) - 4 and strided.n_tokens == len(ids) - 1
    assert 5.0 < strided.ppl < 200.0 and not PPLBands().check("val", strided.ppl, 49_152).warns  # real model, text


@pytest.mark.slow
def test_repeated_text_is_flagged_suspicious(smollm2: legolm.TransformerLM,
                                               smollm2_shakespeare_ids: np.ndarray) -> None:
    """Text the model has in its context (like leaked training text) gives an implausibly low perplexity."""
    passage = smollm2_shakespeare_ids[:64]
    result = sliding_window_ppl(smollm2, np.tile(passage, 4), 256, 256, progress=False)
    verdict = PPLBands().check("repeated", result.ppl, smollm2.config.vocab_size)
    assert result.ppl < 5.0 and verdict.band == "suspicious" and "leakage" in verdict.message


def test_bad_window_settings() -> None:
    model = legolm.TransformerLM(ModelConfig.from_name("tiny-gpt2")).eval()  # block_size 128
    ids = np.arange(100)
    with pytest.raises(ConfigError, match=r"stride 9 must be in 1\.\.max_length"):
        sliding_window_ppl(model, ids, 8, 9, progress=False)
    with pytest.raises(ConfigError, match="block_size"):
        sliding_window_ppl(model, ids, 129, 64, progress=False)
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        sliding_window_ppl(model, ids[:1], 8, 4, progress=False)
