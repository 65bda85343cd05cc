"""LEGO decoding through `generate`: the fused early-exit decoders (Triton's interpreter off the GPU)
against the torch early-exit loop, self-speculative decoding (eager and fused) against full-depth greedy
decoding, the multi-token row kernels against torch, the costs they report, and bad input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from legolm.checkpoints.loader import load
from legolm.core.config import ModelConfig
from legolm.errors import ConfigError
from legolm.generation import GenerationConfig, generate
from legolm.generation.early_exit import generate_speculative, generate_with_early_exit
from legolm.generation.fused import FusedBlocks
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


# -- the row passes: bit for bit the one-token kernels ---------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("prompt_len", [2, 5])
@pytest.mark.parametrize("split_k", [False, True], ids=["five-kernels", "split-k-exact"])
def test_a_row_pass_gives_the_one_token_steps_bit_for_bit(preset: str, prompt_len: int, split_k: bool) -> None:
    """The upper blocks over 3 rows equal 3 one-token steps exactly (same K/V cache, same final states):
    the identity self-speculative decoding relies on. The earlier rows sit in the attention's first tile of
    4 slots (prompt of 2) or in a later one (prompt of 5). Split-K: the exact fixed-point sums."""
    assert_row_pass_is_one_token_steps(lego_model(preset).to(DEVICE), prompt_len, split_k=split_k)


def assert_row_pass_is_one_token_steps(model: LegoLM, P: int, block: int = 4, split_k: bool = False) -> None:
    """Upper blocks over 3 rows at positions P.. against 3 one-token steps (the model's device and dtype)."""
    from legolm.core.kv_cache import KVCache
    from legolm.generation.fused import FusedStack
    from legolm.kernels.decode import to_residual

    p = next(model.parameters())
    c, rows = model.config, 3
    stack = FusedStack(model, attention_block=block, embed_block=32, tune=False, rows=rows, split_k=split_k,
                       exact_sums=True)
    caches = [KVCache(c, 1, P + 16, dtype=p.dtype, device=p.device) for _ in range(2)]
    g = torch.Generator().manual_seed(3)
    prompt_h = torch.randn(1, P, c.n_embd, generator=g).to(p.device, p.dtype)
    with torch.no_grad():
        for cache in caches:  # the same prompt K/V in both caches
            model.upper_hidden(prompt_h, cache=cache, input_pos=torch.arange(P, device=p.device))
    h = to_residual(torch.randn(rows, c.n_embd, generator=g).to(p.device), stack.x)
    one = []
    for m in range(rows):  # one token at a time, positions P..P+2
        stack.x.copy_(h[m])
        pos = torch.tensor([P + m], device=p.device)
        stack.blocks(model, caches[0], model.split, model.n_layer, pos, pos)
        one.append(stack.x.clone())
    stack.X.copy_(h)
    stack.start.fill_(P)
    stack.rows_blocks(model, caches[1], model.split, model.n_layer, rows)
    assert torch.equal(stack.X, torch.stack(one))
    for i in range(model.split, model.n_layer):
        assert torch.equal(caches[0].layers[i].k, caches[1].layers[i].k)
        assert torch.equal(caches[0].layers[i].v, caches[1].layers[i].v)


# -- threshold early exit: fused = the torch loop -------------------------------------------------------
@pytest.mark.parametrize(("preset", "kv_mode", "kernel"), [(p, "skip", "blocks") for p in PRESETS] + [
    ("tiny-llama", "fill", "blocks"), ("tiny-gpt2", "fill", "blocks"), ("tiny-pythia", "fill", "splitk"),
    ("tiny-llama", "skip", "splitk"), ("tiny-gpt2", "skip", "splitk"), ("tiny-gpt2", "fill", "splitk-exact")])
def test_fused_early_exit_equals_the_torch_loop(preset: str, kv_mode: str, kernel: FusedBlocks) -> None:
    """Same tokens, same exits, same shallow ratio: the fused decoder's decisions (confidence from the
    head's partial sums, fill-mode flushes of the queue) are those of `generate_with_early_exit`; with split-K
    blocks too (one token and the flush rows; exact sums: the queue's lower states kept in fixed point)."""
    model, ids = lego_model(preset).to(DEVICE), prompt().to(DEVICE)
    tau = mid_threshold(model.cpu(), ids.cpu())
    model.to(DEVICE)
    ref = generate_with_early_exit(model, ids, N_NEW, tau, kv_mode=kv_mode)
    got = generate(model, ids.tolist(), greedy(early_exit="threshold", threshold=tau, kv_mode=kv_mode, fused=True,
                                               fused_tune=False, fill_buckets=[1, 2, 4, 8], fused_kernel=kernel))
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
@pytest.mark.parametrize(("fused", "drafts", "kernel"), [(False, (1, 3), "blocks"), (True, (2,), "blocks"),
                                                         (True, (2,), "splitk")])
def test_speculative_output_is_full_depth_greedy(preset: str, fused: bool, drafts: tuple[int, ...],
                                                 kernel: FusedBlocks) -> None:
    model, ids = drafting_model(preset).to(DEVICE), prompt().to(DEVICE)
    n = N_NEW if not fused else N_NEW // 2  # the interpreter is slow
    want = generate(model, ids.tolist(), greedy(max_new_tokens=n)).tokens
    for d in drafts:
        got = generate(model, ids.tolist(), greedy(max_new_tokens=n, early_exit="speculative", draft_tokens=d,
                                                   fused=fused, fused_tune=False, fused_kernel=kernel))
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


def drafted_model() -> LegoLM:
    """`drafting_model` with a draft exit that is a copy of the deep norm and head (drafts mostly accepted) and a
    shallow exit redrawn at random (its drafts mostly rejected): which exit drafts shows in the acceptance."""
    model = drafting_model("tiny-llama")
    draft = model.add_draft_exit()  # the shallow exit's copy: here equal to the deep exit's norm and head
    assert model.shallow_exit is not None and draft.head is not model.shallow_exit.head
    with torch.no_grad():
        w = model.shallow_exit.head.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
    return model


@pytest.mark.parametrize("fused", [False, True])
def test_speculative_drafts_with_the_draft_exit_and_stays_lossless(fused: bool) -> None:
    model, ids = drafted_model().to(DEVICE), prompt().to(DEVICE)
    n = N_NEW if not fused else N_NEW // 2  # the interpreter is slow
    want = generate(model, ids.tolist(), greedy(max_new_tokens=n)).tokens
    spec = greedy(max_new_tokens=n, early_exit="speculative", draft_tokens=2, fused=fused, fused_tune=False)
    with_draft = generate(model, ids.tolist(), spec)
    draft_exit, model.draft_exit = model.draft_exit, None  # the shallow exit drafts again
    with_shallow = generate(model, ids.tolist(), spec)
    model.draft_exit = draft_exit
    assert with_draft.tokens == want and with_shallow.tokens == want  # lossless with either drafter
    assert with_draft.early_exit is not None and with_shallow.early_exit is not None
    rate_draft, rate_shallow = with_draft.early_exit.acceptance_rate, with_shallow.early_exit.acceptance_rate
    assert rate_draft > rate_shallow + 0.3, (rate_draft, rate_shallow)


@pytest.mark.parametrize("fused", [False, True])
def test_threshold_early_exit_never_reads_the_draft_exit(fused: bool) -> None:
    model, ids = drafted_model().to(DEVICE), prompt().to(DEVICE)
    n = N_NEW if not fused else N_NEW // 2
    tau = mid_threshold(model, ids)
    cfg = greedy(max_new_tokens=n, early_exit="threshold", threshold=tau, kv_mode="skip", fused=fused,
                 fused_tune=False)
    got = generate(model, ids.tolist(), cfg)
    model.draft_exit = None
    plain = generate(model, ids.tolist(), cfg)
    assert got.tokens == plain.tokens and got.early_exit is not None and plain.early_exit is not None
    assert got.early_exit.shallow_ratio == plain.early_exit.shallow_ratio > 0


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


@pytest.mark.parametrize(("mode", "kv_mode", "runner"), [
    ("threshold", "skip", "parts"), ("threshold", "fill", "parts"), ("threshold", "skip", "graph"),
    ("speculative", "fill", "graph"), ("speculative", "fill", "rounds")])
@pytest.mark.skipif(torch.cuda.is_available(), reason="emulates the GPU runners on the CPU; on a GPU, "
                    "tests/test_cuda.py runs the real ones")
def test_the_gpu_runners_control_flow_on_the_cpu(monkeypatch: pytest.MonkeyPatch, mode: str, kv_mode: str,
                                                 runner: str) -> None:
    """The GPU runners' control flow with graphs replaced by their recorded functions: a step as graphs of its
    parts with the conditions read once (threshold), several steps per replay with each branch an IF node
    (threshold; the node's condition read where it would run), several rounds per replay, each an IF node
    gated on "more tokens wanted" (speculative "graph") or ungated ("rounds"). Tokens as the eager runner
    gives them; the routing and acceptance stats too, except for ungated rounds (they count the overshoot).
    Threshold steps end exactly at the call's last token (smaller graphs for its tail); the start (reset,
    prefill, first token) replays as a graph per prompt length."""
    import legolm.generation.fused_early_exit as fe

    model = (drafting_model if mode == "speculative" else lego_model)("tiny-llama")
    ids = prompt()
    n = N_NEW // 2
    tau = mid_threshold(model, ids)
    cfg = greedy(max_new_tokens=n, early_exit=mode, threshold=tau if mode == "threshold" else None, kv_mode=kv_mode,
                 draft_tokens=2, fused=True, fused_tune=False, fill_buckets=[1, 2, 4], graph_steps=3,
                 session_cache_size=0)
    eager = generate(model, ids.tolist(), cfg)  # the CPU's own runner: kernels one by one
    monkeypatch.setattr(fe, "_record", _Replayed)
    monkeypatch.setattr(fe, "_conditional", fe._host_branch)  # an IF node: its body runs where the flag is set
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    init = fe.FusedLegoSession.__init__

    def gpu_init(self: fe.FusedLegoSession, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)  # type: ignore[arg-type]
        self.runner = runner
        self.prefill_graphs = 2  # the start as a "graph" per prompt length, as on a GPU

    def capture(fn: Callable[[], object]) -> tuple[_Replayed, None]:  # decoder.capture: warm-up run, then record
        fn()
        return _Replayed(lambda graph: fn()), None

    monkeypatch.setattr(fe.FusedLegoSession, "__init__", gpu_init)
    monkeypatch.setattr(fe, "capture", capture)
    read_back, steps_run = fe.FusedLegoSession.read_back, []

    def counting_read_back(self: fe.FusedLegoSession) -> object:
        steps_run.append(int(self.state.t))  # tokens emitted on the device, past the call's end included
        return read_back(self)

    monkeypatch.setattr(fe.FusedLegoSession, "read_back", counting_read_back)
    got = generate(model, ids.tolist(), cfg)
    if mode == "threshold":  # 11 steps after the first token: graphs of 3, 3, 3 and a tail of 2, none past the end
        assert steps_run == [n]
    want = generate_with_early_exit(model, ids, n, tau, kv_mode=kv_mode).tokens.tolist() if mode == "threshold" \
        else generate(model, ids.tolist(), greedy(max_new_tokens=n)).tokens
    assert got.tokens == want
    stats = [(e.shallow_count, e.deep_count, e.call_cost, e.rounds, e.accepted) for e in (got.early_exit,
                                                                                          eager.early_exit)
             if e is not None]
    assert len(stats) == 2
    if mode == "threshold":
        assert stats[0] == stats[1]
        assert 0 < stats[0][0] < n and stats[0][1] > 0  # both exits taken
    else:  # ungated replays run 3 rounds each: past the last token unless the rounds happen to fit
        assert (stats[0] == stats[1]) == (runner == "graph" or stats[1][3] % 3 == 0)
        assert 0 < stats[1][4] < 2 * stats[1][3]  # some drafts accepted, not all


@pytest.mark.parametrize("mode", ["threshold", "speculative"])
def test_fused_decoding_of_a_pretrained_split_with_its_lens(mode: str) -> None:
    """A pretrained split's exit reads through its lens in the fused kernels too (one more GEMV)."""
    torch.manual_seed(0)
    base = TransformerLM(ModelConfig.from_name("tiny-llama", vocab_size=97, layers=["llama"] * 4))
    model = LegoLM.from_pretrained_split(base, 2)
    assert model.shallow_exit is not None and model.shallow_exit.lens is not None
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
        C = model.config.n_embd
        model.shallow_exit.lens.weight.copy_(torch.eye(C) + 0.2 * torch.randn(C, C))
    model.mark_trained()
    model, ids = model.to(DEVICE), prompt().to(DEVICE)
    n = N_NEW // 2
    if mode == "threshold":
        tau = mid_threshold(model, ids)
        want = generate_with_early_exit(model, ids, n, tau, kv_mode="skip").tokens.tolist()
        cfg = greedy(max_new_tokens=n, early_exit="threshold", threshold=tau, kv_mode="skip", fused=True,
                     fused_tune=False)
    else:
        want = generate(model, ids.tolist(), greedy(max_new_tokens=n)).tokens
        cfg = greedy(max_new_tokens=n, early_exit="speculative", draft_tokens=2, fused=True, fused_tune=False)
    assert generate(model, ids.tolist(), cfg).tokens == want


def test_speculative_on_the_real_smollm2_is_its_greedy_output(smollm2_gguf: Path, shakespeare_text: str) -> None:
    """The real SmolLM2-135M split after 24 of its 30 blocks (its logit lens as the drafter): self-speculative
    decoding of real text emits exactly the full model's greedy tokens, with drafts both kept and rejected."""
    base, tokenizer = load(smollm2_gguf)
    model = LegoLM.from_pretrained_split(base.float().eval(), 24).eval()
    model.mark_trained()
    ids = tokenizer.encode(shakespeare_text[:400])[:48]
    want = generate(model, [ids], greedy(max_new_tokens=16)).tokens
    got = generate(model, [ids], greedy(max_new_tokens=16, early_exit="speculative", draft_tokens=3))
    assert got.tokens == want
    assert got.early_exit is not None and 0.0 < got.early_exit.acceptance_rate < 1.0


def test_decode_timing_builds_each_settings_session_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """`measure_decode` times settings round-robin; each one's fused session (graphs) must survive the others,
    else every timed call would recapture its graphs. The fake `generate` keeps sessions as `_lego_session`
    does: an LRU of ``session_cache_size`` keyed by what differs between settings (τ is not in the key)."""
    from collections import OrderedDict

    from legolm.generation.generate import GenerationResult
    from legolm.lego import report

    sessions: OrderedDict[tuple[object, ...], None] = OrderedDict()
    built: list[tuple[object, ...]] = []

    def fake_generate(model: object, prompts: list[list[int]], cfg: GenerationConfig) -> GenerationResult:
        key = (cfg.early_exit, cfg.kv_mode, cfg.draft_tokens, cfg.fused_if_nodes)
        if key in sessions:
            sessions.move_to_end(key)
        else:
            built.append(key)
            sessions[key] = None
            while len(sessions) > cfg.session_cache_size:
                sessions.popitem(last=False)
        return GenerationResult([[0] * cfg.max_new_tokens], 0.001 * len(built), 0.002, cfg.max_new_tokens)

    monkeypatch.setattr(report, "generate", fake_generate)
    settings = [report.Setting("full", "full"), report.Setting("fill", "threshold", 0.5, "fill"),
                report.Setting("fill 2", "threshold", 0.2, "fill"), report.Setting("skip", "threshold", 0.5, "skip"),
                report.Setting("skip IF", "threshold", 0.5, "skip", if_nodes=True),
                report.Setting("fill IF", "threshold", 0.5, "fill", if_nodes=True),
                report.Setting("d=2", "speculative", draft_tokens=2),
                report.Setting("d=4", "speculative", draft_tokens=4)]
    measured = report.measure_decode(torch.nn.Linear(1, 1), torch.zeros(2, 3, dtype=torch.long), settings, 4,  # type: ignore[arg-type]
                                     fused=True, kernel="splitk", repeats=2, warmup=1)
    assert len(measured) == len(settings) and all(m.tokens == 8 for m in measured)
    assert len(built) == len(set(built)) == 7  # the two fill rows share a session; nothing built twice
    # each call's prefill and decode seconds are the means of the last round's calls (here: 7 builds done)
    assert all(m.prefill_s == pytest.approx(0.007) and m.decode_s == pytest.approx(0.002) for m in measured)


def test_report_rows_run_the_decoder_they_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A timed row's runner: threshold rows the branch they name (IF nodes or the host read), speculative rows
    the user's default (rounds gated by IF nodes), where the driver has IF nodes."""
    from legolm.generation import fused_early_exit
    from legolm.generation.fused_early_exit import FusedExitConfig, pick_runner
    from legolm.lego.report import Setting

    monkeypatch.setattr(fused_early_exit.graph_if, "unavailable_reason", lambda device=None: None)
    rows = [(Setting("skip", "threshold", 0.5, "skip"), "parts"),
            (Setting("skip IF", "threshold", 0.5, "skip", if_nodes=True), "graph"),
            (Setting("d=2", "speculative", draft_tokens=2), "graph")]
    for setting, runner in rows:
        cfg = setting.config(8, True, "splitk")
        fx = FusedExitConfig(mode=cfg.early_exit, kv_mode=cfg.kv_mode, if_nodes=cfg.fused_if_nodes)
        assert pick_runner(fx, torch.device("cuda", 0)) == runner, setting.label


@pytest.mark.parametrize(("mode", "kv_mode", "if_nodes", "missing", "runner", "warns"), [
    ("threshold", "skip", None, None, "graph", False),  # auto: IF nodes where they measured faster
    ("threshold", "fill", None, None, "parts", False),  # auto: the host read where it measured faster
    ("threshold", "fill", True, None, "graph", False),
    ("threshold", "skip", False, None, "parts", False),
    ("threshold", "skip", None, "no CUDA driver", "parts", False),  # auto falls back quietly
    ("threshold", "skip", True, "no CUDA driver", "parts", True),  # asked for by name: says why not
    ("speculative", "skip", None, None, "graph", False),  # every round an IF node: none past the last token
    ("speculative", "skip", False, None, "rounds", False),
    ("speculative", "skip", None, "no CUDA driver", "rounds", False),
    ("speculative", "skip", True, "no CUDA driver", "rounds", True),
])
def test_the_runner_follows_the_if_node_setting(monkeypatch: pytest.MonkeyPatch, mode: str, kv_mode: str,
                                                if_nodes: bool | None, missing: str | None, runner: str,
                                                warns: bool) -> None:
    import warnings

    from legolm.generation import fused_early_exit
    from legolm.generation.fused_early_exit import FusedExitConfig, pick_runner

    monkeypatch.setattr(fused_early_exit.graph_if, "unavailable_reason", lambda device=None: missing)
    config = FusedExitConfig(mode=mode, kv_mode=kv_mode, if_nodes=if_nodes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pick_runner(config, torch.device("cuda", 0)) == runner
    assert bool(caught) == warns and all(missing in str(w.message) for w in caught if missing)
    assert pick_runner(config, torch.device("cpu")) == "eager"
