"""TRUE early-exit generation: exact against full-depth / shallow generation and against recomputation
without a cache, cumulative RoPE positions in skip mode, and compute cost counted by hooks."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from legolm.core.config import ModelConfig
from legolm.core.kv_cache import LayerKVCache
from legolm.errors import ConfigError
from legolm.generation import GenerationConfig, generate
from legolm.generation.early_exit import generate_with_early_exit, write_kv
from legolm.layers.attention import CausalSelfAttention
from legolm.model.lego import LegoLM, exits

VOCAB, SPLIT, DEPTH, N_NEW = 97, 2, 5, 24
PRESETS = ["tiny-pythia", "tiny-llama", "tiny-gpt2"]


def lego_model(preset: str, std: float = 0.3) -> LegoLM:
    """A 2 -> 5 layer LEGO model whose weights are redrawn with a wide spread.

    With N(0, 0.3) weights the shallow confidences spread from ~0.1 to ~0.7 (instead of all
    ~1/vocab), so a mid threshold makes some tokens exit and others not, and greedy argmaxes have
    no near-ties.
    """
    torch.manual_seed(0)
    model = LegoLM(ModelConfig.from_name(preset, vocab_size=VOCAB))
    model.mark_trained()
    model.extend(DEPTH, 0.5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def prompt(batch: int = 1, length: int = 6, seed: int = 0) -> Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def mid_threshold(model: LegoLM, ids: Tensor) -> float:
    """The median shallow confidence along a full-depth continuation: about half the tokens exit."""
    full = generate_with_early_exit(model, ids, N_NEW, None).tokens
    conf = model.forward_exits(torch.cat([ids, full], 1)).conf[:, ids.shape[1] - 1 :]
    return float(conf.median())


def recompute(model: LegoLM, ids: Tensor, tokens: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Without any cache: which generated tokens exit at τ, and the logits each comes from (B, N, V)."""
    seq = torch.cat([ids, tokens], 1)[:, :-1]
    out = model.forward_exits(seq)
    assert out.deep_logits is not None
    P = ids.shape[1]
    ex = exits(out.conf[:, P - 1 :], tau)
    return ex, torch.where(ex[..., None], out.shallow_logits[:, P - 1 :], out.deep_logits[:, P - 1 :])


def count_layer_calls(model: LegoLM) -> tuple[list[int], list[torch.utils.hooks.RemovableHandle]]:
    """Forward hooks on every block: [calls, token evaluations (the T of each call's input)]."""
    counts = [0, 0]

    def hook(_module: object, args: tuple[Tensor, ...], _out: object) -> None:
        counts[0] += 1
        counts[1] += args[0].shape[1]

    return counts, [block.register_forward_hook(hook) for block in model.blocks]


# -- the two extremes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kv_mode", ["fill", "skip", "propagate"])
def test_never_exit_equals_full_depth_greedy(preset: str, kv_mode: str) -> None:
    model, ids = lego_model(preset), prompt()
    out = generate_with_early_exit(model, ids, N_NEW, 1.0, kv_mode=kv_mode)  # type: ignore[arg-type]
    ref = generate(model, ids.tolist(), GenerationConfig(max_new_tokens=N_NEW, greedy=True, stop_at_eos=False))
    assert out.tokens.tolist() == ref.tokens
    assert out.stats.shallow_count == 0 and out.stats.deep_count == N_NEW
    assert out.stats.actual_compute_cost == 1.0


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kv_mode", ["fill", "skip", "propagate"])
def test_always_exit_equals_shallow_model_alone(preset: str, kv_mode: str) -> None:
    model, ids = lego_model(preset), prompt()
    out = generate_with_early_exit(model, ids, N_NEW, 0.0, kv_mode=kv_mode)  # type: ignore[arg-type]
    shallow = model.shallow_model()
    assert shallow.config.n_layer == SPLIT
    ref = generate(shallow, ids.tolist(), GenerationConfig(max_new_tokens=N_NEW, greedy=True, stop_at_eos=False))
    assert out.tokens.tolist() == ref.tokens
    assert out.stats.shallow_ratio == 1.0
    assert out.stats.actual_compute_cost == pytest.approx(SPLIT / DEPTH)
    deep = generate(model, ids.tolist(), GenerationConfig(max_new_tokens=N_NEW, greedy=True, stop_at_eos=False))
    assert deep.tokens != ref.tokens  # the two extremes really differ on this model


