"""LEGO phase 3, exit distillation: the loss by hand, only the shallow exit's own parameters change, the
exits agree more on held-out real text, τ is re-calibrated, the summary reports it and the saved model
loads back distilled."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from benchmarks.common import overrides
from legolm.checkpoints.loader import load_pretrained
from legolm.config import config_from_dict, load_yaml, merge
from legolm.core.config import ModelConfig
from legolm.data import DataConfig, TokenizedCorpus, prepare_corpus
from legolm.errors import ConfigError
from legolm.lego.config import DistillInto, LegoConfig, LegoSettings, PhaseConfig
from legolm.lego.distill import DistillLoss, distill_loss, exit_agreement
from legolm.lego.hard_examples import collect_hard_examples
from legolm.lego.threshold import compute_confidence_threshold, shallow_confidences
from legolm.lego.train import LegoTraining, run_phase1, run_phase2, run_phase3, train_lego
from legolm.model.lego import LegoLM, quantile_threshold
from legolm.model.transformer import TransformerLM
from legolm.train.batches import WindowBatches
from legolm.train.config import EvalConfig, FitConfig, ModelSpec, OptimConfig, RunConfig, ScheduleConfig
from legolm.train.head_loss import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 32
VOCAB = 320


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> TokenizedCorpus:
    """Tiny Shakespeare (30 documents) with a 320-token BPE trained on its training documents."""
    cache = tmp_path_factory.mktemp("lego_distill_data")
    return prepare_corpus(DataConfig(source="tinyshakespeare", tokenizer=f"bpe:{VOCAB}", max_documents=30,
                                     cache_dir=str(cache)), progress=False)


def fit_config(out: Path, steps: int, lr: float = 3e-3) -> FitConfig:
    return FitConfig(window=WINDOW, batch_size=8, max_steps=steps, optim=OptimConfig(lr=lr),
                     schedule=ScheduleConfig(warmup_steps=2), eval=EvalConfig(every=max(steps // 2, 1), max_batches=6),
                     run=RunConfig(out_dir=str(out), device="cpu", progress=False, plot=False, log_every=5))


def windows(ids: object, shuffle: bool = False) -> WindowBatches:
    return WindowBatches(ids, WINDOW, 8, shuffle=shuffle, seed=0, drop_last=False)  # type: ignore[arg-type]


# -- the loss, by hand ------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.0, 0.0, 0.25])
def test_distill_loss_by_hand(alpha: float) -> None:
    """Token 1: p_s uniform over 3, p_d = (1/2, 1/4, 1/4), label 0; token 2: p_s = p_d = (3/5, 1/5, 1/5), label 1;
    token 3 is ignored (label IGNORE_INDEX) and must not count."""
    shallow = torch.tensor([[0.0, 0.0, 0.0], [math.log(3), 0.0, 0.0], [9.0, -9.0, 0.0]], requires_grad=True)
    deep = torch.tensor([[math.log(2), 0.0, 0.0], [math.log(3), 0.0, 0.0], [-9.0, 9.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1, IGNORE_INDEX])
    kl = [0.5 * math.log(0.5 * 3) + 2 * 0.25 * math.log(0.25 * 3), 0.0]  # Σ p_d log(p_d / p_s)
    ce = [math.log(3), math.log(5)]
    expected = sum(alpha * k + (1 - alpha) * c for k, c in zip(kl, ce, strict=True)) / 2
    loss = distill_loss(shallow, deep, labels, alpha)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert deep.grad is None  # the deep model is the target: no gradient flows into it
    assert shallow.grad is not None and torch.equal(shallow.grad[2], torch.zeros(3))  # ignored token


def test_distill_weight_outside_unit_interval_is_refused() -> None:
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ConfigError, match=r"lego.distill_weight must be in \[0, 1\]"):
            LegoConfig(lego=LegoSettings(distill_weight=bad)).validate()
    with pytest.raises(ConfigError, match=r"phase3.max_steps must be >= 0"):
        LegoConfig(phase3=PhaseConfig(max_steps=-1)).validate()
    with pytest.raises(ConfigError, match=r"phase3.optim.lr"):
        LegoConfig(phase3=PhaseConfig(max_steps=5, optim=OptimConfig(lr=-1.0))).validate()
    LegoConfig(phase3=PhaseConfig(max_steps=0, optim=OptimConfig(lr=-1.0))).validate()  # off: not checked


def test_distill_into_is_draft_by_default_and_a_bad_value_is_refused() -> None:
    assert LegoSettings().distill_into == "draft"
    with pytest.raises(ConfigError, match=r"lego.distill_into must be one of draft\|exit"):
        LegoConfig(lego=LegoSettings(distill_into="heads")).validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"lego.distill_into"):
        config_from_dict(LegoConfig, {"lego": {"distill_into": "heads"}})


def test_phase3_is_off_by_default_and_on_only_into_a_draft_exit_in_the_gpu_config() -> None:
    """The default and the CPU configs are the method as published; the GPU config adds the separate draft exit,
    which leaves threshold mode's shallow exit and τ as phase 2 left them."""
    assert not LegoConfig().distills and LegoConfig().phase3.max_steps == 0
    for path in sorted((ROOT / "configs").glob("lego-*.yaml")):
        cfg = config_from_dict(LegoConfig, load_yaml(str(path)))
        if path.name == "lego-gpu.yaml":
            assert cfg.distills and cfg.lego.distill_into == "draft" and cfg.phase3.max_steps == 400
        else:
            assert not cfg.distills, path.name


