"""LEGO decoding through `generate`: the fused early-exit decoders (Triton's interpreter off the GPU)
against the torch early-exit loop, self-speculative decoding (eager and fused) against full-depth greedy
decoding, the multi-token row kernels against torch, the costs they report, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from legolm.errors import ConfigError
from legolm.generation import GenerationConfig, generate
from legolm.generation.early_exit import generate_speculative, generate_with_early_exit
from legolm.model.config import ModelConfig
from legolm.model.lego import LegoLM
from legolm.model.transformer import TransformerLM
from tests.test_early_exit import N_NEW, PRESETS, SPLIT, lego_model, mid_threshold, prompt

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def greedy(**kw: object) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": N_NEW, "greedy": True, "stop_at_eos": False, **kw})  # type: ignore[arg-type]


def drafting_model(preset: str) -> LegoLM:
    """A LEGO model whose deep exit mostly agrees with its shallow one (the deep head is a copy of the
    shallow head, the upper blocks add small residuals): drafts are accepted often, not always."""
    model = lego_model(preset)
    assert model.shallow_exit is not None
    with torch.no_grad():
        model.norm.load_state_dict(model.shallow_exit.norm.state_dict())
        model.lm_head.weight.copy_(model.shallow_exit.head.weight)
        for block in model.blocks[model.split:]:
            for name, p in block.named_parameters():
                if name.endswith(("proj.weight", "down.weight")):
                    p.mul_(0.15)
    return model


# -- the row kernels, by hand against torch ------------------------------------------------------------
def test_row_kernels_match_torch() -> None:
    """rows_gemv (LayerNorm, bias, GELU, residual; RMSNorm + SwiGLU; per-row argmax), the K/V write of
    all rows and causal attention over the cache, on 5 rows at a cache offset."""
    from legolm.kernels import rows as kr
    from legolm.kernels.decode import ACT_GELU, ACT_SWIGLU, NORM_LAYER, NORM_RMS

    g = torch.Generator().manual_seed(0)
    R, K, N = 5, 48, 40
    x, w, b, wu = (torch.randn(*s, generator=g) for s in ((8, K), (N, K), (N,), (N, K)))
    nw, nb, res = torch.randn(K, generator=g), torch.randn(K, generator=g), torch.randn(8, N, generator=g)
    out = torch.full((8, N), float("nan"))
    cfg = kr.RowsConfig(16, 16, 4)
    kr.rows_gemv(x, w, out, R, cfg, bias=b, norm=(NORM_LAYER, nw, nb, 1e-5), act=ACT_GELU, residual=res)
    want = F.gelu(F.layer_norm(x[:R], (K,), nw, nb, 1e-5) @ w.T + b) + res[:R]
    torch.testing.assert_close(out[:R], want, atol=1e-4, rtol=1e-4)
    assert out[R:].isnan().all()  # rows past R untouched
    kr.rows_gemv(x, w, out, R, cfg, norm=(NORM_RMS, nw, None, 1e-6), act=ACT_SWIGLU, up=(wu, None))
    xn = F.rms_norm(x[:R], (K,), nw, 1e-6)
    torch.testing.assert_close(out[:R], F.silu(xn @ w.T) * (xn @ wu.T), atol=1e-4, rtol=1e-4)
    pmax, pidx = torch.zeros(8, 8), torch.zeros(8, 8, dtype=torch.int32)
    kr.rows_gemv(x, w, out, R, cfg, partial=(pmax, pidx))
    n_parts = -(-N // cfg.block_n)
    best = pmax[:R, :n_parts].argmax(1)
    assert pidx[:R, :n_parts].gather(1, best[:, None])[:, 0].tolist() == (x[:R] @ w.T).argmax(1).tolist()
    H, HKV, D, S, start = 4, 2, 8, 32, 7
    qkv = torch.randn(8, (H + 2 * HKV) * D, generator=g)
    kc, vc = torch.randn(1, HKV, S, D, generator=g), torch.randn(1, HKV, S, D, generator=g)
    at = torch.tensor([start])
    kr.kv_rows(qkv, kc, vc, torch.empty(0), at, R, H, HKV, D, 0)
    torch.testing.assert_close(kc[0, :, start:start + R], qkv[:R, H * D:(H + HKV) * D].view(R, HKV, D).transpose(0, 1))
    att = torch.zeros(8, H * D)
    kr.attention_rows(qkv, kc, vc, torch.empty(0), att, at, R, H, HKV, D, 0, 4)
    q = qkv[:R, :H * D].view(R, H, D).transpose(0, 1)
    keys = torch.arange(S)
    mask = keys[None, :] <= (start + torch.arange(R))[:, None]  # row m sees slots 0..start+m
    want = F.scaled_dot_product_attention(q, kc[0].repeat_interleave(2, 0), vc[0].repeat_interleave(2, 0),
                                          attn_mask=mask)
    torch.testing.assert_close(att[:R].view(R, H, D).transpose(0, 1), want, atol=1e-5, rtol=1e-5)


# -- threshold early exit: fused = the torch loop -------------------------------------------------------
@pytest.mark.parametrize(("preset", "kv_mode"), [(p, "skip") for p in PRESETS] + [("tiny-llama", "fill"),
                                                                                    ("tiny-gpt2", "fill")])
def test_fused_early_exit_equals_the_torch_loop(preset: str, kv_mode: str) -> None:
    """Same tokens, same exits, same shallow ratio: the fused decoder's decisions (confidence from the
    head's partial sums, fill-mode flushes of the queue) are those of `generate_with_early_exit`."""
    model, ids = lego_model(preset).to(DEVICE), prompt().to(DEVICE)
    tau = mid_threshold(model.cpu(), ids.cpu())
    model.to(DEVICE)
    ref = generate_with_early_exit(model, ids, N_NEW, tau, kv_mode=kv_mode)
    got = generate(model, ids.tolist(), greedy(early_exit="threshold", threshold=tau, kv_mode=kv_mode, fused=True,
                                               fused_tune=False, fill_buckets=[1, 2, 4, 8]))
    assert got.tokens == ref.tokens.tolist()
    assert got.early_exit is not None
    assert 0.2 < got.early_exit.shallow_ratio < 0.9  # a real mix of exits
    assert got.early_exit.shallow_ratio == pytest.approx(ref.stats.shallow_ratio)
    assert got.early_exit.call_cost < 1.0


