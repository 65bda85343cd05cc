"""Decoding sessions: reuse across calls gives the same tokens as a fresh session, and a changed model
(an injected module, new weights) never replays a session built for the old one."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from legolm.core.config import ModelConfig
from legolm.errors import ConfigError
from legolm.generation import GenerationConfig, generate
from legolm.generation.generate import _SESSIONS
from legolm.model.transformer import TransformerLM


def _model(preset: str = "tiny-pythia") -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(ModelConfig.from_name(preset)).eval()


def test_reused_session_matches_fresh_one() -> None:
    model = _model()
    reuse = GenerationConfig(max_new_tokens=12, greedy=True, stop_at_eos=False, cache_bucket=64)
    fresh = GenerationConfig(max_new_tokens=12, greedy=True, stop_at_eos=False, session_cache_size=0)
    batches = [[[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15, 16, 17, 18]], [[5, 6, 7, 8], [9, 10]]]
    got = [generate(model, b, reuse).tokens for b in batches]
    assert len(_SESSIONS[model]) == 1  # all three calls fit one bucket: one session
    assert got == [generate(model, b, fresh).tokens for b in batches]
    assert got[0] == got[2]


def test_sampling_reuse_is_seeded_like_fresh() -> None:
    model = _model("tiny-llama")
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.9, top_k=20, seed=3)
    first = generate(model, [[1, 2, 3]], cfg).tokens
    assert generate(model, [[1, 2, 3]], cfg).tokens == first
    cfg.session_cache_size = 0
    assert generate(model, [[1, 2, 3]], cfg).tokens == first


def test_changed_module_invalidates_the_session() -> None:
    model = _model("tiny-gpt2")
    cfg = GenerationConfig(max_new_tokens=10, greedy=True, stop_at_eos=False)
    before = generate(model, [[3, 4, 5]], cfg).tokens
    other = _model("tiny-gpt2")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(3.0)
    model.blocks[1] = copy.deepcopy(other.blocks[1])  # a new module, as adapter injection makes
    after = generate(model, [[3, 4, 5]], cfg).tokens
    fresh = generate(model, [[3, 4, 5]], GenerationConfig(max_new_tokens=10, greedy=True, stop_at_eos=False,
                                                          session_cache_size=0)).tokens
    assert after == fresh
    assert after != before


@pytest.mark.parametrize("field, value, message", [
    ("compile_mode", "reduce-overhead", "compile_mode must be one of default, max-autotune-no-cudagraphs"),
    ("top_p", 0.0, "top_p must be in (0, 1]"),
    ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
])
def test_generation_config_refuses_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        GenerationConfig(**{field: value}).validate()  # type: ignore[arg-type]