# -- mixed routing: exact against recomputation ---------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_fill_mode_equals_recomputation_without_cache(preset: str) -> None:
    model, ids = lego_model(preset), prompt()
    tau = mid_threshold(model, ids)
    out = generate_with_early_exit(model, ids, N_NEW, tau, kv_mode="fill", output_logits=True)
    assert 0 < out.stats.shallow_count < N_NEW  # a real mix of exits and deep tokens
    assert out.logits is not None
    ex, logits = recompute(model, ids, out.tokens, tau)
    assert out.exited.tolist() == ex.tolist()
    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=1e-4)
    assert out.tokens.tolist() == logits.argmax(-1).tolist()


def test_fill_mode_queues_consecutive_exits_into_one_call() -> None:
    model, ids = lego_model("tiny-pythia"), prompt()
    tau = mid_threshold(model, ids)
    out = generate_with_early_exit(model, ids, N_NEW, tau, kv_mode="fill")
    flags = out.exited[0, 1:].tolist()  # steps 1.. (step 0 is decided by the prefill)
    runs = [i for i in range(1, len(flags)) if flags[i - 1] and not flags[i]]
    assert runs, "need an exited step followed by a deep one"
    # token-layer evaluations count the queued tokens; layer calls do not
    assert out.stats.actual_compute_cost > out.stats.call_cost


@pytest.mark.parametrize("preset", ["tiny-pythia", "tiny-llama"])
def test_skip_mode_uses_cumulative_rope_positions(preset: str) -> None:
    """Skip mode: the upper layers saw only prompt + deep tokens, each at its true position."""
    model, ids = lego_model(preset), prompt()
    tau = mid_threshold(model, ids)
    out = generate_with_early_exit(model, ids, N_NEW, tau, kv_mode="skip", output_logits=True)
    assert out.logits is not None
    P = ids.shape[1]
    ex = out.exited[0].tolist()
    deep_steps = [t for t in range(1, N_NEW) if not ex[t]]
    assert any(ex[1:t].count(True) for t in deep_steps), "need a deep token after an exited one"
    h_s = model.lower(torch.cat([ids, out.tokens], 1)[:, :-1])  # (1, P + N - 1, C), no cache
    kept = list(range(P)) + [P + t - 1 for t in deep_steps]

    def deep_logits(positions: list[int]) -> Tensor:
        return model.forward_upper_layers(h_s[:, kept], positions=torch.tensor([positions]))[0]

    cumulative = deep_logits(kept)
    for j, t in enumerate(deep_steps):
        torch.testing.assert_close(out.logits[0, t], cumulative[P + j], atol=1e-4, rtol=1e-4)
    if not ex[0]:
        torch.testing.assert_close(out.logits[0, 0], cumulative[P - 1], atol=1e-4, rtol=1e-4)
    dense = deep_logits(list(range(len(kept))))  # slot indices as positions: what skip must NOT do
    after_exit = [P + j for j, t in enumerate(deep_steps) if any(ex[1:t])]
    assert (dense[after_exit] - cumulative[after_exit]).abs().max() > 1e-3


