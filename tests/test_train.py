"""The training loop `fit` and its parts, on real text (Tiny Shakespeare, a small trained BPE)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from legolm.core.config import ModelConfig
from legolm.data.tokenized import DataConfig, TokenizedCorpus, prepare_corpus
from legolm.errors import ConfigError, LegolmError
from legolm.model.transformer import TransformerLM
from legolm.train import (
    Callback,
    FitConfig,
    FitState,
    LRSchedule,
    NextTokenLoss,
    OptimConfig,
    ScheduleConfig,
    WindowBatches,
    build_optimizer,
    fit,
)

WINDOW, BATCH = 32, 8


@pytest.fixture(scope="module")
def corpus(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TokenizedCorpus:
    """20 Tiny Shakespeare documents, a 512-token BPE trained on them, split by document."""
    cache = tmp_path_factory.mktemp("tokenized")
    return prepare_corpus(DataConfig(source="tinyshakespeare", tokenizer="bpe:512", max_documents=20,
                                     cache_dir=str(cache)), progress=False)


def tiny_model(seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig.from_name("tiny-pythia", vocab_size=512))


def fit_config(tmp_path: Path, name: str = "run", **loop: object) -> FitConfig:
    cfg = FitConfig(window=WINDOW, batch_size=BATCH, max_steps=8)
    cfg.schedule.warmup_steps = 2
    cfg.eval.every = 4
    cfg.run.out_dir, cfg.run.progress, cfg.run.plot, cfg.run.device = str(tmp_path / name), False, False, "cpu"
    for key, value in loop.items():
        setattr(cfg, key, value)
    return cfg


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- batches --------------------------------------------------------------------------------------------
def test_windows_are_shifted_by_one_and_cover_the_stream_without_overlap(corpus: TokenizedCorpus) -> None:
    ids = corpus.train
    batches = WindowBatches(ids, WINDOW, BATCH, shuffle=False, drop_last=False)
    n_windows = (len(ids) - 1) // WINDOW
    assert len(batches) == math.ceil(n_windows / BATCH)
    seen = []
    for batch in batches:
        x, y, sid = batch["input_ids"], batch["labels"], batch["sample_ids"]
        assert x.dtype == torch.int64 and x.shape[1] == WINDOW
        for row, w in enumerate(sid.tolist()):
            np.testing.assert_array_equal(x[row].numpy(), ids[w * WINDOW : (w + 1) * WINDOW])
            np.testing.assert_array_equal(y[row].numpy(), ids[w * WINDOW + 1 : (w + 1) * WINDOW + 1])
        seen += sid.tolist()
    assert seen == list(range(n_windows))  # every window once, in order, no padding


def test_shards_are_disjoint_equal_and_shuffles_are_seeded(corpus: TokenizedCorpus) -> None:
    shards = [WindowBatches(corpus.train, WINDOW, BATCH, seed=3, rank=r, world_size=3) for r in range(3)]
    ids = [np.concatenate([b["sample_ids"].numpy() for b in s]) for s in shards]
    assert len({len(i) for i in ids}) == 1
    assert not set(ids[0]) & set(ids[1]) and not set(ids[1]) & set(ids[2]) and not set(ids[0]) & set(ids[2])
    again = WindowBatches(corpus.train, WINDOW, BATCH, seed=3, rank=1, world_size=3)
    np.testing.assert_array_equal(np.concatenate([b["sample_ids"].numpy() for b in again]), ids[1])
    again.set_epoch(1)  # a new epoch draws a new order; reshuffle=False keeps batch ids naming the same windows
    assert not np.array_equal(again.order(1), again.order(0))
    fixed = WindowBatches(corpus.train, WINDOW, BATCH, seed=3, reshuffle=False)
    np.testing.assert_array_equal(fixed.order(0), fixed.order(5))


def test_position_round_trips_mid_epoch(corpus: TokenizedCorpus) -> None:
    a = WindowBatches(corpus.train, WINDOW, BATCH, seed=1)
    a.set_epoch(2)
    it = iter(a)
    first = [next(it) for _ in range(3)]
    b = WindowBatches(corpus.train, WINDOW, BATCH, seed=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    rest_a, rest_b = list(it), list(b)
    assert len(first) + len(rest_b) == len(a)
    for x, y in zip(rest_a, rest_b, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"]) and int(x["batch_id"]) == int(y["batch_id"])


def test_too_short_stream_is_a_config_error(corpus: TokenizedCorpus) -> None:
    with pytest.raises(ConfigError, match="too few"):
        WindowBatches(corpus.val[: WINDOW * 2], WINDOW, BATCH)


# -- optimizer and schedule -----------------------------------------------------------------------------
def test_schedule_values_by_hand() -> None:
    cos = LRSchedule(1e-3, ScheduleConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1), total_steps=110)
    assert cos(0) == pytest.approx(1e-4)  # lr·1/10
    assert cos(4) == pytest.approx(5e-4)
    assert cos(9) == pytest.approx(1e-3)  # end of warmup
    assert cos(10) == pytest.approx(1e-3)  # cosine at progress 0
    assert cos(60) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way: mid point
    assert cos(35) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert cos(110) == pytest.approx(1e-4) and cos(500) == pytest.approx(1e-4)
    lin = LRSchedule(1e-3, ScheduleConfig(warmup_steps=10, decay="linear", min_lr_ratio=0.0), total_steps=110)
    assert lin(35) == pytest.approx(0.75e-3)
    const = LRSchedule(2e-3, ScheduleConfig(warmup_steps=0, decay="constant"), total_steps=5)
    assert const(0) == const(4) == 2e-3


def test_weight_decay_only_on_matrices_and_only_trainable_parameters() -> None:
    model = tiny_model()
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim < 2 for p in no_decay["params"])
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in model.blocks[0].parameters()}
    assert len(in_opt) == len(params)


def test_learning_rate_scales_survive_copies_that_drop_parameter_attributes() -> None:
    """`scale_lr` marks parameters; a deep copy (as FSDP2 shards one) loses the mark, so `fit` reads the scales
    from the original model in order and hands them to `build_optimizer`: the copy's groups get them."""
    import copy

    from legolm.train.optim import lr_scales, scale_lr

    model = tiny_model()
    scale_lr(model.blocks[0].parameters(), 10.0)
    clone = copy.deepcopy(model)
    assert set(lr_scales(clone.parameters())) == {1.0}  # the attribute did not travel
    scales = lr_scales(model.parameters())
    opt = build_optimizer(list(clone.parameters()), OptimConfig(lr=1e-3), torch.device("cpu"), scales)
    LRSchedule(1e-3, ScheduleConfig(warmup_steps=0, decay="constant"), 10).apply(opt, 0)
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    block0 = {id(p) for p in clone.blocks[0].parameters()}
    assert all(rate[id(p)] == pytest.approx(1e-2 if id(p) in block0 else 1e-3) for p in clone.parameters())
    with pytest.raises(ValueError, match="learning-rate scales for"):
        build_optimizer(list(clone.parameters()), OptimConfig(), torch.device("cpu"), scales[:-1])