def test_benchmark_set_overrides_reach_the_nested_phase3_keys() -> None:
    """``python -m benchmarks.early_exit --set phase3.max_steps=400 --set ...`` (the same merge as its main)."""
    data = merge(load_yaml(str(ROOT / "configs" / "lego-gpu.yaml")),
                 overrides(["phase3.max_steps=400", "phase3.optim.lr=5e-4", "lego.distill_weight=0.8"]))
    cfg = config_from_dict(LegoConfig, data)
    assert cfg.distills and cfg.phase3.max_steps == 400 and cfg.phase3.optim.lr == 5e-4
    assert cfg.lego.distill_weight == 0.8 and cfg.phase2.max_steps == 1600  # the rest as the file says


# -- phase 3 on a trained model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phase2_model(corpus: TokenizedCorpus, tmp_path_factory: pytest.TempPathFactory) -> LegoLM:
    """A grown 1 -> 3 layer model after phases 1 and 2 on real text (the state phase 3 starts from)."""
    out = tmp_path_factory.mktemp("lego_distill_runs")
    torch.manual_seed(0)
    model = LegoLM(ModelConfig.from_name("tiny-pythia", vocab_size=VOCAB, layers=["pythia"]))
    run_phase1(model, windows(corpus.train, shuffle=True), windows(corpus.val), fit_config(out / "p1", 40))
    model.eval()
    tau = compute_confidence_threshold(model, windows(corpus.val), 0.5)
    model.extend(3, tau)
    hard_train = collect_hard_examples(model, windows(corpus.train), tau)
    hard_val = collect_hard_examples(model, windows(corpus.val), tau)
    run_phase2(model, hard_train, hard_val, fit_config(out / "p2", 30, lr=1e-2))
    return model.eval()


def test_phase3_changes_only_the_shallow_exit_and_raises_agreement(phase2_model: LegoLM, corpus: TokenizedCorpus,
                                                                   tmp_path: Path) -> None:
    import copy

    model = copy.deepcopy(phase2_model)
    own = set(model.exit_own_parameters())
    assert own == {"shallow_exit.norm.weight", "shallow_exit.norm.bias", "shallow_exit.head.weight"}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    held_out = windows(corpus.val)  # phase 3 trains on training windows; agreement is measured on validation ones
    before = exit_agreement(model, held_out)
    result = run_phase3(model, windows(corpus.train, shuffle=True), held_out, fit_config(tmp_path / "p3", 30),
                        into="exit")
    after = exit_agreement(model.eval(), held_out)
    assert result.trainable_params == sum(p.numel() for n, p in model.named_parameters() if n in own)
    for key, value in model.state_dict().items():
        if key not in own:  # embeddings, every block, the deep norm and head: bit for bit
            assert torch.equal(value, state[key]), key
    assert any(not torch.equal(model.state_dict()[k], state[k]) for k in own)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # phase 2's flags given back
    # 0.599 -> 0.913 of 21,440 held-out tokens (shallow perplexity 55.5 -> 54.8) when this test was written
    assert after.agreement > before.agreement + 0.1, (before, after)