def test_fill_mode_with_a_small_largest_bucket_flushes_full_queues_exactly() -> None:
    """Queues longer than the largest bucket are flushed early (without a deep token): still exact."""
    model, ids = lego_model("tiny-llama").to(DEVICE), prompt().to(DEVICE)
    ref = generate_with_early_exit(model, ids, N_NEW, 0.0, kv_mode="fill")  # always exit: the queue only grows
    got = generate(model, ids.tolist(), greedy(early_exit="threshold", threshold=0.0, kv_mode="fill", fused=True,
                                               fused_tune=False, fill_buckets=[1, 2]))
    assert got.tokens == ref.tokens.tolist()
    assert got.early_exit is not None and got.early_exit.shallow_ratio == 1.0
    # every step runs the lower blocks; every second one also flushes two rows through the upper ones
    L, k = model.n_layer, model.split
    steps = N_NEW - 1
    assert got.early_exit.call_cost == pytest.approx((steps * k + (steps // 2) * (L - k)) / (steps * L))


@pytest.mark.parametrize(("tau", "ratio"), [(0.0, 1.0), (1.0, 0.0)])
def test_fused_extremes_and_their_costs(tau: float, ratio: float) -> None:
    """τ = 0 always exits (cost: the lower blocks alone); τ = 1 never does and equals full-depth greedy."""
    model, ids = lego_model("tiny-pythia").to(DEVICE), prompt().to(DEVICE)
    got = generate(model, ids.tolist(), greedy(early_exit="threshold", threshold=tau, kv_mode="skip", fused=True,
                                               fused_tune=False))
    assert got.early_exit is not None and got.early_exit.shallow_ratio == ratio
    if tau == 1.0:
        assert got.tokens == generate(model, ids.tolist(), greedy()).tokens
        assert got.early_exit.call_cost == pytest.approx(1.0)
    else:
        assert got.tokens == generate(model.shallow_model(), ids.tolist(), greedy()).tokens
        assert got.early_exit.call_cost == pytest.approx(SPLIT / model.n_layer)


# -- self-speculative: identical to full-depth greedy ---------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(("fused", "drafts"), [(False, (1, 3)), (True, (2,))])
def test_speculative_output_is_full_depth_greedy(preset: str, fused: bool, drafts: tuple[int, ...]) -> None:
    model, ids = drafting_model(preset).to(DEVICE), prompt().to(DEVICE)
    n = N_NEW if not fused else N_NEW // 2  # the interpreter is slow
    want = generate(model, ids.tolist(), greedy(max_new_tokens=n)).tokens
    for d in drafts:
        got = generate(model, ids.tolist(), greedy(max_new_tokens=n, early_exit="speculative", draft_tokens=d,
                                                   fused=fused, fused_tune=False))
        assert got.tokens == want, f"d={d}"
        stats = got.early_exit
        assert stats is not None and stats.rounds >= 1
        assert stats.drafted == d * stats.rounds and stats.accepted <= stats.drafted
        assert stats.rounds * (d + 1) >= n - 1 >= stats.rounds  # each round emits 1..d+1 tokens
        if preset != "tiny-pythia":  # drafts both kept and rejected
            assert 0.0 < stats.acceptance_rate < 1.0


def test_speculative_with_an_unrelated_deep_exit_still_equals_greedy() -> None:
    """Drafts rejected at every round (acceptance ~0): one token per verify pass, output unchanged."""
    model, ids = lego_model("tiny-gpt2"), prompt()
    out = generate_speculative(model, ids, N_NEW, 3)
    assert out.tokens.tolist() == generate(model, ids.tolist(), greedy()).tokens
    assert out.stats.acceptance_rate < 0.2


def test_speculative_stops_at_eos() -> None:
    model, ids = drafting_model("tiny-llama").to(DEVICE), prompt().to(DEVICE)
    row = generate(model, ids.tolist(), greedy()).tokens[0]
    eos = next(t for i, t in enumerate(row) if i >= 3 and t not in row[:i])
    cfg = greedy(stop_at_eos=True)
    want = generate(model, ids.tolist(), cfg, eos_id=eos).tokens
    assert want == [row[: row.index(eos) + 1]]
    for fused in (False, True):
        spec = greedy(early_exit="speculative", draft_tokens=3, fused=fused, fused_tune=False, stop_at_eos=True)
        assert generate(model, ids.tolist(), spec, eos_id=eos).tokens == want


# -- settings and bad input -----------------------------------------------------------------------------
def test_target_ratio_picks_the_threshold_from_the_stored_quantiles() -> None:
    model, ids = lego_model("tiny-pythia"), prompt()
    model.calibrate(0.5, 0.5, torch.linspace(0.0, 1.0, 1001))
    got = generate(model, ids.tolist(), greedy(early_exit="threshold", target_ratio=0.3, kv_mode="skip"))
    ref = generate_with_early_exit(model, ids, N_NEW, 0.3, kv_mode="skip")
    assert got.tokens == ref.tokens.tolist()


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"early_exit": "threshold", "threshold": 1.5}, "threshold must be in [0, 1]"),
    ({"early_exit": "threshold", "target_ratio": 1.0}, "target_ratio must be in (0, 1)"),
    ({"early_exit": "threshold", "threshold": 0.5, "target_ratio": 0.5}, "not both"),
    ({"early_exit": "speculative", "draft_tokens": 0}, "draft_tokens must be >= 1"),
    ({"early_exit": "speculative", "greedy": False}, "speculative decoding is greedy"),
    ({"early_exit": "threshold", "fused": True, "kv_mode": "propagate"}, "fill or skip"),
    ({"fill_buckets": [4, 2]}, "fill_buckets must be increasing"),
    ({"graph_steps": 0}, "graph_steps must be >= 1"),
])
def test_bad_settings_are_one_clear_error(kwargs: dict[str, object], fragment: str) -> None:
    base: dict[str, object] = {"max_new_tokens": 4, "greedy": True}
    with pytest.raises(ConfigError) as err:
        GenerationConfig(**{**base, **kwargs}).validate()  # type: ignore[arg-type]
    assert fragment in str(err.value)


