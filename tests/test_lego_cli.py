"""``legolm lego`` end to end as a subprocess on real text (Tiny Shakespeare), and its bad-input errors."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from legolm.checkpoints.load import load_pretrained
from legolm.eval.sanity import PPLBands
from legolm.lego import load_lego

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "lego-tiny.yaml")


def _run(args: list[str], tmp: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("legolm", path=str(Path(sys.executable).parent)) or shutil.which("legolm")
    assert exe, "the `legolm` console script is not installed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "LEGOLM_CACHE": str(tmp / "cache")}
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)


def _assert_user_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("legolm: error:"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Path:
    tmp = tmp_path_factory.mktemp("lego_cli")
    out = tmp / "run"
    suspicious = ["--phase2.eval.ppl-bands.suspicious-below", "1e9", "--phase2.eval.ppl-bands.normal-up-to", "1e9",
                  "--phase2.eval.ppl-bands.not-learning-above", "1e9"]  # phase 2's sanity check must fire
    proc = _run(["lego", "--config", TINY, "--run.out-dir", str(out), *suspicious], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp / "stdout.txt").write_text(proc.stdout)
    return out


def test_lego_command_prints_the_table_and_writes_its_outputs(run_dir: Path) -> None:
    stdout = (run_dir.parent / "stdout.txt").read_text()
    for column in ("phase-1 PPL", "deep PPL", "routed PPL", "shallow ratio", "compute cost", "MACs", "decode speedup"):
        assert column in stdout
    for label in ("never exit", "calibrated r=0.5", "r=0.3", "always exit"):
        assert f"| {label} |" in stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = {(r["label"], r["kv_mode"]): r for r in summary["rows"]}
    assert {m for (label, m) in rows if label.startswith("calibrated")} == {"fill", "skip", "propagate"}
    assert rows[("never exit", "fill")]["compute_cost"] == 1.0
    assert rows[("always exit", "fill")]["compute_cost"] == pytest.approx(1 / 3)  # 1 of 3 layers
    assert rows[("always exit", "fill")]["hard_routed_ppl"] == pytest.approx(summary["phase1_ppl"])
    assert rows[("never exit", "fill")]["hard_routed_ppl"] == pytest.approx(summary["deep_ppl"])
    assert summary["phase1"]["steps"] >= 1 and summary["phase2"]["steps"] >= 1
    for name in ("phase1/metrics.csv", "phase2/metrics.csv", "curve.csv", "config.yaml"):
        assert (run_dir / name).is_file(), name
    if importlib.util.find_spec("matplotlib"):
        assert (run_dir / "curve.png").stat().st_size > 0


def test_every_lego_perplexity_gets_its_sanity_line(run_dir: Path) -> None:
    """Phase 1's bands are the defaults; phase 2's (deep, routed) are set to fire on any perplexity."""
    stdout = (run_dir.parent / "stdout.txt").read_text().splitlines()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert PPLBands().check("phase-1 (shallow)", summary["phase1_ppl"], 512).message in stdout  # bpe:512
    for label, key in (("deep", "deep_ppl"), ("routed (calibrated)", "routed_ppl")):
        line = f"ppl check: {label} perplexity {summary[key]:,.2f} < 1e+09 -> suspicious: leakage"
        assert any(s.startswith(line) for s in stdout), line


def test_the_saved_model_loads_as_lego_and_as_a_plain_deep_model(run_dir: Path) -> None:
    model = load_lego(run_dir / "model")
    assert model.extended and model.split == 1 and model.n_layer == 3
    assert model.threshold == pytest.approx(json.loads((run_dir / "summary.json").read_text())["threshold"])
    idx = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        deep = model(idx).deep_logits
        torch.testing.assert_close(load_pretrained(run_dir / "model")(idx), deep, rtol=0, atol=0)


def test_existing_run_dir_is_not_overwritten(run_dir: Path) -> None:
    proc = _run(["lego", "--config", TINY, "--run.out-dir", str(run_dir)], run_dir.parent)
    _assert_user_error(proc, "already exists", "--overwrite")


@pytest.mark.parametrize(("flags", "fragments"), [
    (["--lego.target-ratio", "1.5"], ("target_ratio must be in (0, 1)",)),
    (["--lego.target-ratio", "0"], ("target_ratio must be in (0, 1)",)),
    (["--lego.num-layers", "1"], ("lego.num_layers=1 must exceed", "1 layers")),
    (["--lego.threshold", "1.5"], ("lego.threshold must be in [0, 1]",)),
    (["--lego.threshold", "-0.2"], ("lego.threshold must be in [0, 1]",)),
    (["--no-lego.phase1"], ("extend() needs a trained shallow model",)),
    (["--decode.kv-mode", "lazy"], ("kv-mode",)),
])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, flags: list[str], fragments: tuple[str, ...]) -> None:
    proc = _run(["lego", "--config", TINY, "--run.out-dir", str(tmp_path / "run"), *flags], tmp_path)
    _assert_user_error(proc, *fragments)
    assert not (tmp_path / "run").exists()