def test_phase3_into_a_draft_exit_leaves_the_shallow_exit_and_tau_alone(phase2_model: LegoLM, corpus: TokenizedCorpus,
                                                                        tmp_path: Path) -> None:
    """``distill_into: draft``: a new draft exit (a copy of the shallow exit) trains; every tensor the model had
    (the shallow exit included), τ and the trainable flags stay; the drafter agrees more with the deep exit."""
    import copy

    model = copy.deepcopy(phase2_model)
    assert model.draft_exit is None and model.drafter is model.shallow_exit
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    meta = copy.deepcopy(model.meta)
    held_out = windows(corpus.val)
    before = exit_agreement(model, held_out)
    result = run_phase3(model, windows(corpus.train, shuffle=True), held_out, fit_config(tmp_path / "p3", 30),
                        into="draft")
    model.eval()
    assert model.draft_exit is not None and model.drafter is model.draft_exit
    own = set(model.exit_own_parameters("draft_exit"))
    assert own == {"draft_exit.norm.weight", "draft_exit.norm.bias", "draft_exit.head.weight"}
    assert result.trainable_params == sum(p.numel() for n, p in model.named_parameters() if n in own)
    now = model.state_dict()
    assert set(now) == set(state) | own
    for key, value in state.items():  # embeddings, blocks, deep norm/head and the shallow exit: bit for bit
        assert torch.equal(now[key], value), key
    assert all(not torch.equal(now[k], state[k.replace("draft_exit", "shallow_exit")]) for k in own)
    assert model.meta.draft_exit and meta == dataclasses.replace(model.meta, draft_exit=False)  # τ, quantiles kept
    assert {n: p.requires_grad for n, p in model.named_parameters() if n not in own} == flags
    assert not any(p.requires_grad for p in model.draft_exit.parameters())  # frozen after phase 3
    shallow_after = exit_agreement(model, held_out)
    drafter_after = exit_agreement(model, held_out, target="draft_exit")
    assert shallow_after == before  # the threshold exit is the one it was
    # 0.599 -> 0.913 of the held-out tokens, as with distill_into: exit, when this test was written
    assert drafter_after.agreement > before.agreement + 0.1, (before, drafter_after)


def _pretrained_split() -> LegoLM:
    """A tiny Llama split after block 1 (its exit reads through the model's own head), τ set."""
    torch.manual_seed(0)
    base = TransformerLM(ModelConfig.from_name("tiny-llama", vocab_size=VOCAB, layers=["llama"] * 3))
    model = LegoLM.from_pretrained_split(base, 1)
    model.mark_trained()
    model.calibrate(0.3, 0.5)
    return model


def test_phase3_into_a_draft_exit_of_a_pretrained_split_shares_the_head_frozen(corpus: TokenizedCorpus,
                                                                             tmp_path: Path) -> None:
    model = _pretrained_split()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    run_phase3(model, windows(corpus.train, shuffle=True), windows(corpus.val), fit_config(tmp_path / "p3", 4))
    assert model.draft_exit is not None and model.shallow_exit is not None
    assert model.draft_exit.head is model.lm_head is model.shallow_exit.head  # one head, shared
    assert model.draft_exit.lens is not model.shallow_exit.lens and model.draft_exit.norm is not model.norm
    assert set(model.exit_own_parameters("draft_exit")) == {"draft_exit.lens.weight", "draft_exit.lens.bias",
                                                            "draft_exit.norm.weight"}
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())  # the shared head and the shallow exit
    assert any(not torch.equal(now[k], now[k.replace("draft_exit", "shallow_exit")])
               for k in ("draft_exit.lens.weight", "draft_exit.norm.weight"))