@pytest.mark.parametrize("preset", ["tiny-pythia", "tiny-llama", "tiny-gpt2"])
def test_write_kv_matches_the_keys_and_values_the_layer_writes(preset: str) -> None:
    """propagate: the K/V-only projection equals what the block's own attention stores (RoPE included)."""
    model = lego_model(preset)
    block = model.blocks[SPLIT]
    cfg = model.config
    h = torch.randn(1, 3, cfg.n_embd, generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([4, 5, 6])
    ctx = model.make_context(pos[None], h.dtype, input_pos=pos)
    ctx.attn_bias = None  # plain causal attention over the 3 tokens; the cache write is what is compared
    own, ours = (LayerKVCache(1, cfg.kv_heads, 8, cfg.hd, torch.float32, "cpu") for _ in range(2))
    assert isinstance(block.attn, CausalSelfAttention)
    block.attn(block.norm_1(h), ctx, own)
    write_kv(block, h, ctx, ours)
    torch.testing.assert_close(ours.k, own.k)
    torch.testing.assert_close(ours.v, own.v)
    assert ours.k[:, :, 4:7].abs().sum() > 0


# -- compute accounting ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_mode", ["fill", "skip", "propagate"])
def test_compute_cost_equals_layer_calls_counted_by_hooks(kv_mode: str) -> None:
    model, ids = lego_model("tiny-pythia"), prompt()
    tau = mid_threshold(model, ids)
    counts, handles = count_layer_calls(model)
    out = generate_with_early_exit(model, ids, N_NEW, tau, kv_mode=kv_mode)  # type: ignore[arg-type]
    for h in handles:
        h.remove()
    s, (calls, evals) = out.stats, counts
    P = ids.shape[1]
    assert s.layer_calls == calls
    assert s.decode_steps == N_NEW - 1
    assert s.call_cost == pytest.approx((calls - DEPTH) / (s.decode_steps * DEPTH))
    assert s.token_layer_evals == evals - DEPTH * P  # the prefill's blocks each saw the P prompt tokens
    assert s.actual_compute_cost == pytest.approx((evals - DEPTH * P) / (s.decode_steps * DEPTH))
    exited_steps = int(out.exited[0, 1:].sum())
    assert calls == DEPTH + s.decode_steps * SPLIT + (s.decode_steps - exited_steps) * (DEPTH - SPLIT)
    assert 0 < exited_steps < s.decode_steps
    if kv_mode == "fill":  # queued tokens run later: only the exits after the last deep step are saved
        trailing = len(out.exited[0]) - 1 - max(t for t in range(1, N_NEW) if not out.exited[0, t])
        assert s.token_layer_evals == s.decode_steps * DEPTH - trailing * (DEPTH - SPLIT)
    else:
        assert s.actual_compute_cost == s.call_cost
    assert s.kv_projections == (exited_steps * (DEPTH - SPLIT) if kv_mode == "propagate" else 0)


def test_full_depth_baseline_runs_every_layer_without_the_shallow_exit() -> None:
    model, ids = lego_model("tiny-llama"), prompt()
    head_calls = [0]
    assert model.shallow_exit is not None
    handle = model.shallow_exit.register_forward_hook(lambda *_: head_calls.__setitem__(0, head_calls[0] + 1))
    out = generate_with_early_exit(model, ids, N_NEW, None)
    handle.remove()
    assert head_calls[0] == 0
    assert out.stats.actual_compute_cost == 1.0 and out.stats.deep_count == N_NEW
    assert out.tokens.tolist() == generate_with_early_exit(model, ids, N_NEW, 1.0).tokens.tolist()


# -- batches, EOS, sampling, bad input ------------------------------------------------------------------
def test_batch_rows_in_fill_mode_equal_their_batch_one_runs() -> None:
    model, ids = lego_model("tiny-pythia"), prompt(batch=3, seed=4)
    tau = mid_threshold(model, ids[:1])
    out = generate_with_early_exit(model, ids, N_NEW, tau, kv_mode="fill")
    for b in range(3):
        alone = generate_with_early_exit(model, ids[b : b + 1], N_NEW, tau, kv_mode="fill")
        assert out.tokens[b].tolist() == alone.tokens[0].tolist()
        assert out.exited[b].tolist() == alone.exited[0].tolist()
    # the upper layers ran in a step unless every row exited
    deep_steps = int((~out.exited[:, 1:].all(0)).sum())
    assert out.stats.layer_calls == DEPTH + (N_NEW - 1) * SPLIT + deep_steps * (DEPTH - SPLIT)


def test_eos_stops_rows_and_trims_the_stats() -> None:
    model, ids = lego_model("tiny-pythia"), prompt()
    free = generate_with_early_exit(model, ids, N_NEW, 0.2)
    eos = int(free.tokens[0, 5])
    first = free.tokens[0].tolist().index(eos)
    out = generate_with_early_exit(model, ids, N_NEW, 0.2, eos_id=eos)
    assert out.tokens[0].tolist() == free.tokens[0, : first + 1].tolist()
    assert out.stats.shallow_count + out.stats.deep_count == first + 1


def test_sampling_is_seeded() -> None:
    model, ids = lego_model("tiny-pythia"), prompt()
    kw = dict(greedy=False, temperature=0.8, top_k=20, seed=5)
    a = generate_with_early_exit(model, ids, N_NEW, 0.3, **kw)  # type: ignore[arg-type]
    b = generate_with_early_exit(model, ids, N_NEW, 0.3, **kw)  # type: ignore[arg-type]
    assert a.tokens.tolist() == b.tokens.tolist()


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"routing_threshold": 1.5}, "[0, 1]"),
    ({"routing_threshold": -0.1}, "[0, 1]"),
    ({"routing_threshold": float("nan")}, "[0, 1]"),
    ({"kv_mode": "lazy"}, "kv_mode"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 500}, "context"),
])
def test_bad_input_is_a_clear_config_error(kwargs: dict[str, object], fragment: str) -> None:
    model = lego_model("tiny-pythia")
    args: dict[str, object] = {"max_new_tokens": 4, "routing_threshold": 0.5, **kwargs}
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        generate_with_early_exit(model, prompt(), **args)  # type: ignore[arg-type]


