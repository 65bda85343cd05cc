"""`legolm eval ppl` end to end: the console script on a tiny model and real text, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import legolm
from legolm.cli.main import main
from legolm.data import DataConfig, prepare_corpus
from legolm.data.tokenized import decoded_counts
from legolm.eval import sliding_window_ppl


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = shutil.which("legolm", path=str(Path(sys.executable).parent)) or shutil.which("legolm")
    assert script, "the `legolm` console script is not installed (pyproject [project.scripts])"
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=300, env=env)


def _one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}, stderr: {err!r}"
    assert len(lines) == 1 and lines[0].startswith("legolm: error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def env(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {**os.environ, "LEGOLM_DATA": str(shared_dir), "LEGOLM_CACHE": str(tmp_path_factory.mktemp("cache")),
            "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(autouse=True)
def _same_env_in_process(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("LEGOLM_DATA", "LEGOLM_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, env[key])


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer_dir: Path) -> Path:
    """A tiny random HF GPT-2 (block 64) with the real GPT-2 tokenizer files beside it."""
    d = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(d)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_tokenizer_dir / name, d / name)
    return d


def test_eval_ppl_console_script_matches_library(tiny_gpt2_dir: Path, env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "ppl.json"
    proc = _run(["eval", "ppl", "--model", str(tiny_gpt2_dir), "--data", "tinyshakespeare", "--max-length", "32",
                 "--stride", "16", "--max-tokens", "400", "--batch-size", "4", "--device", "cpu", "--json", str(out)],
                env)
    assert proc.returncode == 0, proc.stderr
    assert "| split | tokens scored |" in proc.stdout and "| val   | 399" in proc.stdout
    result = json.loads(out.read_text())

    corpus = prepare_corpus(DataConfig(source="tinyshakespeare", tokenizer=str(tiny_gpt2_dir)), progress=False)
    assert result["data_dir"] == str(corpus.directory)  # the CLI tokenized into the same cache entry
    ids = np.asarray(corpus.val[:400])
    n_bytes, n_words = decoded_counts(corpus.tokenizer, ids, corpus.eos_id)
    expected = sliding_window_ppl(legolm.load_pretrained(tiny_gpt2_dir), ids, 32, 16, n_bytes=n_bytes,
                                  n_words=n_words, progress=False)
    assert result["n_tokens"] == expected.n_tokens == 399
    assert result["nll_sum"] == pytest.approx(expected.nll_sum, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-5)
    assert result["word_ppl"] == pytest.approx(expected.word_ppl, rel=1e-5)
    # an untrained model (random weights) is not learning: the sanity check says so, in the output and the JSON
    assert expected.ppl > 1000 and result["ppl_check"]["band"] == "not_learning"
    assert result["ppl_check"]["message"] in proc.stdout.splitlines()

    again = _run(["eval", "ppl", "--model", str(tiny_gpt2_dir), "--data", "tinyshakespeare", "--max-length", "32",
                  "--stride", "16", "--max-tokens", "400", "--json", str(out)], env)
    _one_line_error(again.returncode, again.stderr, "already exists", "--overwrite")


def test_eval_ppl_on_tokenized_folder_checks_the_tokenizer(tiny_gpt2_dir: Path, capsys: pytest.CaptureFixture[str],
                                                           env: dict[str, str], tmp_path: Path,
                                                           shakespeare_text: str) -> None:
    small = tmp_path / "shakespeare_20k.txt"  # whole splits stay small: ~20 documents of >= 1,000 chars
    small.write_text(shakespeare_text[:20_000], encoding="utf-8")
    ours = prepare_corpus(DataConfig(source=str(small), tokenizer="gpt2", min_document_chars=1000), progress=False)
    for split in ("val", "all"):  # whole splits: bytes and words come from the manifest
        out = tmp_path / f"{split}.json"
        code = main(["eval", "ppl", "--model", str(tiny_gpt2_dir), "--data", str(ours.directory), "--max-length", "64",
                     "--stride", "64", "--batch-size", "32", "--split", split, "--device", "cpu", "--json", str(out)])
        assert code == 0, capsys.readouterr().err
        assert f"| {split}" in capsys.readouterr().out
        result, counts = json.loads(out.read_text()), ours.counts(split)
        assert result["n_bytes"] == counts["bytes"] and result["n_words"] == counts["words"]
        assert result["n_tokens"] == counts["tokens"] - 1 - (counts["tokens"] - 1) // 64  # disjoint: firsts unscored

    pythia = prepare_corpus(DataConfig(source=str(small), tokenizer="pythia", min_document_chars=1000), progress=False)
    proc = _run(["eval", "ppl", "--model", str(tiny_gpt2_dir), "--data", str(pythia.directory), "--max-length", "64",
                 "--stride", "32"], env)
    _one_line_error(proc.returncode, proc.stderr, "fingerprint", "'pythia'")


def test_eval_ppl_bad_input_subprocess(tiny_gpt2_dir: Path, env: dict[str, str], tmp_path: Path) -> None:
    proc = _run(["eval", "ppl", "--model", str(tiny_gpt2_dir), "--data", str(tmp_path / "nope.txt"),
                 "--max-length", "32", "--stride", "16"], env)
    _one_line_error(proc.returncode, proc.stderr, "nope.txt", "named source")


@pytest.mark.parametrize("extra, fragments", [
    (["--max-length", "32", "--stride", "40"], ("stride 40",)),
    (["--max-length", "65", "--stride", "32"], ("block_size",)),
    (["--max-length", "32", "--stride", "16", "--data.val-fraction", "1.5"], ("val_fraction",)),
    (["--max-length", "32", "--stride", "16", "--tokenizer", "bpe:x"], ("bpe:<vocab_size>",)),
    (["--max-length", "32", "--stride", "16", "--split", "test"], ("--split", "expected one of auto|val|train|all")),
    (["--max-length", "32", "--stride", "16", "--ppl-bands.normal-up-to", "2"], ("ppl_bands", "0 < 5 <= 2 <= 1000")),
])
def test_eval_ppl_bad_input_in_process(tiny_gpt2_dir: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                                       fragments: tuple[str, ...]) -> None:
    try:
        code = main(["eval", "ppl", "--model", str(tiny_gpt2_dir), "--data", "tinyshakespeare", "--device", "cpu",
                     *extra])
    except SystemExit as exit_:  # argparse usage errors
        code = int(exit_.code or 0)
    _one_line_error(code, capsys.readouterr().err, *fragments)


def test_model_without_tokenizer_asks_for_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=4)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "bare")
    capsys.readouterr()  # transformers' own progress output
    code = main(["eval", "ppl", "--model", str(tmp_path / "bare"), "--data", "tinyshakespeare", "--max-length", "32",
                 "--stride", "16"])
    _one_line_error(code, capsys.readouterr().err, "brings no tokenizer", "pass --tokenizer")


def test_eval_ppl_scores_all_of_a_single_document_file(tiny_gpt2_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A file given to eval ppl is the user's evaluation text: one document, no flags, all of it scored."""
    text = "Once upon a time there was a little cat who liked to play in the garden with her friends. " * 20
    story = tmp_path / "my.txt"
    story.write_text(text + "\n", encoding="utf-8")
    out = tmp_path / "ppl.json"
    code = main(["eval", "ppl", "--model", str(tiny_gpt2_dir), "--data", str(story), "--max-length", "64",
                 "--stride", "32", "--device", "cpu", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    n = len(legolm.load_tokenizer(tiny_gpt2_dir).encode(text.strip()))
    assert result["split"] == "all" and result["n_tokens"] in (n - 1, n), (result, n)  # the first too after a separator