def test_phase3_of_a_pretrained_split_trains_the_lens_and_norm_never_the_shared_head(corpus: TokenizedCorpus,
                                                                                    tmp_path: Path) -> None:
    model = _pretrained_split()
    assert set(model.exit_own_parameters()) == {"shallow_exit.lens.weight", "shallow_exit.lens.bias",
                                                "shallow_exit.norm.weight"}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    run_phase3(model, windows(corpus.train, shuffle=True), windows(corpus.val), fit_config(tmp_path / "p3", 4),
               into="exit")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, state[k])}
    assert changed and changed <= {"shallow_exit.lens.weight", "shallow_exit.lens.bias", "shallow_exit.norm.weight"}
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])  # the head the exit shares


def test_distill_loss_on_a_model_matches_its_two_exits(phase2_model: LegoLM, corpus: TokenizedCorpus) -> None:
    batch = next(iter(windows(corpus.val)))
    with torch.no_grad():
        out = phase2_model.forward_exits(batch["input_ids"])
        assert out.deep_logits is not None
        expected = distill_loss(out.shallow_logits, out.deep_logits, batch["labels"], 0.5)
        loss, n, _ = DistillLoss(0.5)(phase2_model, batch)
    torch.testing.assert_close(loss, expected)
    assert int(n) == batch["labels"].numel()


# -- through train_lego: τ re-calibrated, summary, saved model ----------------------------------------------------
def lego_config(out: Path, into: DistillInto = "exit") -> LegoConfig:
    def phase(steps: int, lr: float = 3e-3) -> PhaseConfig:
        return PhaseConfig(batch_size=8, max_steps=steps, optim=OptimConfig(lr=lr),
                           schedule=ScheduleConfig(warmup_steps=2),
                           eval=EvalConfig(every=10, max_batches=6, patience=2))

    cfg = LegoConfig(window=WINDOW, model=ModelSpec(preset="tiny-pythia", layers=["pythia"]),
                     phase1=phase(40), phase2=phase(20, 1e-2), phase3=phase(30),
                     lego=LegoSettings(num_layers=3, target_ratio=0.4, calib_batches=6, curve_ratios=[],
                                       identity_init=False,  # the deep exit starts (and stays) unlike the shallow
                                       distill_into=into),
                     run=RunConfig(out_dir=str(out), device="cpu", progress=False, plot=False, log_every=10))
    d = cfg.decode
    d.prompts, d.prompt_len, d.max_new_tokens, d.score_windows, d.score_len = 1, 8, 4, 1, 4
    d.repeats, d.warmup, d.draft_tokens, d.compare_kv_modes = 1, 0, [2], []
    return cfg


Job = tuple[LegoConfig, LegoTraining, dict[str, object]]


def _job(corpus: TokenizedCorpus, tmp_path_factory: pytest.TempPathFactory, name: str, into: DistillInto) -> Job:
    """A whole `train_lego` run with phase 3 into ``into``, and its report."""
    from legolm.recipes.lego import evaluate_and_report

    out = tmp_path_factory.mktemp(name) / "run"
    cfg = lego_config(out, into=into)
    cfg.validate()
    trained = train_lego(cfg, corpus)
    out.mkdir(parents=True, exist_ok=True)
    return cfg, trained, evaluate_and_report(cfg, corpus, trained, out)


@pytest.fixture(scope="module")
def distilled(corpus: TokenizedCorpus, tmp_path_factory: pytest.TempPathFactory) -> Job:
    return _job(corpus, tmp_path_factory, "lego_distill_job", "exit")


def test_tau_is_recalibrated_on_the_distilled_confidences(distilled: Job) -> None:
    cfg, trained, summary = distilled
    model, report = trained.model, trained.distill
    assert report is not None and trained.phase3 is not None and trained.phase3.steps >= 1
    conf = shallow_confidences(model, trained.val_batches, cfg.lego.calib_batches)
    tau = quantile_threshold(conf, cfg.lego.target_ratio)  # the run's rule (target ratio) on the new confidences
    assert report.threshold == tau == model.threshold == trained.threshold == summary["threshold"]
    assert report.threshold != report.threshold_before  # the confidences moved, so τ did
    assert float((conf < tau).float().mean()) == pytest.approx(cfg.lego.target_ratio, abs=2 / conf.numel())
    assert model.meta.target_ratio == pytest.approx(cfg.lego.target_ratio, abs=2 / conf.numel())
    assert report.shallow_ratio == pytest.approx(1 - cfg.lego.target_ratio, abs=2 / conf.numel())


