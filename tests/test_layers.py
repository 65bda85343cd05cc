"""Layer-level behaviour checked against hand-computed values and structural invariants."""

from __future__ import annotations

import json
import math

import pytest
import torch

import legolm
from legolm.core.config import PRESETS, ModelConfig
from legolm.core.context import attention_bias
from legolm.core.kv_cache import KVCache, LayerKVCache
from legolm.core.rope import apply_rope, rope_operands, rope_tables
from legolm.errors import ConfigError
from legolm.generation.sampling import filter_logits, next_token
from legolm.model.transformer import TransformerLM

TINY = ["tiny-gpt2", "tiny-pythia", "tiny-llama"]


def _tiny(name: str, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    model = TransformerLM(ModelConfig.from_name(name)).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so differences are not lost in rounding
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    return model


# -- RoPE --------------------------------------------------------------------------------------------
def _cs(angles: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (1, 1, T=1, R) for the half-split layout: pair i uses angles[i] in both halves."""
    a = torch.tensor(angles * 2, dtype=torch.float64)
    return a.cos().view(1, 1, 1, -1), a.sin().view(1, 1, 1, -1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` of x (..., D) with cos/sin tables (..., R), through `rope_operands`."""
    c, s = rope_operands(torch.stack([cos, sin]))
    return apply_rope(x, c, s)


def test_rope_operands_hand_values() -> None:
    """R = 4: cos as it is, sin's first half negated (rotate_half's sign)."""
    cos, sin = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.5, 0.6, 0.7, 0.8])
    c, s = rope_operands(torch.stack([cos, sin]))
    assert c.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert s.tolist() == pytest.approx([-0.5, -0.6, 0.7, 0.8])


def test_apply_rope_rotates_a_2d_vector() -> None:
    theta = math.pi / 3
    x = torch.tensor([2.0, 1.0], dtype=torch.float64).view(1, 1, 1, 2)
    cos, sin = _cs([theta])
    out = _rope(x, cos, sin).flatten()
    expected = [2 * math.cos(theta) - 1 * math.sin(theta), 2 * math.sin(theta) + 1 * math.cos(theta)]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))


def test_apply_rope_unit_vector_by_quarter_turn() -> None:
    x = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    cos, sin = _cs([math.pi / 2])
    torch.testing.assert_close(_rope(x, cos.float(), sin.float()).flatten(), torch.tensor([0.0, 1.0]))


def test_apply_rope_partial_rotation_pairs_and_pass_through() -> None:
    """R=4 of D=6: pairs (0, 2) and (1, 3) rotate by their own angles; dims 4, 5 pass through."""
    a, b, c, d, e, f = 1.0, 2.0, 3.0, 4.0, 5.0, 6.0
    t0, t1 = 0.7, 0.1
    x = torch.tensor([a, b, c, d, e, f], dtype=torch.float64).view(1, 1, 1, 6)
    cos, sin = _cs([t0, t1])
    out = _rope(x, cos, sin).flatten().tolist()
    expected = [
        a * math.cos(t0) - c * math.sin(t0),
        b * math.cos(t1) - d * math.sin(t1),
        c * math.cos(t0) + a * math.sin(t0),
        d * math.cos(t1) + b * math.sin(t1),
        e,
        f,
    ]
    assert out == pytest.approx(expected, abs=1e-12)
    assert out[4:] == [e, f]  # exactly untouched


def test_apply_rope_rotates_each_position_of_every_head_in_the_projection_layout() -> None:
    """x (B, T, H, D) as the qkv projection lays it out and tables (1, T, 1, R): position t turns every head by
    t radians (R = D = 2, inverse frequency 1), whatever the head holds."""
    cs = rope_tables(2, 3, 10000.0).double()
    cos, sin = cs[0][None, :, None], cs[1][None, :, None]  # (1, T, 1, R)
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64).expand(1, 3, 2, 2)  # head h holds (1 + 2h, 0)
    out = _rope(x, cos, sin)
    for t in range(3):
        for h, length in enumerate((1.0, 3.0)):
            expected = [length * math.cos(t), length * math.sin(t)]
            assert out[0, t, h].tolist() == pytest.approx(expected, abs=1e-6), (t, h)