def test_shallow_model_cannot_early_exit() -> None:
    model = LegoLM(ModelConfig.from_name("tiny-pythia"))
    with pytest.raises(ConfigError, match="extend"):
        generate_with_early_exit(model, prompt(), 4, 0.5)


def test_decode_path_nll_in_fill_mode_equals_the_hard_routed_full_forward() -> None:
    """Teacher-forced scoring through the decode path (fill) = generation's rule on one full forward."""
    from legolm.generation.early_exit import decode_path_nll
    from legolm.lego.evaluate import TokenScores

    model, ids = lego_model("tiny-llama"), prompt(batch=2, length=20, seed=7)
    tau = mid_threshold(model, ids[:1, :6])
    with torch.no_grad():
        out = model.forward_exits(ids[:, :-1])
    assert out.deep_logits is not None
    labels = ids[:, 1:, None]
    scores = TokenScores(out.shallow_logits.log_softmax(-1).gather(-1, labels)[:, 5:].flatten(),
                         out.deep_logits.log_softmax(-1).gather(-1, labels)[:, 5:].flatten(), out.conf[:, 5:].flatten())
    nll, n, ratio = decode_path_nll(model, ids, 6, tau, "fill")
    assert n == 2 * 14 and 0 < ratio < 1
    assert nll / n == pytest.approx(torch.tensor(scores.hard_routed_ppl(tau)).log().item(), rel=1e-5)
    skip_nll, _, _ = decode_path_nll(model, ids, 6, tau, "skip")
    assert skip_nll != pytest.approx(nll, rel=1e-6)  # skip's cache is approximate: a different score


def test_macs_cost_charges_the_shallow_exit_by_hand() -> None:
    """Weight multiply-adds per step: blocks' linear weights, V·C per exit head, 2·C·H_kv·D per propagated K/V."""
    model, ids = lego_model("tiny-pythia"), prompt()
    cfg = model.config
    block = sum(m.weight.numel() for m in model.blocks[0].modules() if isinstance(m, torch.nn.Linear))
    head = cfg.vocab_size * cfg.n_embd
    full = DEPTH * block + head
    assert generate_with_early_exit(model, ids, N_NEW, None).stats.macs_cost == 1.0
    never = generate_with_early_exit(model, ids, N_NEW, 1.0).stats.macs_cost
    assert never == pytest.approx((full + head) / full)  # the routed loop pays the shallow head on every step
    always = generate_with_early_exit(model, ids, N_NEW, 0.0, kv_mode="skip").stats.macs_cost
    assert always == pytest.approx((SPLIT * block + head) / full)
    prop = generate_with_early_exit(model, ids, N_NEW, 0.0, kv_mode="propagate").stats.macs_cost
    kv = 2 * cfg.n_embd * cfg.kv_heads * cfg.hd
    assert prop == pytest.approx((SPLIT * block + head + (DEPTH - SPLIT) * kv) / full)