def test_summary_reports_phase3(distilled: Job) -> None:
    cfg, trained, summary = distilled
    block = summary["phase3"]
    assert isinstance(block, dict) and trained.distill is not None
    assert block["agreement_after"] > block["agreement_before"]
    assert block["threshold"] == summary["threshold"] and block["distill_weight"] == cfg.lego.distill_weight
    for key in ("shallow_ppl_before", "shallow_ppl_after", "shallow_ratio", "tokens"):
        assert key in block, key
    assert block["fit"]["steps"] == trained.phase3.steps  # type: ignore[union-attr]
    assert (Path(cfg.run.out_dir) / "phase3" / "metrics.csv").is_file()


def test_the_saved_model_loads_back_distilled(distilled: Job) -> None:
    cfg, trained, summary = distilled
    loaded = load_pretrained(Path(cfg.run.out_dir) / "model")
    assert isinstance(loaded, LegoLM) and loaded.meta == trained.model.meta
    assert loaded.threshold == summary["threshold"]
    for name, value in trained.model.exit_own_parameters().items():
        assert torch.equal(dict(loaded.named_parameters())[name], value), name
    assert trained.distill is not None
    again = exit_agreement(loaded, trained.val_batches, cfg.lego.calib_batches)
    assert again.agreement == pytest.approx(trained.distill.agreement_after, abs=1e-9)


@pytest.fixture(scope="module")
def drafted(corpus: TokenizedCorpus, tmp_path_factory: pytest.TempPathFactory) -> Job:
    """The same run with ``lego.distill_into: draft`` (the default)."""
    return _job(corpus, tmp_path_factory, "lego_draft_job", "draft")


def test_summary_of_a_draft_run_keeps_tau_and_reports_the_drafter(drafted: Job) -> None:
    cfg, trained, summary = drafted
    block, report, model = summary["phase3"], trained.distill, trained.model
    assert isinstance(block, dict) and report is not None and model.draft_exit is not None
    assert block["into"] == "draft" and block["rule"] == "unchanged"
    assert block["threshold"] == block["threshold_before"] == summary["threshold"] == model.threshold
    assert block["shallow_ratio"] == block["shallow_ratio_before"]
    assert block["shallow_ppl_after"] == block["shallow_ppl_before"] == block["drafter_ppl_before"]
    assert block["agreement_after"] > block["agreement_before"]
    conf = shallow_confidences(model, trained.val_batches, cfg.lego.calib_batches)
    assert model.threshold == quantile_threshold(conf, cfg.lego.target_ratio)  # phase 2's τ on unchanged confidences
    again = exit_agreement(model, trained.val_batches, cfg.lego.calib_batches, target="draft_exit")
    assert again.agreement == pytest.approx(block["agreement_after"], abs=1e-9)
    assert "into a draft exit" in report.line() and "unchanged" in report.line()


def test_a_saved_draft_run_loads_back_with_its_drafter(drafted: Job) -> None:
    cfg, trained, _ = drafted
    loaded = load_pretrained(Path(cfg.run.out_dir) / "model")
    assert isinstance(loaded, LegoLM) and loaded.meta == trained.model.meta and loaded.meta.draft_exit
    assert loaded.draft_exit is not None and loaded.drafter is loaded.draft_exit
    params = dict(loaded.named_parameters())
    for name, value in trained.model.named_parameters():
        assert torch.equal(params[name], value), name
    ids = next(iter(trained.val_batches))["input_ids"][:1]
    with torch.no_grad():
        h_s = loaded.lower(ids)
        torch.testing.assert_close(loaded.draft_logits(h_s), trained.model.draft_logits(h_s), rtol=0, atol=0)