def test_early_exit_on_a_model_without_an_exit_is_refused() -> None:
    plain = TransformerLM(ModelConfig.from_name("tiny-pythia", vocab_size=97))
    for model in (plain, LegoLM(ModelConfig.from_name("tiny-pythia", vocab_size=97))):
        with pytest.raises(ConfigError, match="needs a LEGO model with a shallow exit"):
            generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=4, greedy=True, early_exit="threshold"))


class _Replayed:
    """Stands in for a captured CUDA graph on the CPU: replay() runs what was recorded."""

    def __init__(self, fn: object) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn(None)  # type: ignore[operator]


@pytest.mark.parametrize(("mode", "kv_mode", "runner"), [("threshold", "skip", "parts"), ("threshold", "fill", "parts"),
                                                         ("speculative", "fill", "graph")])
def test_the_gpu_runners_control_flow_on_the_cpu(monkeypatch: pytest.MonkeyPatch, mode: str, kv_mode: str,
                                                 runner: str) -> None:
    """The GPU runners' control flow with graphs replaced by their recorded functions: a step as graphs of its
    parts with the conditions read once (threshold), several rounds per replay (speculative)."""
    import legolm.generation.fused_early_exit as fe

    monkeypatch.setattr(fe, "_record", _Replayed)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    init = fe.FusedLegoSession.__init__

    def gpu_init(self: fe.FusedLegoSession, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)  # type: ignore[arg-type]
        self.runner = runner

    monkeypatch.setattr(fe.FusedLegoSession, "__init__", gpu_init)
    model = (drafting_model if mode == "speculative" else lego_model)("tiny-llama")
    ids = prompt()
    n = N_NEW // 2
    tau = mid_threshold(model, ids)
    cfg = greedy(max_new_tokens=n, early_exit=mode, threshold=tau if mode == "threshold" else None, kv_mode=kv_mode,
                 draft_tokens=2, fused=True, fused_tune=False, fill_buckets=[1, 2, 4], graph_steps=3)
    got = generate(model, ids.tolist(), cfg)
    want = generate_with_early_exit(model, ids, n, tau, kv_mode=kv_mode).tokens.tolist() if mode == "threshold" \
        else generate(model, ids.tolist(), greedy(max_new_tokens=n)).tokens
    assert got.tokens == want