def test_attention_bias_is_zero_where_allowed_and_minus_infinity_elsewhere() -> None:
    allowed = torch.tensor([[True, False, False], [True, True, False]])
    bias = attention_bias(allowed, torch.bfloat16)
    assert bias.dtype == torch.bfloat16
    assert bias.tolist() == [[0.0, -math.inf, -math.inf], [0.0, 0.0, -math.inf]]


def test_a_cached_forward_hands_every_layer_one_additive_bias_in_the_activation_dtype() -> None:
    """Prompt of 3 at slots 2..4 of a cache of 6, the first slot padding: each query sees the real slots up to its
    own (SDPA would otherwise convert a boolean mask in every layer)."""
    model = TransformerLM(ModelConfig.from_name("tiny-pythia"))
    cache = KVCache(model.config, 1, 6)
    pad = torch.tensor([[False, True, True, True, True, True]])
    ctx = model.make_context(torch.arange(3)[None], torch.float32, cache, torch.arange(2, 5), pad)
    assert ctx.attn_bias is not None and ctx.attn_bias.dtype == torch.float32
    seen = (ctx.attn_bias[0, 0] == 0).int().tolist()
    assert seen == [[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]]
    assert model.make_context(torch.arange(3)[None], torch.float32).attn_bias is None  # plain causal


def test_rope_tables_hand_values() -> None:
    """rotary_dim=4, base=100: inverse frequencies 1 and 100^(-1/2) = 0.1; angle = position * freq."""
    t = rope_tables(4, 5, 100.0)
    assert t.shape == (2, 5, 4) and t.dtype == torch.float32
    cos, sin = t
    torch.testing.assert_close(cos[0], torch.ones(4))
    torch.testing.assert_close(sin[0], torch.zeros(4))
    for pos in range(5):
        angles = torch.tensor([pos * 1.0, pos * 0.1, pos * 1.0, pos * 0.1])
        torch.testing.assert_close(cos[pos], angles.cos())
        torch.testing.assert_close(sin[pos], angles.sin())


def test_rope_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    cs = rope_tables(8, 64, 10000.0).double()

    def at(x: torch.Tensor, pos: int) -> torch.Tensor:
        return _rope(x, cs[0, pos].view(1, 1, 1, -1), cs[1, pos].view(1, 1, 1, -1))

    s1 = (at(q, 9) * at(k, 4)).sum()
    s2 = (at(q, 40) * at(k, 35)).sum()
    assert s1.item() == pytest.approx(s2.item(), abs=1e-5)  # the tables are fp32
    assert at(q, 17).norm().item() == pytest.approx(q.norm().item(), abs=1e-6)  # rotations keep length
    assert (q * k).sum().item() != pytest.approx(s1.item(), abs=1e-3)  # …and do change the score


# -- sampling filters ---------------------------------------------------------------------------------
PROBS = [0.5, 0.3, 0.15, 0.05]


