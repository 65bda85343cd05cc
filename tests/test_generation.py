"""Decoding sessions: reuse across calls gives the same tokens as a fresh session, and a changed model
(an injected module, new weights) never replays a session built for the old one."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from legolm.core.config import ModelConfig
from legolm.errors import ConfigError
from legolm.generation import GenerationConfig, GenerationResult, generate
from legolm.generation.decoder import DecodeSession
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


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-pythia"])
def test_several_steps_per_replay_give_the_same_tokens_and_stop_at_eos(preset: str) -> None:
    """Greedy steps chained per replay (`graph_steps`) emit what one step at a time emits; a call whose
    token count is not a multiple of it ends with single steps; EOS checks between replays still stop it
    (a replay holds at most `eos_check_every` steps)."""
    model, prompts = _model(preset), [[3, 4, 5, 6], [7, 8]]

    def run(graph_steps: int, eos: int | None, check: int = 2, rows: int = 2, new: int = 11) -> GenerationResult:
        cfg = GenerationConfig(max_new_tokens=new, greedy=True, stop_at_eos=eos is not None, graph_steps=graph_steps,
                               eos_check_every=check, session_cache_size=0)
        return generate(model, prompts[:rows], cfg, eos_id=eos)

    one = run(1, None).tokens
    assert all(len(row) == 11 for row in one)
    assert run(4, None).tokens == run(16, None).tokens == one
    row = one[0]
    eos = next(t for i, t in enumerate(row) if i >= 2 and t not in row[:i])  # first seen mid-way
    stopped = run(1, eos).tokens
    assert stopped[0] == row[:row.index(eos) + 1]
    assert run(4, eos, check=4).tokens == run(4, eos, check=3).tokens == run(4, eos, check=1).tokens == stopped
    alone = run(4, eos, check=4, rows=1, new=40)  # the only row is done: decoding stops long before 40 tokens
    assert alone.tokens == run(1, eos, rows=1, new=40).tokens and eos in alone.tokens[0] and alone.steps < 20


def test_several_steps_per_call_need_greedy_decoding() -> None:
    session = DecodeSession(_model(), 1, 16, greedy=False, eos_id=None)
    with pytest.raises(ValueError, match="2 steps at once need greedy decoding"):
        session.step(2)