def test_next_token_loss_is_log_vocab_for_uniform_logits() -> None:
    model = tiny_model()
    torch.nn.init.zeros_(model.lm_head.weight)  # logits all zero: uniform over 512 tokens
    labels = torch.tensor([[1, 2, -100, 4]])
    loss, n, _ = NextTokenLoss()(model, {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": labels})
    assert loss.item() == pytest.approx(math.log(512), rel=1e-6) and int(n) == 3


# -- the loop --------------------------------------------------------------------------------------------
def test_loss_falls_on_real_text_and_run_dir_is_complete(corpus: TokenizedCorpus, tmp_path: Path) -> None:
    model = tiny_model()
    cfg = fit_config(tmp_path, max_steps=40)
    cfg.optim.lr, cfg.eval.every, cfg.run.plot, cfg.run.log_every = 3e-3, 20, True, 5
    val = WindowBatches(corpus.val, WINDOW, BATCH, shuffle=False, drop_last=False)
    result = fit(model, WindowBatches(corpus.train, WINDOW, BATCH), cfg, val=val)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert train_losses[0] > 5.8  # about ln(512) = 6.24 at the start
    assert train_losses[-1] < train_losses[0] - 1.0
    assert [e["step"] for e in result.evals] == [20, 40]
    assert result.evals[1]["val_loss"] < result.evals[0]["val_loss"] < math.log(512)
    assert result.best_val_ppl == pytest.approx(result.evals[1]["val_ppl"])
    assert result.steps == 40 and result.tokens == 40 * BATCH * WINDOW
    assert result.trainable_params == result.total_params == model.num_parameters()
    run = tmp_path / "run"
    with open(run / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "config.yaml").read_text().startswith("window: 32")
    assert (run / "checkpoints" / "step-00000040" / "model.safetensors").is_file()


def test_grad_accumulation_equals_one_big_batch(corpus: TokenizedCorpus, tmp_path: Path) -> None:
    results = []
    for name, batch, accum in (("big", BATCH, 1), ("accum", BATCH // 2, 2)):
        model = tiny_model()
        cfg = fit_config(tmp_path, name, batch_size=batch, grad_accum=accum, max_steps=5)
        fit(model, WindowBatches(corpus.train, WINDOW, batch, seed=7), cfg)
        results.append(weights(model))
    moved = max((results[0][k] - tiny_model().state_dict()[k]).abs().max().item() for k in results[0])
    assert moved > 1e-3  # the weights did change
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], atol=2e-5, rtol=1e-4)


class _Crash(Callback):
    def on_step_end(self, state: FitState, model: torch.nn.Module) -> None:
        if state.step == 5:
            raise KeyboardInterrupt


def test_resume_after_a_crash_gives_the_uninterrupted_weights(corpus: TokenizedCorpus, tmp_path: Path) -> None:
    def run(name: str, crash: bool = False, resume: bool = False) -> TransformerLM:
        model = tiny_model(seed=1 if resume else 0)  # a resumed run must not depend on the fresh init
        cfg = fit_config(tmp_path, name, max_steps=9)
        cfg.run.save_every, cfg.run.resume = 3, resume
        val = WindowBatches(corpus.val, WINDOW, BATCH, shuffle=False, drop_last=False)
        fit(model, WindowBatches(corpus.train, WINDOW, BATCH, seed=2), cfg, val=val, callbacks=[_Crash()] if crash
            else [])
        return model

    straight = run("straight")
    with pytest.raises(KeyboardInterrupt):
        run("crashed", crash=True)
    assert (tmp_path / "crashed" / "checkpoints" / "step-00000003").is_dir()
    resumed = run("crashed", resume=True)
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    rows = [json.loads(line) for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "val"] == [4, 8, 9]  # step-4 row logged once
    state = json.loads((tmp_path / "crashed" / "checkpoints" / "step-00000009" / "trainer.json").read_text())
    assert state["fit"]["step"] == 9 and state["fit"]["tokens"] == 9 * BATCH * WINDOW


def test_early_stopping_with_a_custom_eval(corpus: TokenizedCorpus, tmp_path: Path) -> None:
    scores = iter([50.0, 40.0, 39.5, 41.0, 45.0, 30.0, 20.0])
    cfg = fit_config(tmp_path, max_steps=20)
    cfg.eval.every, cfg.eval.patience, cfg.eval.min_delta = 2, 2, 1.0
    result = fit(tiny_model(), WindowBatches(corpus.train, WINDOW, BATCH), cfg,
                 eval_fn=lambda m: {"val_ppl": next(scores)})
    # 50 -> 40 improves; 39.5 is not better by > 1.0; 41 neither: patience 2 reached at step 8.
    assert result.stopped_early and result.steps == 8 and result.best_val_ppl == 40.0


class _Snapshots(Callback):
    """The trainable weights at every evaluation, by step."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_eval(self, state: FitState, model: torch.nn.Module, metrics: dict[str, float]) -> None:
        self.at[state.step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_keep_best_restores_the_best_evaluations_weights(corpus: TokenizedCorpus, tmp_path: Path) -> None:
    """Scripted val ppl 50, 30, 40, 45 at steps 2, 4, 6, 8: the model ends with step 4's weights, which differ
    from step 8's (without keep_best it keeps step 8's)."""
    def run(name: str, keep: bool) -> tuple[TransformerLM, _Snapshots]:
        scores, snaps, model = iter([50.0, 30.0, 40.0, 45.0]), _Snapshots(), tiny_model()
        cfg = fit_config(tmp_path, name, max_steps=8)
        cfg.eval.every, cfg.eval.keep_best = 2, keep
        fit(model, WindowBatches(corpus.train, WINDOW, BATCH), cfg, eval_fn=lambda m: {"val_ppl": next(scores)},
            callbacks=[snaps])
        return model, snaps

    kept, snaps = run("kept", keep=True)
    assert sorted(snaps.at) == [2, 4, 6, 8]
    for name, value in _trainable(kept).items():
        assert torch.equal(value, snaps.at[4][name]), name
    assert any(not torch.equal(snaps.at[4][n], snaps.at[8][n]) for n in snaps.at[4])
    last, snaps = run("last", keep=False)
    for name, value in _trainable(last).items():
        assert torch.equal(value, snaps.at[8][name]), name
    on_disk = load_file(str(tmp_path / "kept" / "best.safetensors"))
    for name, value in on_disk.items():
        assert torch.equal(value, snaps.at[4][name]), name


def test_keep_best_survives_a_resume(corpus: TokenizedCorpus, tmp_path: Path) -> None:
    """The best (step 4) is before the crash at step 5; the resumed run ends with step 4's weights."""
    snaps = _Snapshots()

    def run(crash: bool, resume: bool) -> TransformerLM:
        scores = iter([50.0, 30.0, 40.0, 45.0][2 if resume else 0:])  # evaluations at 2, 4 | 6, 8
        model = tiny_model(seed=1 if resume else 0)
        cfg = fit_config(tmp_path, "resumed", max_steps=8)
        cfg.eval.every, cfg.eval.keep_best, cfg.run.save_every, cfg.run.resume = 2, True, 2, resume
        fit(model, WindowBatches(corpus.train, WINDOW, BATCH), cfg, eval_fn=lambda m: {"val_ppl": next(scores)},
            callbacks=[snaps, _Crash()] if crash else [snaps])
        return model

    with pytest.raises(KeyboardInterrupt):
        run(crash=True, resume=False)
    resumed = run(crash=False, resume=True)
    for name, value in _trainable(resumed).items():
        assert torch.equal(value, snaps.at[4][name]), name


def test_keep_best_with_fsdp2_is_a_config_error(tmp_path: Path) -> None:
    cfg = fit_config(tmp_path)
    cfg.eval.keep_best, cfg.run.strategy = True, "fsdp2"
    with pytest.raises(ConfigError, match="keep_best"):
        cfg.validate()


class _Recorder(Callback):
    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.evals: list[float] = []

    def on_epoch_end(self, state: FitState, model: torch.nn.Module) -> None:
        self.epochs.append(state.epoch)

    def on_eval(self, state: FitState, model: torch.nn.Module, metrics: dict[str, float]) -> None:
        self.evals.append(metrics["val_loss"])


def test_custom_loss_epochs_frozen_parameters_and_hooks(corpus: TokenizedCorpus, tmp_path: Path) -> None:
    model = tiny_model()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("blocks.1."))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("blocks.1.")}
    seen_batches: list[int] = []

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict]:
        if m.training:
            seen_batches.append(int(batch["batch_id"]))
        loss, n, extra = NextTokenLoss()(m, batch)
        return loss, int(n), extra

    train = WindowBatches(corpus.train[: 20 * WINDOW + 1], WINDOW, 4, shuffle=False)  # 5 batches per epoch
    cfg = fit_config(tmp_path, max_steps=None, epochs=3, grad_accum=2)  # 2 steps per epoch (1 batch left over)
    recorder = _Recorder()
    val = WindowBatches(corpus.val, WINDOW, BATCH, shuffle=False, drop_last=False)
    result = fit(model, train, cfg, val=val, loss_fn=loss_fn, callbacks=[recorder])
    assert result.steps == 6 and recorder.epochs == [1, 2]  # the 3rd epoch ends the run at its last step
    assert seen_batches == [0, 1, 2, 3] * 3  # the 5th batch of each epoch is left over, not trained on
    assert len(recorder.evals) == 2  # steps 4 and 6 (the end)
    assert result.trainable_params == sum(p.numel() for p in model.blocks[1].parameters())
    for key, value in model.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert torch.equal(saved["blocks.1.attn.qkv.weight"], model.blocks[1].attn.qkv.weight)