def _kept(logits: torch.Tensor) -> list[list[int]]:
    return [sorted(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor(PROBS).log().unsqueeze(0)
    assert _kept(filter_logits(logits, 1, 1.0)) == [[0]]
    assert _kept(filter_logits(logits, 2, 1.0)) == [[0, 1]]
    assert _kept(filter_logits(logits, 3, 1.0)) == [[0, 1, 2]]
    out = filter_logits(logits, 2, 1.0)
    torch.testing.assert_close(out[0, :2], logits[0, :2])  # kept logits unchanged


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.tensor(PROBS).log().unsqueeze(0)
    assert _kept(filter_logits(logits, 0, 0.8)) == [[0, 1]]  # 0.5 + 0.3 reaches 0.8
    assert _kept(filter_logits(logits, 0, 0.75)) == [[0, 1]]
    assert _kept(filter_logits(logits, 0, 0.81)) == [[0, 1, 2]]
    assert _kept(filter_logits(logits, 0, 0.4)) == [[0]]  # the top token is always kept
    assert _kept(filter_logits(logits, 0, 0.96)) == [[0, 1, 2, 3]]


def test_filters_work_per_row_on_unsorted_rows() -> None:
    rows = torch.tensor([[0.05, 0.3, 0.15, 0.5], [0.15, 0.05, 0.5, 0.3]]).log()
    assert _kept(filter_logits(rows, 0, 0.8)) == [[1, 3], [2, 3]]
    assert _kept(filter_logits(rows, 1, 1.0)) == [[3], [2]]
    assert _kept(filter_logits(rows, 3, 0.6)) == [[1, 3], [2, 3]]  # both filters together


def test_filters_off_leave_logits_alone() -> None:
    logits = torch.tensor(PROBS).log().unsqueeze(0)
    assert torch.equal(filter_logits(logits, 0, 1.0), logits)
    assert torch.equal(filter_logits(logits, 4, 1.0), logits)


def test_next_token_greedy_and_seeded_sampling() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    assert next_token(logits, True, 1.0, 0, 1.0).tolist() == [1, 0]
    assert next_token(logits, False, 1.0, 1, 1.0).tolist() == [1, 0]  # top_k=1 sampling is greedy
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    wide = torch.zeros(1, 50)
    draws1 = [next_token(wide, False, 1.0, 0, 1.0, g1).item() for _ in range(20)]
    draws2 = [next_token(wide, False, 1.0, 0, 1.0, g2).item() for _ in range(20)]
    assert draws1 == draws2 and len(set(draws1)) > 1


# -- KV cache -----------------------------------------------------------------------------------------
def test_layer_kv_cache_update_writes_only_the_given_slots() -> None:
    cache = LayerKVCache(batch=2, n_kv_head=3, max_len=6, head_dim=4, dtype=torch.float32, device="cpu")
    k = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4) + 1
    v = -k
    full_k, full_v = cache.update(torch.tensor([1, 4]), k, v)
    assert full_k is cache.k and full_v is cache.v and full_k.shape == (2, 3, 6, 4)
    torch.testing.assert_close(full_k[:, :, 1], k[:, :, 0])
    torch.testing.assert_close(full_k[:, :, 4], k[:, :, 1])
    torch.testing.assert_close(full_v[:, :, [1, 4]], v)
    assert full_k[:, :, [0, 2, 3, 5]].abs().sum() == 0 and full_v[:, :, [0, 2, 3, 5]].abs().sum() == 0
    cache.update(torch.tensor([2]), k[:, :, :1] * 10, v[:, :, :1] * 10)  # a later write leaves earlier slots
    torch.testing.assert_close(cache.k[:, :, 1], k[:, :, 0])
    torch.testing.assert_close(cache.k[:, :, 2], k[:, :, 0] * 10)


def test_kv_cache_layers_shapes_and_limits() -> None:
    cfg = ModelConfig.from_name("tiny-llama")
    cache = KVCache(cfg, batch=3, max_len=10, layers=[1])
    assert cache.get(0) is None and cache.get(1) is not None
    assert cache.get(1).k.shape == (3, cfg.kv_heads, 10, cfg.hd)  # GQA: the cache holds the kv heads only
    assert cache.nbytes() == 2 * 3 * cfg.kv_heads * 10 * cfg.hd * 4
    with pytest.raises(ConfigError, match="learned positions"):
        KVCache(ModelConfig.from_name("tiny-gpt2"), 1, 129)


# -- model structure ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY)
def test_changing_a_future_token_never_changes_earlier_logits(name: str) -> None:
    model = _tiny(name)
    torch.manual_seed(1)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    for t in (3, 10, 15):
        y = x.clone()
        y[:, t] = (y[:, t] + 7) % model.config.vocab_size
        with torch.no_grad():
            a, b = model(x), model(y)
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-5)
        assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 1e-3  # the change does reach later positions


