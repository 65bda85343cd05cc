"""Fault injection: nothing is lost and every fault is one clear line.

NaN mid-run (the run stops, no non-finite checkpoint or model, the last finite checkpoint kept),
the skip mode and its limit, a second process on a locked run directory, ``--overwrite`` of
directories legolm did not make (or that hold the command's input, or are the current one),
resume on other data, a torn or damaged newest checkpoint (fall back to the previous one, bit for
bit), and fsync before the rename.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from legolm.cli.main import main
from legolm.core.config import ModelConfig
from legolm.data.tokenized import DataConfig, TokenizedCorpus, prepare_corpus
from legolm.errors import CheckpointError, TrainingDiverged
from legolm.model.transformer import TransformerLM
from legolm.train import FitConfig, NextTokenLoss, WindowBatches, fit
from legolm.train.batches import Batch
from legolm.train.checkpoint import checkpoint_dirs, latest_checkpoint
from legolm.train.fit import Callback, FitState, LossOutput
from legolm.train.metrics import MetricsLogger
from legolm.train.run_dir import LOCK, MARKER, hold_run_dir
from legolm.utils import io as legolm_io
from legolm.utils.io import atomic_dir, finite_json

WINDOW, BATCH = 32, 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenized")


@pytest.fixture(scope="module")
def corpus(cache: Path) -> TokenizedCorpus:
    """20 Tiny Shakespeare documents, a 512-token BPE trained on them, split by document."""
    return prepare_corpus(DataConfig(source="tinyshakespeare", tokenizer="bpe:512", max_documents=20,
                                     cache_dir=str(cache)), progress=False)


def tiny_model() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(ModelConfig.from_name("tiny-pythia", vocab_size=512))


def fit_config(out: Path, steps: int = 12, **run: Any) -> FitConfig:
    cfg = FitConfig(window=WINDOW, batch_size=BATCH, max_steps=steps)
    cfg.schedule.warmup_steps = 2
    cfg.eval.every = 4
    cfg.run.out_dir, cfg.run.progress, cfg.run.plot, cfg.run.device = str(out), False, False, "cpu"
    for key, value in run.items():
        setattr(cfg.run, key, value)
    return cfg


def batches(corpus: TokenizedCorpus) -> tuple[WindowBatches, WindowBatches]:
    train = WindowBatches(corpus.train, WINDOW, BATCH, shuffle=True, seed=0)
    val = WindowBatches(corpus.val, WINDOW, BATCH, shuffle=False, drop_last=False)
    return train, val


class NaNAt:
    """Next-token loss, but NaN (which makes every gradient NaN) at the given optimizer steps (1-based)."""

    def __init__(self, steps: set[int], grad_accum: int = 1) -> None:
        self.steps, self.grad_accum, self.calls = steps, grad_accum, 0
        self.inner = NextTokenLoss()

    def __call__(self, model: nn.Module, batch: Batch) -> LossOutput:
        loss, n, metrics = self.inner(model, batch)
        self.calls += 1 if model.training else 0
        step = -(-self.calls // self.grad_accum)
        if model.training and step in self.steps:
            loss = loss * math.nan
        return loss, n, metrics


def strict_json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file, refusing NaN/Infinity (which strict JSON readers refuse)."""
    def refuse(token: str) -> None:
        raise ValueError(f"{path} holds a bare {token}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


# -- NaN / inf -----------------------------------------------------------------------------------------
def test_nan_mid_run_stops_and_keeps_the_last_finite_checkpoint(corpus: TokenizedCorpus, tmp_path: Path) -> None:
    train, val = batches(corpus)
    cfg = fit_config(tmp_path / "run", steps=12, save_every=2, keep_checkpoints=1)
    with pytest.raises(TrainingDiverged) as err:
        fit(tiny_model(), train, cfg, val=val, loss_fn=NaNAt({7, 8, 9, 10, 11, 12}))
    message = str(err.value)
    assert "the loss is nan" in message and "at step 7" in message and "\n" not in message
    assert latest_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "step-00000006"
    assert [step for step, _ in checkpoint_dirs(tmp_path / "run")] == [6]  # keep 1: the finite one survived
    assert all_finite(tmp_path / "run" / "checkpoints" / "step-00000006" / "model.safetensors")
    rows = strict_json_lines(tmp_path / "run" / "metrics.jsonl")
    assert max(r["step"] for r in rows) <= 6 and (tmp_path / "run" / "metrics.csv").is_file()


def test_a_weight_that_turns_inf_is_never_saved(corpus: TokenizedCorpus, tmp_path: Path) -> None:
    """A trained weight the loss does not see turns inf: the loss stays finite, the checkpoint is still refused."""
    class Poison(Callback):
        def on_step_end(self, state: FitState, model: nn.Module) -> None:
            if state.step == 5:
                with torch.no_grad():
                    model.get_parameter("spare")[0] = math.inf

    train, val = batches(corpus)
    model = tiny_model()
    model.register_parameter("spare", nn.Parameter(torch.zeros(3)))
    with pytest.raises(TrainingDiverged, match="a trained weight is not finite after step 6"):
        fit(model, train, fit_config(tmp_path / "run", save_every=2), val=val, callbacks=[Poison()])
    assert [step for step, _ in checkpoint_dirs(tmp_path / "run")] == [2, 4]


def test_a_validation_loss_past_exps_range_is_inf_perplexity_and_stops(corpus: TokenizedCorpus,
                                                                       tmp_path: Path) -> None:
    """A finite validation loss above ~709 nats has perplexity inf (not exp(700)): the run stops as diverged."""
    class HugeWhenEvaluating(NaNAt):
        def __call__(self, model: nn.Module, batch: Batch) -> LossOutput:
            loss, n, metrics = self.inner(model, batch)
            return (loss if model.training else loss * 1000.0), n, metrics

    train, val = batches(corpus)
    with pytest.raises(TrainingDiverged, match=r"'val_ppl': inf"):
        fit(tiny_model(), train, fit_config(tmp_path / "run", steps=4), val=val, loss_fn=HugeWhenEvaluating(set()))


def test_skip_mode_drops_nonfinite_updates_and_stops_past_its_limit(corpus: TokenizedCorpus, tmp_path: Path) -> None:
    train, val = batches(corpus)
    cfg = fit_config(tmp_path / "skip", steps=10, save_every=5)
    cfg.optim.on_nonfinite, cfg.optim.max_skipped_steps = "skip", 2
    model = tiny_model()
    result = fit(model, train, cfg, val=val, loss_fn=NaNAt({3, 6}))
    assert result.steps == 10 and result.skipped_steps == 2
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert all(math.isfinite(r["val_ppl"]) for r in result.evals)

    cfg = fit_config(tmp_path / "limit", steps=10)
    cfg.optim.on_nonfinite, cfg.optim.max_skipped_steps = "skip", 2
    with pytest.raises(TrainingDiverged, match=r"3 steps skipped, more than optim\.max_skipped_steps 2"):
        fit(tiny_model(), train, cfg, val=val, loss_fn=NaNAt({2, 4, 6}))


def test_a_skipped_step_updates_nothing(corpus: TokenizedCorpus, tmp_path: Path) -> None:
    """Skipping the NaN step 3 of 3 leaves exactly the weights of a 2-step run with the same schedule."""
    train, val = batches(corpus)
    cfg = fit_config(tmp_path / "a", steps=3)
    cfg.optim.on_nonfinite = "skip"
    skipped = tiny_model()
    fit(skipped, train, cfg, val=val, loss_fn=NaNAt({3}))
    cfg2 = fit_config(tmp_path / "b", steps=3)
    cfg2.optim.on_nonfinite = "skip"
    two = tiny_model()
    fit(two, WindowBatches(corpus.train, WINDOW, BATCH, shuffle=True, seed=0), cfg2, val=val,
        loss_fn=NaNAt(set()), callbacks=[_StopAfter(2)])
    for (name, a), b in zip(skipped.state_dict().items(), two.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class _StopAfter(Callback):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, state: FitState, model: nn.Module) -> None:
        state.stop = state.step >= self.steps


def test_pretrain_cli_nan_exits_2_with_one_line_and_writes_no_model(cache: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main([*tiny_args(cache, out), "--optim.lr", "1e30", "--optim.grad-clip", "0", "--run.save-every", "1",
                 "--run.keep-checkpoints", "2", "--schedule.warmup-steps", "0"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("legolm: error: training diverged") and "Traceback" not in err
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    for _, ckpt in checkpoint_dirs(out):
        assert all_finite(ckpt / "model.safetensors")


def test_the_loss_plot_of_a_run_with_nothing_finite_warns_nothing(tmp_path: Path) -> None:
    """A run that diverges at once ends with its one error line, not a matplotlib legend warning before it."""
    pytest.importorskip("matplotlib")
    logger = MetricsLogger(tmp_path, plot=True)
    logger.log({"step": 1, "split": "train", "loss": math.nan, "lr": 1e-3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.close()
    assert (tmp_path / "loss.png").is_file()


def test_finite_json_refuses_nan_and_names_where(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"runs\[1\]\.final_val_ppl = nan"):
        finite_json({"runs": [{"final_val_ppl": 3.0}, {"final_val_ppl": math.nan}]}, "lct.json")
    assert json.loads(finite_json({"a": [1.5, {"b": 2}]}, "x")) == {"a": [1.5, {"b": 2}]}


def test_finetune_that_diverges_saves_no_adapter(tmp_path: Path, gpt2_tokenizer_dir: Path, shakespeare_text: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=50256, eos_token_id=50256)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_tokenizer_dir / name, tmp_path / "base" / name)
    (tmp_path / "text.txt").write_text(shakespeare_text[:30_000])
    out = tmp_path / "run"
    code = main(["finetune", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "text.txt"),
                 "--data.cache-dir", str(tmp_path / "cache"), "--data.val-fraction", "0.4", "--window", "32",
                 "--batch-size", "4",
                 "--max-steps", "6", "--eval.every", "3", "--eval-tokens", "200", "--optim.lr", "1e30",
                 "--optim.grad-clip", "0", "--schedule.warmup-steps", "0", "--no-run.progress", "--no-run.plot",
                 "--run.device", "cpu", "--run.out-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1].startswith("legolm: error: training diverged"), err
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


# -- the run directory: lock, overwrite ----------------------------------------------------------------
def _legolm() -> list[str]:
    found = shutil.which("legolm", path=str(Path(sys.executable).parent)) or shutil.which("legolm")
    assert found, "the legolm console script is not installed"
    return [found]


def tiny_args(cache: Path, out: Path, steps: int = 12) -> list[str]:
    return ["pretrain", "--data.source", "tinyshakespeare", "--data.max-documents", "20", "--data.tokenizer",
            "bpe:512", "--data.cache-dir", str(cache), "--model.preset", "tiny-pythia", "--window", "32",
            "--batch-size", "8", "--max-steps", str(steps), "--schedule.warmup-steps", "2", "--optim.lr", "3e-3",
            "--eval.every", "6", "--run.device", "cpu", "--run.out-dir", str(out), "--no-run.progress",
            "--no-run.plot", "--sample.max-new-tokens", "4"]


def _one_error_line(err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("legolm: error:") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_a_second_process_on_a_running_run_is_refused_naming_the_holder(cache: Path, tmp_path: Path,
                                                                        corpus: TokenizedCorpus) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(_legolm() + tiny_args(cache, out, steps=100_000) + ["--run.save-every", "5"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints").is_dir() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        config_before = (out / "config.yaml").read_text()
        second = subprocess.run(_legolm() + tiny_args(cache, out, steps=100_000) + ["--resume"], capture_output=True,
                                text=True, timeout=120, env=env)
        assert second.returncode == 2
        _one_error_line(second.stderr, f"in use by another legolm process (PID {first.pid})")
        assert (out / "config.yaml").read_text() == config_before
        assert first.poll() is None, "the refused process disturbed the running one"
    finally:
        first.kill()
        first.wait()


def test_the_lock_is_released_and_reentrant_in_one_process(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with hold_run_dir(out, overwrite=False, resume=False) as held:
        assert (held / MARKER).is_file() and (held / LOCK).read_text().strip() == str(os.getpid())
        with hold_run_dir(out, overwrite=True, resume=False):  # a command around fit: counted, not refused
            pass
    probe = subprocess.run([sys.executable, "-c", "from legolm.train.run_dir import hold_run_dir as h\n"
                            f"with h({str(out)!r}, False, True): print('ok')"], capture_output=True, text=True)
    assert probe.stdout.strip() == "ok", probe.stderr


@pytest.mark.parametrize("where", ["foreign", "cwd", "parent", "input"])
def test_overwrite_refuses_what_legolm_must_not_delete(where: str, cache: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(work / "sub")
    extra: list[str] = []
    if where == "foreign":
        out = work / "other"
        out.mkdir()
        (out / "chapter1.tex").write_text("mine")
    elif where == "cwd":
        out = Path(".")
        (work / "sub" / MARKER).write_text("")
    elif where == "parent":
        out = Path("..")
        (work / MARKER).write_text("")
    else:
        out = tmp_path / "old-run"
        out.mkdir()
        (out / MARKER).write_text("")
        shutil.copytree(cache, out / "cache")
        extra = ["--data.cache-dir", str(out / "cache")]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(tiny_args(cache, out) + extra + ["--overwrite"])
    expected = {"foreign": "is not a legolm run directory", "cwd": "the current directory or one above it",
                "parent": "the current directory or one above it", "input": "an input of this command"}[where]
    assert code == 2
    _one_error_line(capsys.readouterr().err, expected)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (work / "thesis.tex").read_text() == "years of work"


def test_overwrite_of_a_run_legolm_made_replaces_it(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with hold_run_dir(out, overwrite=False, resume=False):
        (out / "old.txt").write_text("from an earlier run")
    assert main([*tiny_args(cache, out, steps=6), "--overwrite", "--sample.prompt", ""]) == 0
    assert not (out / "old.txt").exists() and (out / "model" / "model.safetensors").is_file()
    assert (out / MARKER).is_file()


def test_finetune_overwrite_never_deletes_its_base_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / MARKER).write_text("")
    (out / "model" / "config.json").write_text("{}")
    code = main(["finetune", "--model", str(out / "model"), "--data", "tinyshakespeare", "--run.out-dir", str(out),
                 "--overwrite", "--run.device", "cpu"])
    assert code == 2
    _one_error_line(capsys.readouterr().err, "an input of this command")
    assert (out / "model" / "config.json").is_file()


# -- resume --------------------------------------------------------------------------------------------
def test_resume_with_other_data_tokenizer_window_or_model_is_refused_and_changes_nothing(
        cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main([*tiny_args(cache, out, steps=6), "--run.save-every", "3", "--sample.prompt", ""]) == 0
    capsys.readouterr()
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK}
    for change, fragment in ((["--data.max-documents", "24"], "the run trained on"),
                             (["--data.source", "tinystories"], "the run trained on"),
                             (["--window", "16"], "the run trained on 32-token windows"),
                             (["--data.tokenizer", "bpe:384"], "is of another model (wte.weight is 512x64 there, "
                                                               "384x64 here"),
                             (["--model.n-embd", "32"], "is of another model")):
        assert main(tiny_args(cache, out, steps=9) + change + ["--resume"]) == 2
        _one_error_line(capsys.readouterr().err, "cannot resume", fragment)
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK} == snapshot


def test_resuming_keeps_one_row_per_step_and_the_summary_covers_the_whole_run(
        cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    base = [*tiny_args(cache, out, steps=12), "--run.save-every", "6", "--sample.prompt", ""]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "--resume"]) == 0  # a finished run: nothing to train, nothing logged twice
    capsys.readouterr()
    assert main([*tiny_args(cache, out, steps=18), "--run.save-every", "6", "--sample.prompt", "", "--resume"]) == 0
    printed = capsys.readouterr().out
    rows = strict_json_lines(out / "metrics.jsonl")
    keys = [(r["step"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys)), keys
    assert [r["step"] for r in rows if r["split"] == "val"] == [6, 12, 18]
    fit_summary = json.loads((out / "summary.json").read_text())["fit"]
    assert [e["step"] for e in fit_summary["evals"]] == [6, 12, 18]
    assert fit_summary["steps"] == 18 and fit_summary["tokens"] == 18 * BATCH * WINDOW
    # the end of the run: wall time and mean tokens/s of the whole run, counts as integers with separators
    assert f"trained 18 steps, {18 * BATCH * WINDOW:,} tokens in " in printed and "tokens/s on average" in printed
    assert "e+0" not in printed, printed


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "truncated weights": lambda d: _truncate(d / "model.safetensors"),
    "empty optimizer": lambda d: (d / "optimizer.pt").write_bytes(b""),
    "garbage trainer": lambda d: (d / "trainer.json").write_text("{not json"),
    "missing rng": lambda d: (d / "rng.pt").unlink(),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_bit_for_bit(
        kind: str, corpus: TokenizedCorpus, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, val = batches(corpus)
    straight = tiny_model()
    fit(straight, train, fit_config(tmp_path / "straight", steps=8), val=val)

    out = tmp_path / "run"  # the same 8-step run, stopped after its checkpoint at step 6
    fit(tiny_model(), batches(corpus)[0], fit_config(out, steps=8, save_every=2, keep_checkpoints=3), val=val,
        callbacks=[_StopAfter(6)])
    CORRUPTIONS[kind](out / "checkpoints" / "step-00000006")
    (out / "checkpoints" / "notes").mkdir()  # a stray folder is ignored
    capsys.readouterr()
    resumed = tiny_model()
    result = fit(resumed, batches(corpus)[0], fit_config(out, steps=8, resume=True, save_every=2), val=val)
    err = capsys.readouterr()
    said = err.out + err.err
    assert "step-00000006 is unreadable" in said and "resumed from the previous checkpoint step-00000004" in said
    assert (out / "checkpoints" / ".step-00000006.unreadable").is_dir()  # kept for inspection, out of the way
    assert result.steps == 8
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_no_readable_checkpoint_is_one_error(corpus: TokenizedCorpus, tmp_path: Path) -> None:
    train, val = batches(corpus)
    out = tmp_path / "run"
    fit(tiny_model(), train, fit_config(out, steps=4, save_every=2), val=val)
    for _, ckpt in checkpoint_dirs(out):
        (ckpt / "trainer.json").write_text("")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        fit(tiny_model(), batches(corpus)[0], fit_config(out, steps=6, resume=True), val=val)
    assert len(checkpoint_dirs(out)) == 2  # nothing set aside when there is nothing to fall back to


# -- durability ----------------------------------------------------------------------------------------
def test_checkpoint_files_and_folders_are_fsynced_before_the_rename(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", str(Path(dst).resolve())))
        real_replace(src, dst)

    monkeypatch.setattr(legolm_io.os, "fsync", fsync)
    monkeypatch.setattr(legolm_io.os, "replace", replace)
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a.bin").write_bytes(b"x" * 10)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"y")
    rename = events.index(("replace", str(target.resolve())))
    synced_before = {Path(p).name for kind, p in events[:rename] if kind == "fsync"}
    assert {"a.bin", "b.bin", "sub", tmp.name} <= synced_before
    assert ("fsync", str(tmp_path.resolve())) in events[rename:]  # the rename itself is made durable