def test_existing_run_dir_is_refused(corpus: TokenizedCorpus, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(LegolmError, match=r"already exists.*--overwrite"):
        fit(tiny_model(), WindowBatches(corpus.train, WINDOW, BATCH), fit_config(tmp_path))


def test_evaluation_and_checkpoint_time_is_not_in_the_progress_bar_rate(corpus: TokenizedCorpus, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar's elapsed time (its rate and ETA) leaves out evaluations and checkpoints, so the ETA does not
    jump after each."""
    import sys
    import time

    from tqdm.auto import tqdm

    fit_module = sys.modules["legolm.train.fit"]  # the module (legolm.train.fit is also the function's name)

    pause = 1.0
    closed: list[float] = []

    class Bar(tqdm):  # type: ignore[type-arg]
        def close(self) -> None:
            closed.append(self.format_dict["elapsed"])
            super().close()

    def slow_eval(model: torch.nn.Module) -> dict[str, float]:
        time.sleep(pause)
        return {"val_loss": 1.0, "val_ppl": math.e}

    save = fit_module.save_training_checkpoint

    def slow_save(*args: object, **kwargs: object) -> Path:
        time.sleep(pause)
        return save(*args, **kwargs)

    monkeypatch.setattr(fit_module, "tqdm", Bar)
    monkeypatch.setattr(fit_module, "save_training_checkpoint", slow_save)
    cfg = fit_config(tmp_path, max_steps=8)
    cfg.run.progress, cfg.run.save_every = True, 4
    t0 = time.perf_counter()
    fit(tiny_model(), WindowBatches(corpus.train, WINDOW, BATCH), cfg, eval_fn=slow_eval)  # eval and save at 4, 8
    wall = time.perf_counter() - t0
    assert closed and closed[0] < wall - 4 * pause, (closed, wall)
