"""LEGO model and training: routing maths by hand, extend, threshold calibration, hard examples stored
once (and equal to recomputing the lower layers), the phase-2 loss, checkpoints, and both phases on
real text through `fit`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from legolm.checkpoints.loader import load_pretrained
from legolm.checkpoints.native import save_checkpoint
from legolm.core.config import ModelConfig
from legolm.data import DataConfig, TokenizedCorpus, prepare_corpus
from legolm.errors import CheckpointError, ConfigError
from legolm.lego.evaluate import TokenScores, score_tokens
from legolm.lego.hard_examples import collect_hard_examples, create_hard_example_loader, evaluate_on_hard_examples
from legolm.lego.threshold import compute_confidence_threshold, shallow_confidences
from legolm.lego.train import HardTokenLoss, RestoreBest, check_phase2, run_phase1, run_phase2
from legolm.model.lego import LegoLM, confidence, exits, quantile_threshold, routed_log_probs, routing_log_weights
from legolm.model.transformer import TransformerLM
from legolm.train.batches import WindowBatches
from legolm.train.config import EvalConfig, FitConfig, OptimConfig, RunConfig, ScheduleConfig
from legolm.train.fit import FitState

WINDOW = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> TokenizedCorpus:
    """Tiny Shakespeare (30 documents) with a 320-token BPE trained on its training documents."""
    cache = tmp_path_factory.mktemp("lego_data")
    return prepare_corpus(DataConfig(source="tinyshakespeare", tokenizer="bpe:320", max_documents=30,
                                     cache_dir=str(cache)), progress=False)


def shallow(preset: str = "tiny-pythia", vocab: int = 320, layers: int = 1, seed: int = 0) -> LegoLM:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name(preset, vocab_size=vocab, layers=[ModelConfig.from_name(preset).layers[0]] * layers)
    return LegoLM(cfg)


def extended(preset: str = "tiny-pythia", tau: float = 0.5) -> LegoLM:
    model = shallow(preset, layers=2)
    model.mark_trained()
    return model.extend(4, tau)


def windows(corpus: TokenizedCorpus, split: str = "val", batch: int = 4) -> WindowBatches:
    return WindowBatches(corpus.split(split), WINDOW, batch, shuffle=False, drop_last=False)


# -- routing maths, by hand -----------------------------------------------------------------------------
def test_confidence_is_the_max_softmax_probability() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])  # softmax [0.25, 0.75] and [0.5, 0.5]
    torch.testing.assert_close(confidence(logits), torch.tensor([0.75, 0.5]))


def test_routed_mixture_by_hand() -> None:
    p_s, p_d = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.3, 0.6])
    conf, tau, temp = torch.tensor(0.7), 0.5, 0.1
    w = 1 / (1 + math.exp(-(0.7 - 0.5) / 0.1))  # sigmoid(2) = 0.8808
    expected = torch.tensor([w * 0.7 + (1 - w) * 0.1, w * 0.2 + (1 - w) * 0.3, w * 0.1 + (1 - w) * 0.6])
    got = routed_log_probs(p_s.log(), p_d.log(), conf, tau, temp).exp()
    torch.testing.assert_close(got, expected)
    assert float(got.sum()) == pytest.approx(1.0)
    log_w, log_1mw = routing_log_weights(torch.tensor([0.7, 0.5, 0.1]), tau, temp)
    torch.testing.assert_close(log_w.exp(), torch.tensor([w, 0.5, 1 / (1 + math.exp(4.0))]))
    torch.testing.assert_close(log_1mw.exp(), 1 - log_w.exp())


def test_soft_routing_tends_to_the_generation_rule() -> None:
    lp_s, lp_d = torch.tensor([-0.5, -3.0, -1.0]), torch.tensor([-2.0, -0.2, -0.7])
    conf = torch.tensor([0.9, 0.2, 0.6])
    hard = torch.where(exits(conf, 0.5), lp_s, lp_d)
    torch.testing.assert_close(routed_log_probs(lp_s, lp_d, conf, 0.5, 1e-4), hard)


def test_exit_rule_extremes_are_exact() -> None:
    conf = torch.tensor([0.0, 0.3, 1.0])  # a saturated softmax reaches 1.0 in floating point
    assert exits(conf, 1.0).tolist() == [False, False, False]  # 1 = never exit
    assert exits(conf, 0.0).tolist() == [True, True, True]  # 0 = always exit
    assert exits(conf, 0.3).tolist() == [False, True, True]  # conf >= τ exits


# -- threshold -------------------------------------------------------------------------------------------
def test_quantile_threshold_by_hand() -> None:
    conf = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7])
    assert quantile_threshold(conf, 0.4) == pytest.approx(0.5)  # 0.1 and 0.3 (2 of 5) fall below
    assert quantile_threshold(conf, 0.5) == pytest.approx(0.5)  # floor(2.5) = 2 below
    assert quantile_threshold(conf, 0.99) == pytest.approx(0.9)


def test_calibrated_threshold_makes_the_target_ratio_hard(corpus: TokenizedCorpus) -> None:
    model = shallow().eval()
    val = windows(corpus)
    for ratio in (0.2, 0.5, 0.8):
        tau = compute_confidence_threshold(model, val, ratio)
        conf = shallow_confidences(model, val)
        assert float((conf < tau).float().mean()) == pytest.approx(math.floor(ratio * conf.numel()) / conf.numel())


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_target_ratio_outside_open_unit_interval_is_refused(corpus: TokenizedCorpus, ratio: float) -> None:
    with pytest.raises(ConfigError, match=r"target_ratio must be in \(0, 1\)"):
        compute_confidence_threshold(shallow(), windows(corpus), ratio)


# -- extend ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-pythia", "tiny-gpt2", "tiny-llama"])
def test_extend_copies_freezes_and_keeps_the_shallow_exit(preset: str) -> None:
    model = shallow(preset, layers=2)
    model.mark_trained()
    idx = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(idx)
    model.extend(5, 0.4)
    assert model.n_layer == 5 and model.split == 2 and model.extended and model.threshold == 0.4
    with torch.no_grad():
        out = model.forward_exits(idx)
    torch.testing.assert_close(out.shallow_logits, before)  # the calibrated exit is unchanged
    assert model.shallow_exit is not None and out.deep_logits is not None
    deep_head, shallow_head = model.lm_head.weight, model.shallow_exit.head.weight
    torch.testing.assert_close(deep_head, shallow_head)  # the deep exit starts as a copy ...
    assert deep_head.data_ptr() != shallow_head.data_ptr() != model.wte.weight.data_ptr()  # ... of its own
    frozen = [model.wte, *model.blocks[:2], model.shallow_exit]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    trainable = [*model.blocks[2:], model.norm]
    assert all(p.requires_grad for m in trainable for p in m.parameters())
    assert not model.lm_head.weight.requires_grad  # the deep head starts calibrated and stays so (default)
    model.freeze(True, train_deep_head=True)
    assert model.lm_head.weight.requires_grad and not model.shallow_exit.head.weight.requires_grad


def test_extend_refuses_bad_requests() -> None:
    with pytest.raises(ConfigError, match="trained shallow model"):
        shallow(layers=2).extend(4, 0.5)  # phase 1 never ran
    model = shallow(layers=2)
    model.mark_trained()
    for bad in (2, 1):
        with pytest.raises(ConfigError, match="num_layers > 2"):
            model.extend(bad, 0.5)
    for tau in (1.5, -0.01, float("nan")):
        with pytest.raises(ConfigError, match=r"\[0, 1\]"):
            model.extend(4, tau)
    model.extend(4, 0.5)
    with pytest.raises(ConfigError, match="already extended"):
        model.extend(6, 0.5)


# -- hard examples ---------------------------------------------------------------------------------------
def test_hard_examples_store_lower_states_masks_and_targets(corpus: TokenizedCorpus) -> None:
    model = extended().eval()
    batches = windows(corpus)
    conf = shallow_confidences(model, batches).view(-1, WINDOW)
    per_window_min = conf.min(1).values
    # τ just above the second-highest per-window minimum: exactly one window has no hard token
    top2 = per_window_min.topk(2).values
    tau = float((top2[0] + top2[1]) / 2)
    ex = collect_hard_examples(model, batches, tau)
    assert ex.windows_seen == conf.shape[0] and len(ex) == conf.shape[0] - 1
    kept = [i for i in range(conf.shape[0]) if per_window_min[i] < tau]
    ids = torch.from_numpy(corpus.val[: conf.shape[0] * WINDOW + 1].astype("int64"))
    x = torch.stack([ids[i * WINDOW : (i + 1) * WINDOW] for i in kept])
    y = torch.stack([ids[i * WINDOW + 1 : (i + 1) * WINDOW + 1] for i in kept])
    with torch.no_grad():
        h_s = model.lower(x)
        lp = model.shallow_head(h_s).log_softmax(-1)
    torch.testing.assert_close(ex.hidden, h_s)
    assert torch.equal(ex.labels, y)
    assert torch.equal(ex.hard, conf[kept] < tau)
    torch.testing.assert_close(ex.shallow_logp, lp.gather(-1, y[..., None])[..., 0])
    assert ex.n_hard == int((conf < tau).sum())


def test_hard_example_loader_is_a_resumable_batch_source(corpus: TokenizedCorpus) -> None:
    ex = collect_hard_examples(extended().eval(), windows(corpus), 0.5)
    loader = create_hard_example_loader(ex, batch_size=3, shuffle=True, seed=1)
    assert len(loader) == math.ceil(len(ex) / 3)
    epoch0 = [b["sample_ids"] for b in loader]
    assert sorted(torch.cat(epoch0).tolist()) == list(range(len(ex)))
    loader.set_epoch(1)
    assert [b["sample_ids"].tolist() for b in loader] != [s.tolist() for s in epoch0]
    loader.set_epoch(0)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    again = create_hard_example_loader(ex, batch_size=3, shuffle=True, seed=1)
    again.load_state_dict(state)
    assert [b["sample_ids"].tolist() for b in again] == [s.tolist() for s in epoch0[1:]]
    batch = epoch0 and next(iter(create_hard_example_loader(ex, 2, shuffle=False)))
    torch.testing.assert_close(batch["hidden"], ex.hidden[:2])


@pytest.mark.parametrize(("kind", "easy_weight"), [("routed", 0.0), ("deep", 0.0), ("deep", 0.25), ("routed", 1.0)])
def test_phase2_loss_on_stored_states_equals_full_recomputation(corpus: TokenizedCorpus, kind: str,
                                                                easy_weight: float) -> None:
    """Phase 2 never reruns the lower layers, yet its loss is that of the whole model on the windows
    (the easy tokens weighted by ``easy_weight``)."""
    model = extended().eval()
    tau = compute_confidence_threshold(model, windows(corpus), 0.5)
    model.meta.routing_threshold = tau
    ex = collect_hard_examples(model, windows(corpus), tau)
    batch = next(iter(create_hard_example_loader(ex, 4, shuffle=False)))
    loss, n, _ = HardTokenLoss(kind, easy_weight)(model, batch)  # type: ignore[arg-type]
    ids = torch.from_numpy(corpus.val[: 4 * WINDOW + 1].astype("int64"))
    x, y = ids[:-1].view(4, WINDOW), ids[1:].view(4, WINDOW)
    with torch.no_grad():
        out = model.forward_exits(x)
        assert out.deep_logits is not None
        logp = model.routed_log_probs(out) if kind == "routed" else out.deep_logits.log_softmax(-1)
    hard = out.conf < tau
    nll = -logp.gather(-1, y[..., None])[..., 0]
    expected = (nll[hard].sum() + easy_weight * nll[~hard].sum()) / (hard.sum() + easy_weight * (~hard).sum())
    assert int(n) == int(hard.sum()) > 0 and int((~hard).sum()) > 0
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_hard_example_evaluation_matches_full_forward_scores(corpus: TokenizedCorpus) -> None:
    model = extended().eval()
    val = windows(corpus)
    tau = compute_confidence_threshold(model, val, 0.5)
    model.meta.routing_threshold = tau
    ex = collect_hard_examples(model, val, tau)
    got = evaluate_on_hard_examples(model, ex, batch_size=5)
    scores = score_tokens(model, val)
    hard = scores.conf < tau
    on_hard = TokenScores(scores.shallow_logp[hard], scores.deep_logp[hard], scores.conf[hard])
    assert got["hard_tokens"] == int(hard.sum())
    assert got["shallow_ppl"] == pytest.approx(on_hard.shallow_ppl(), rel=1e-5)
    assert got["deep_ppl"] == pytest.approx(on_hard.deep_ppl(), rel=1e-5)
    assert got["routed_ppl"] == pytest.approx(on_hard.routed_ppl(tau, model.meta.routing_temperature), rel=1e-5)


@pytest.mark.parametrize(("tolerance", "tau"), [(1e-5, 0.8), (0.2, 0.3), (10.0, 0.2)])
def test_quality_calibration_takes_the_most_exits_within_tolerance(tolerance: float, tau: float) -> None:
    """Deep p = 0.5 everywhere (ppl 2); the shallow exit is right (0.5) on its two confident tokens and wrong
    (0.05) on the others. Near-hard routing (T = 1e-6; the token at τ itself gets w = 1/2): τ = 0.8 exits the
    good two (ppl 2); τ = 0.3 also half-exits a bad one (ppl 2·(0.5/0.275)^(1/4) = 2.32); τ = 0.2 is worse (4.13)."""
    half, bad = math.log(0.5), math.log(0.05)
    conf = torch.tensor([0.9, 0.8, 0.3, 0.2])
    scores = TokenScores(torch.tensor([half, half, bad, bad]), torch.full((4,), half), conf)
    assert scores.routed_ppl(0.3, 1e-6) == pytest.approx(2 * (0.5 / 0.275) ** 0.25, rel=1e-4)
    assert scores.quality_threshold(2.0, tolerance, 1e-6, grid=4) == pytest.approx(tau)


def test_quality_calibration_never_exits_when_nothing_holds_the_bound() -> None:
    scores = TokenScores(torch.full((4,), -5.0), torch.full((4,), -1.0), torch.tensor([0.99, 0.98, 0.97, 0.96]))
    assert scores.quality_threshold(math.e, 0.0, 0.05, grid=4) == 1.0


# -- checkpoints -----------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path: Path) -> None:
    """A LEGO model saves as a legolm checkpoint and loads back as a LegoLM (exits, τ, frozen flags)."""
    model = extended("tiny-llama", tau=0.37).eval()
    model.meta.routing_temperature = 0.02
    model.calibrate(0.37, 0.5, torch.rand(1000))
    save_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(Exception, match="already exists"):
        save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded, LegoLM) and loaded.meta == model.meta
    assert len(loaded.meta.confidence_quantiles) == 101
    idx = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        a, b = model.forward_exits(idx), loaded.forward_exits(idx)
        assert a.deep_logits is not None and b.deep_logits is not None
        torch.testing.assert_close(a.shallow_logits, b.shallow_logits, rtol=0, atol=0)
        torch.testing.assert_close(a.deep_logits, b.deep_logits, rtol=0, atol=0)
        torch.testing.assert_close(loaded(idx), a.deep_logits, rtol=0, atol=0)  # forward = the deep model
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in model.parameters()]
    # model.safetensors alone is the deep model: a plain loader of the weights sees no exit tensors
    from safetensors.torch import load_file

    assert not any(k.startswith("shallow_exit") for k in load_file(str(tmp_path / "ckpt" / "model.safetensors")))


def test_a_draft_exit_saves_and_loads_beside_the_shallow_exit(tmp_path: Path) -> None:
    """``lego/draft_exit.safetensors`` and the meta flag: the loaded drafter is the saved one; model.safetensors and
    the HF export hold the deep model alone; a model without a draft exit loads without one."""
    from safetensors.torch import load_file

    from legolm.checkpoints.native import export_hf

    plain = extended("tiny-llama", tau=0.37).eval()
    save_checkpoint(plain, tmp_path / "plain")
    assert not (tmp_path / "plain" / "lego" / "draft_exit.safetensors").exists()
    loaded_plain = load_pretrained(tmp_path / "plain")
    assert isinstance(loaded_plain, LegoLM) and loaded_plain.draft_exit is None and not loaded_plain.meta.draft_exit
    model = extended("tiny-llama", tau=0.37).eval()
    draft = model.add_draft_exit()
    assert model.shallow_exit is not None and draft.head is not model.shallow_exit.head  # a grown exit's own copy
    with torch.no_grad():
        draft.head.weight.add_(0.1 * torch.randn_like(draft.head.weight))
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded, LegoLM) and loaded.meta == model.meta and loaded.meta.draft_exit
    assert loaded.draft_exit is not None and loaded.drafter is loaded.draft_exit
    idx = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        h_s = loaded.lower(idx)
        torch.testing.assert_close(loaded.draft_logits(h_s), model.draft_logits(h_s), rtol=0, atol=0)
        torch.testing.assert_close(loaded.shallow_head(h_s), model.shallow_head(h_s), rtol=0, atol=0)
        assert not torch.equal(loaded.draft_logits(h_s), loaded.shallow_head(h_s))
    assert not any(p.requires_grad for p in loaded.draft_exit.parameters())
    deep = set(load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    assert deep == set(load_file(str(tmp_path / "plain" / "model.safetensors")))
    assert not any(k.startswith("draft_exit") for k in deep)
    hf = export_hf(loaded, tmp_path / "hf")
    assert not any("exit" in k for k in load_file(str(hf / "model.safetensors")))


def test_a_corrupt_lego_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    save_checkpoint(extended(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "lego.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid LEGO metadata"):
        load_pretrained(tmp_path / "ckpt")


def test_threshold_for_ratio_interpolates_the_stored_quantiles() -> None:
    model = extended()
    conf = torch.linspace(0, 1, 10001)  # uniform: the r-quantile is r
    model.calibrate(0.5, 0.5, conf)
    for r in (0.1, 0.25, 0.735):
        assert model.threshold_for_ratio(r) == pytest.approx(r, abs=1e-6)
    with pytest.raises(ConfigError, match=r"target_ratio must be in \(0, 1\)"):
        model.threshold_for_ratio(1.2)


# -- training through fit --------------------------------------------------------------------------------
def fit_config(out: Path, steps: int) -> FitConfig:
    return FitConfig(window=WINDOW, batch_size=8, max_steps=steps, optim=OptimConfig(lr=3e-3),
                     schedule=ScheduleConfig(warmup_steps=2), eval=EvalConfig(every=steps // 2, max_batches=6),
                     run=RunConfig(out_dir=str(out), device="cpu", progress=False, plot=False, log_every=5))


def test_two_phases_on_real_text(corpus: TokenizedCorpus, tmp_path: Path) -> None:
    model = shallow(layers=1)
    val = WindowBatches(corpus.val, WINDOW, 8, shuffle=False, drop_last=False)
    train = WindowBatches(corpus.train, WINDOW, 8, shuffle=True, seed=0)
    result1 = run_phase1(model, train, val, fit_config(tmp_path / "p1", 40))
    assert model.meta.trained and result1.steps == 40
    assert result1.evals[-1]["val_ppl"] < result1.evals[0]["val_ppl"] < 320  # learned something real
    model.eval()
    tau = compute_confidence_threshold(model, val, 0.5)
    model.extend(3, tau)
    hard_train = collect_hard_examples(model, WindowBatches(corpus.train, WINDOW, 8, shuffle=False), tau)
    hard_val = collect_hard_examples(model, val, tau)
    assert 0.3 < hard_val.hard_ratio < 0.7
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    upper = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    before = evaluate_on_hard_examples(model, hard_val)
    result2 = run_phase2(model, hard_train, hard_val, fit_config(tmp_path / "p2", 30))
    after = evaluate_on_hard_examples(model.eval(), hard_val)
    # phase 2 helps where the shallow model is unsure: held-out hard tokens, 30 steps from identity-initialised
    # upper layers under the frozen (calibrated) deep head: 4.155 -> 4.126 nats when this test was written
    assert after["routed_nll"] < before["routed_nll"] - 0.02
    assert result2.trainable_params == sum(p.numel() for p in upper.values())
    for name, value in frozen.items():  # embeddings, lower layer and shallow exit untouched
        assert torch.equal(dict(model.named_parameters())[name], value), name
    assert any(not torch.equal(dict(model.named_parameters())[n], v) for n, v in upper.items())


def test_phase2_needs_an_extended_model_with_frozen_lower_layers(corpus: TokenizedCorpus, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="extend"):
        check_phase2(shallow())
    model = shallow(layers=2)
    model.mark_trained()
    model.extend(3, 0.5, freeze_lower=False)
    with pytest.raises(ConfigError, match="frozen"):
        check_phase2(model)
    with pytest.raises(ConfigError, match="already extended"):
        run_phase1(extended(), windows(corpus), windows(corpus), fit_config(tmp_path / "x", 2))


def test_restore_best_loads_the_weights_of_the_best_evaluation() -> None:
    layer = torch.nn.Linear(2, 2)
    cb, state = RestoreBest(), FitState()
    values = {}
    for step, ppl in enumerate([9.0, 4.0, 6.0, 7.0]):
        with torch.no_grad():
            layer.weight.fill_(float(step))
        values[ppl] = layer.weight.detach().clone()
        cb.on_eval(state, layer, {"val_ppl": ppl})
    cb.on_train_end(state, layer)
    assert torch.equal(layer.weight, values[4.0])


def test_restore_best_gives_the_start_back_when_training_never_beats_it() -> None:
    layer = torch.nn.Linear(2, 2)
    start = layer.weight.detach().clone()
    cb, state = RestoreBest(start=(layer, 3.0)), FitState()
    for step, ppl in enumerate([9.0, 4.0]):
        with torch.no_grad():
            layer.weight.fill_(float(step))
        cb.on_eval(state, layer, {"val_ppl": ppl})
    cb.on_train_end(state, layer)
    assert torch.equal(layer.weight, start)


@pytest.mark.parametrize("preset", ["tiny-pythia", "tiny-gpt2", "tiny-llama"])
def test_identity_init_makes_the_deep_exit_start_equal_to_the_shallow_one(preset: str) -> None:
    """Function-preserving growth: every new block is the identity, the deep head a copy of the shallow one."""
    model = shallow(preset, layers=2)
    with torch.no_grad():  # a shallow model with non-trivial norms (the deep exit copies them)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.mark_trained()
    model.extend(5, 0.4, identity_init=True)
    idx = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.forward_exits(idx)
    assert out.deep_logits is not None and torch.equal(out.deep_logits, out.shallow_logits)
    new = [p for b in model.blocks[2:] for n, p in b.named_parameters() if n.split(".")[-2] in ("proj", "down")]
    assert new and all(not p.any() for p in new) and all(p.requires_grad for p in new)
    model2 = shallow(preset, layers=2)
    model2.mark_trained()
    model2.extend(5, 0.4, identity_init=False)
    with torch.no_grad():
        out2 = model2.forward_exits(idx)
    assert out2.deep_logits is not None and not torch.equal(out2.deep_logits, out2.shallow_logits)


def test_a_pretrained_split_starts_as_the_logit_lens_and_trains_only_its_lens_and_norm(tmp_path: Path) -> None:
    """The tuned-lens exit: identity lens into a copy of the final norm and the model's own (shared) head."""
    torch.manual_seed(0)
    base = TransformerLM(ModelConfig.from_name("tiny-llama", vocab_size=320, layers=["llama"] * 4))
    model = LegoLM.from_pretrained_split(base, 2)
    assert model.extended and model.meta.exit_lens and model.shallow_exit is not None
    assert model.shallow_exit.head is base.lm_head  # shared, not copied
    idx = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = base(idx, end=2)
        torch.testing.assert_close(model.forward_exits(idx).shallow_logits, base.lm_head(base.norm(h)))
        torch.testing.assert_close(model(idx), base(idx), rtol=0, atol=0)  # the deep model is the model
    model.freeze_for_exit_training()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"shallow_exit.lens.weight", "shallow_exit.lens.bias", "shallow_exit.norm.weight"}
    with torch.no_grad():
        model.shallow_exit.lens.weight.mul_(1.5)  # a trained lens
    model.mark_trained()
    model.calibrate(0.3, 0.5)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded, LegoLM) and loaded.meta.exit_lens
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_exits(idx).shallow_logits, model.forward_exits(idx).shallow_logits,
                                   rtol=0, atol=0)
    with pytest.raises(ConfigError, match="tuned lens"):
        model.shallow_model()
    draft = model.add_draft_exit()  # a copy of the exit's own lens and norm, the model's head shared
    assert draft.head is model.lm_head and draft.lens is not model.shallow_exit.lens
    assert set(model.exit_own_parameters("draft_exit")) == {"draft_exit.lens.weight", "draft_exit.lens.bias",
                                                            "draft_exit.norm.weight"}
    with torch.no_grad():
        torch.testing.assert_close(model.draft_logits(model.lower(idx)), model.forward_exits(idx).shallow_logits,
                                   rtol=0, atol=0)  # starts equal to the shallow exit
        draft.norm.weight.mul_(1.5)
    save_checkpoint(model, tmp_path / "drafted")
    again = load_pretrained(tmp_path / "drafted")
    assert isinstance(again, LegoLM) and again.draft_exit is not None and again.draft_exit.lens is not None
    with torch.no_grad():
        torch.testing.assert_close(again.draft_logits(again.lower(idx)), model.draft_logits(model.lower(idx)),
                                   rtol=0, atol=0)


def test_phase2_fraction_reserves_whole_documents_phase1_never_sees() -> None:
    from legolm.lego.train import split_training_tokens

    ids = np.array([5, 6, 0, 7, 8, 9, 0, 1, 2, 0, 3, 0])  # four documents ending in EOS 0
    first, second = split_training_tokens(ids, 0, 0.5)  # 50% of 12 = index 6, the EOS there ends the cut
    assert first.tolist() == [5, 6, 0, 7, 8, 9, 0] and second.tolist() == [1, 2, 0, 3, 0]
    both = split_training_tokens(ids, 0, 0.0)
    assert both[0] is ids and both[1] is ids
    with pytest.raises(ConfigError, match="phase2_fraction"):
        split_training_tokens(np.array([1, 2, 3, 0]), 0, 0.5)  # one document: nothing left for phase 2
