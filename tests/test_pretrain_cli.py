"""``legolm pretrain`` end to end on real text: the console script, kill -9 + --resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import legolm
from legolm.cli.main import main
from legolm.data.tokenized import DataConfig, prepare_corpus
from legolm.eval.perplexity import sliding_window_ppl
from legolm.eval.sanity import PPLBands

# Bands that make any finite perplexity "suspicious": the sanity check must fire under the held-out line.
SUSPICIOUS_EVERYWHERE = ["--eval.ppl-bands.suspicious-below", "1e9", "--eval.ppl-bands.normal-up-to", "1e9",
                         "--eval.ppl-bands.not-learning-above", "1e9"]


def _legolm() -> list[str]:
    found = shutil.which("legolm", path=str(Path(sys.executable).parent)) or shutil.which("legolm")
    assert found, "the `legolm` console script is not installed (pyproject [project.scripts])"
    return [found]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenized")


def tiny_args(cache: Path, out: Path, steps: int = 30) -> list[str]:
    """20 Tiny Shakespeare documents, a 512-token BPE, the tiny Pythia preset, 32-token windows."""
    return ["pretrain", "--data.source", "tinyshakespeare", "--data.max-documents", "20", "--data.tokenizer",
            "bpe:512", "--data.cache-dir", str(cache), "--model.preset", "tiny-pythia", "--window", "32",
            "--batch-size", "8", "--max-steps", str(steps), "--schedule.warmup-steps", "5", "--optim.lr", "3e-3",
            "--eval.every", "10", "--run.device", "cpu", "--run.out-dir", str(out), "--no-run.progress",
            "--no-run.plot", "--sample.max-new-tokens", "12"]


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(_legolm() + args, capture_output=True, text=True, timeout=timeout, env=env)


def test_pretrain_trains_evaluates_saves_and_the_model_loads(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli(tiny_args(cache, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1].replace(",", "")) for r in table] == [10, 20, 30]
    ppl = [float(r.split("|")[4]) for r in table]
    assert ppl[0] > ppl[1] > ppl[2] and ppl[0] < 512  # falling, and below a uniform guess over 512 tokens
    assert "held-out sliding-window perplexity (window 32, stride 16" in proc.stdout
    assert "sample: Once upon a time" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    check = PPLBands().check("held-out", summary["final"]["ppl"], 512)  # vocabulary: the 512-token BPE
    assert summary["ppl_check"]["band"] == check.band and check.message in proc.stdout.splitlines()
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "model/legolm.json", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    # The saved checkpoint is the trained model: the same held-out perplexity, recomputed here.
    model = legolm.load_pretrained(out / "model")
    corpus = prepare_corpus(DataConfig(source="tinyshakespeare", tokenizer="bpe:512", max_documents=20,
                                       cache_dir=str(cache)), progress=False)
    again = sliding_window_ppl(model, corpus.val, 32, 16, 8, "cpu", progress=False)
    assert again.ppl == pytest.approx(summary["final"]["ppl"], rel=1e-5)
    gen = run_cli(["generate", "--model", str(out / "model"), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                   "--greedy", "--device", "cpu", "--echo"])
    assert gen.returncode == 0 and gen.stdout.startswith("ROMEO:"), gen.stderr[-2000:]


def test_kill_9_then_resume_gives_bit_identical_weights(cache: Path, tmp_path: Path) -> None:
    steps = ["--max-steps", "100", "--run.save-every", "10", "--eval.every", "50", "--sample.prompt", ""]
    straight = run_cli(tiny_args(cache, tmp_path / "straight") + steps + SUSPICIOUS_EVERYWHERE)
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert "ppl check: held-out perplexity" in straight.stdout and "-> suspicious: leakage" in straight.stdout

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(_legolm() + tiny_args(cache, out) + steps, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    first = out / "checkpoints" / "step-00000010"
    deadline = time.monotonic() + 240
    while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert first.is_dir() and not (out / "model").exists()

    resumed = run_cli(tiny_args(cache, out) + steps + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- bad input: exit 2, one line, no run directory left behind -----------------------------------------
def _bad(capsys: pytest.CaptureFixture[str], args: list[str], out: Path, *fragments: str) -> None:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    assert code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines and lines[-1].startswith("legolm: error:"), captured.err
    assert sum(line.startswith("legolm: error:") for line in lines) == 1 and "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    assert not out.exists(), "bad input left a run directory behind"


def test_bad_config_values(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    _bad(capsys, [*tiny_args(cache, out), "--optim.lr", "-0.001"], out, "optim.lr must be > 0")
    _bad(capsys, [*tiny_args(cache, out), "--batch-size", "0"], out, "batch_size must be >= 1")
    _bad(capsys, [*tiny_args(cache, out), "--window", "256"], out, "window 256 exceeds", "block_size 128")
    _bad(capsys, [*tiny_args(cache, out), "--model.vocab-size", "256"], out, "tokenizer has 512 tokens",
         "256")
    _bad(capsys, [*tiny_args(cache, out), "--eval.ppl-bands.suspicious-below", "50"], out, "eval.ppl_bands:",
         "0 < 50 <= 30 <= 1000")


def test_the_triton_loss_kernel_off_the_gpu_is_one_line(cache: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a GPU (and without Triton's interpreter) the Triton softmax step cannot run: said before the run
    directory exists, with both ways out."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "run"
    _bad(capsys, [*tiny_args(cache, out), "--loss-chunk-tokens", "64", "--loss-kernel", "triton"],
         out, "loss_kernel triton runs on a CUDA GPU, not cpu", "TRITON_INTERPRET=1", "or use loss_kernel torch")


def test_bad_data(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _bad(capsys, [*tiny_args(cache, out), "--data.source", str(empty)], out, "empty corpus")
    short = tmp_path / "short.txt"
    short.write_text("<|endoftext|>".join(["Once upon a time there was a cat.", "The end of a story."] * 2))
    _bad(capsys, [*tiny_args(cache, out), "--data.source", str(short), "--data.tokenizer", "gpt2",
                  "--data.val-fraction", "0.5"], out, "fewer than one window")
    _bad(capsys, [*tiny_args(cache, out), "--data.tokenizer", "no-such-tokenizer-xyz"], out, "no-such-tokenizer")


def test_existing_run_dir_is_refused_by_the_console_script(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli(tiny_args(cache, out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("legolm: error:") and "already exists" in lines[0] and "--overwrite" in lines[0]
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