@pytest.mark.parametrize("name", TINY)
def test_forward_in_two_halves_equals_full(name: str) -> None:
    model = _tiny(name)
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(x)
        h = model(x, end=1)
        assert h.shape == (2, 12, model.config.n_embd)
        top = model(h, start=1)
    torch.testing.assert_close(top, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_forward_layers_capture_layer0(name: str) -> None:
    model = _tiny(name)
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    positions = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        h0 = model.embed(x, positions)
        ctx = model.make_context(positions, h0.dtype)
        out = model.forward_layers(h0, ctx, capture=[0])
        expected0 = model(x, end=1)
        full = model(x)
    assert set(out.captured) == {0}
    torch.testing.assert_close(out.captured[0], expected0, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.project(out.hidden), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_left_padding_with_pad_mask_matches_unpadded(name: str) -> None:
    model = _tiny(name)
    x = torch.randint(1, model.config.vocab_size, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), x], dim=1)
    pad_mask = torch.arange(13)[None] >= 4
    positions = (torch.arange(13) - 4).clamp(min=0)[None]
    with torch.no_grad():
        ref = model(x)
        got = model(padded, positions=positions, pad_mask=pad_mask)[:, 4:]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_tied_head_shares_the_embedding(name: str) -> None:
    model = _tiny(name)
    assert (model.lm_head.weight is model.wte.weight) == model.config.tie_embeddings
    untied = TransformerLM(ModelConfig.from_name(name, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight
    extra = model.config.vocab_size * model.config.n_embd
    assert untied.num_parameters() - model.num_parameters() == (extra if model.config.tie_embeddings else 0)


# -- config ---------------------------------------------------------------------------------------------
def _base(**kw):
    return {**PRESETS["tiny-llama"], **kw}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"layers": []}, "layers"),
        ({"layers": ["llama", "mamba"]}, "unknown layer type"),
        ({"n_head": 4, "n_kv_head": 3}, "multiple of n_kv_head"),
        ({"n_embd": 0}, "n_embd"),
        ({"rotary_pct": 1.5}, "rotary_pct"),
    ],
)
def test_config_validation_errors(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**_base(**overrides))


def test_config_from_dict_and_from_name_errors() -> None:
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict(_base(n_layers=3))
    with pytest.raises(ConfigError):
        ModelConfig.from_dict({"layers": ["llama"]})  # required sizes missing
    with pytest.raises(ConfigError, match="unknown model preset"):
        ModelConfig.from_name("gpt5")
    assert issubclass(ConfigError, legolm.LegolmError)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_dict_and_json_round_trip(name: str, tmp_path) -> None:
    cfg = ModelConfig.from_name(name)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    cfg.save(tmp_path / "c.json")
    again = ModelConfig.from_dict(json.loads((tmp_path / "c.json").read_text()))
    assert again == cfg and again.name == name


def test_config_defaults_fill_in() -> None:
    cfg = ModelConfig(layers=["pythia"] * 2, vocab_size=10, n_embd=64, n_head=4, intermediate_size=8,
                      block_size=16, rotary_pct=0.25)
    assert (cfg.n_kv_head, cfg.head_dim, cfg.n_layer, cfg.rotary_dim) == (4, 16, 2, 4)
    assert ModelConfig.from_name("tiny-gpt2").rotary_dim == 0


@pytest.mark.parametrize(
    ("name", "count"),
    [("gpt2", 124_439_808), ("pythia-160m", 162_322_944), ("pythia-410m", 405_334_016),
     ("smollm2-135m", 134_515_008)],
)
def test_preset_parameter_counts_match_published_models(name: str, count: int) -> None:
    with torch.device("meta"):
        model = TransformerLM(ModelConfig.from_name(name))
    assert model.num_parameters() == count


# -- generation bookkeeping -------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY)
def test_generation_stops_each_row_at_its_own_eos(name: str) -> None:
    from legolm.generation import GenerationConfig, generate

    model = _tiny(name)
    prompts = [[5, 9, 11, 3], [7, 100, 42]]
    free = generate(model, prompts, GenerationConfig(greedy=True, max_new_tokens=20, stop_at_eos=False)).tokens
    eos = free[0][2]  # row 0 emits this id at its 3rd step: call it EOS
    stopped = generate(model, prompts, GenerationConfig(greedy=True, max_new_tokens=20, eos_check_every=1),
                       eos_id=eos)
    expected = [row[: row.index(eos) + 1] if eos in row else row for row in free]
    assert stopped.tokens == expected
    assert len(stopped.tokens[0]) <= 3
    assert stopped.steps == max(len(r) for r in expected)  # stops as soon as every row is done


def test_generation_rejects_bad_prompts() -> None:
    from legolm.generation import GenerationConfig, generate

    model = _tiny("tiny-llama")
    cfg = GenerationConfig(greedy=True, max_new_tokens=4)
    with pytest.raises(ConfigError, match="empty prompt"):
        generate(model, [[1, 2], []], cfg)
    with pytest.raises(ConfigError, match="vocabulary"):
        generate(model, [[1, 512]], cfg)
    with pytest.raises(ConfigError, match="context"):
        generate(model, [[1] * 126], cfg)
