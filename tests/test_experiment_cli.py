"""``legolm experiment`` end to end on real text (TinyStories + the reversal-curse sentences): the
console script trains the four model kinds under one budget and writes the table and chart; bad
input is one line, exit 2, before anything is trained."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from legolm.cli.main import main

KINDS = ["pythia", "infini", "multi_memory", "hierarchical"]
REVERSAL_FILES = ["p2d_prompts_train", "d2p_prompts_train", "p2d_prompts_test", "d2p_prompts_test",
                  "p2d_reverse_prompts_test", "d2p_reverse_prompts_test"]
EXAMPLES_PER_FILE = 30
SEG = 16


def _legolm() -> list[str]:
    found = shutil.which("legolm", path=str(Path(sys.executable).parent)) or shutil.which("legolm")
    assert found, "the `legolm` console script is not installed (pyproject [project.scripts])"
    return [found]


@pytest.fixture(scope="module")
def reversal_dir(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 30 real examples of each reversal-curse file the experiment reads."""
    out = tmp_path_factory.mktemp("reversal")
    for name in REVERSAL_FILES:
        lines = (shared_dir / "data/reversal_curse/name_description" / f"{name}.jsonl").read_text().splitlines()
        (out / f"{name}.jsonl").write_text("\n".join(lines[:EXAMPLES_PER_FILE]) + "\n")
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenized")


def tiny_args(cache: Path, reversal_dir: Path, out: Path, models: list[str] = KINDS) -> list[str]:
    """30 TinyStories documents + 60 reversal sentences, a 512-token BPE, 2-layer 64-wide models."""
    return ["experiment", "--models", *models, "--samples", "30", "--epochs", "1", "--lr", "3e-3",
            "--data", "tinystories", "--data.tokenizer", "bpe:512", "--data.cache-dir", str(cache),
            "--window", "64", "--batch-size", "8", "--model.base", "tiny-pythia", "--model.num-layers", "2",
            "--model.segment-len", str(SEG), "--model.num-memories", "2", "--reversal.data-dir", str(reversal_dir),
            "--schedule.warmup-steps", "3", "--eval.every", "0", "--run.device", "cpu", "--run.out-dir", str(out),
            "--no-run.progress"]


def test_experiment_trains_every_kind_and_writes_table_and_chart(cache: Path, reversal_dir: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "exp"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    suspicious_everywhere = ["--eval.ppl-bands.suspicious-below", "1e9", "--eval.ppl-bands.normal-up-to", "1e9",
                             "--eval.ppl-bands.not-learning-above", "1e9"]  # the sanity check must fire
    proc = subprocess.run(_legolm() + tiny_args(cache, reversal_dir, out) + suspicious_everywhere,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == KINDS
    table = (out / "results.md").read_text()
    assert table.splitlines()[0].startswith("| model | params | val PPL | fwd PPL | bwd PPL | gap |")
    assert all(f"| {k} |" in table for k in KINDS) and "| infini |" in proc.stdout
    with open(out / "results.csv") as f:
        assert [r["model"] for r in csv.DictReader(f)] == KINDS
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by = {r["model"]: r for r in rows}
    # the same budget for everyone: same steps and tokens
    assert len({(r["steps"], r["tokens"]) for r in rows}) == 1 and rows[0]["steps"] > 0
    for r in rows:
        for key in ("val_ppl", "forward_ppl", "backward_ppl", "tokens_per_s", "peak_memory_mb", "train_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["model"], key)
        assert math.isclose(r["gap"], r["backward_ppl"] - r["forward_ppl"])
        assert r["forward_ppl"] < 512 and r["val_ppl"] < 512, "training must beat a uniform guess over the vocabulary"
        assert 0 <= r["forward_acc"] <= 1 and 0 <= r["backward_acc"] <= 1
        assert (out / r["model"] / "metrics.jsonl").is_file() and (out / r["model"] / "model" / "legolm.json").is_file()
    for r in rows:  # one sanity line per model, printed and in results.md
        line = f"ppl check: {r['model']} val perplexity {r['val_ppl']:,.2f} < 1e+09 -> suspicious: leakage"
        assert line in proc.stdout and line in table
    assert by["pythia"]["memory_kb"] == 0
    one = (64 * 64 + 64) * 4  # fp32 M and z of one 64-wide memory head (tiny-pythia is 64 wide)
    assert by["infini"]["memory_kb"] * 1024 == one + 8  # + the int64 segment counter
    assert by["multi_memory"]["memory_kb"] * 1024 == 2 * one + 2 * 4 + 8  # + tokens per memory
    assert by["hierarchical"]["memory_kb"] * 1024 == 2 * one + 8
    assert by["pythia"]["params"] < by["infini"]["params"]  # the memory projections and gate


# -- bad input: exit 2, one line, nothing trained or written ------------------------------------------
def _bad(capsys: pytest.CaptureFixture[str], args: list[str], out: Path, *fragments: str) -> None:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    assert code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("legolm: error:") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists() or (out / "keep.txt").is_file(), "bad input left an output directory behind"


def test_bad_input_is_refused_before_training(cache: Path, reversal_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "exp"
    args = tiny_args(cache, reversal_dir, out, ["pythia", "infini"])
    _bad(capsys, [*args, "--models", "pythia", "transformer"], out, "unknown model kind(s) ['transformer']")
    _bad(capsys, [*args, "--models", "infini", "infini"], out, "lists a kind twice")
    _bad(capsys, [*args, "--samples", "1"], out, "samples must be >= 2")
    _bad(capsys, [*args, "--model.segment-len", "0"], out, "segment_len must be an integer >= 1")
    _bad(capsys, [*args, "--model.memory-heads", "3"], out, "memory_heads=3 must divide")
    _bad(capsys, [*args, "--reversal.data-dir", str(tmp_path / "nowhere")], out, "does not exist")
    _bad(capsys, [*args, "--window", "4096"], out, "exceeds the model's block_size")
    _bad(capsys, [*args, "--lr", "-1"], out, "optim.lr must be > 0")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _bad(capsys, args, out, "already exists", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# -- memory state sizes --------------------------------------------------------------------------------
def _state_rows(capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, int]:
    assert main(["experiment", "--state-sizes", *flags]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    return {r[1].strip(): int(r[5].replace(",", "")) for r in rows}


def test_state_sizes_table_reaches_the_documented_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    """pythia-70m width 512, fp32. One head of 512: 512·512·4 + 512·4 = 1,050,624 B per memory; eight heads
    of 64: 8·64·64·4 + 8·64·4 = 133,120 B (the guidelines' ~135 KB); + 8 B segment counter, + 4 B per memory
    (token counts) for multi_memory; 4 memories for multi_memory and hierarchical (~540 KB)."""
    default = _state_rows(capsys)
    assert default == {"pythia": 0, "infini": 1_050_632, "multi_memory": 4 * 1_050_624 + 16 + 8,
                       "hierarchical": 4 * 1_050_624 + 8}
    documented = _state_rows(capsys, "--model.memory-heads", "8")
    assert documented == {"pythia": 0, "infini": 133_128, "multi_memory": 532_504, "hierarchical": 532_488}
    assert _state_rows(capsys, "--model.memory-heads", "8", "--model.num-memories", "2",
                       "--models", "hierarchical") == {"hierarchical": 2 * 133_120 + 8}
