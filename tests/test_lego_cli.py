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

from legolm.checkpoints.loader import load_pretrained
from legolm.cli.main import main
from legolm.eval.sanity import PPLBands
from legolm.model.lego import LegoLM

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


def _in_process(args: list[str], tmp: Path, capfd: pytest.CaptureFixture[str],
                monkeypatch: pytest.MonkeyPatch) -> subprocess.CompletedProcess[str]:
    """`main` as the console script calls it, from ``tmp`` with `_run`'s cache: exit code and what reached the
    process's stdout and stderr (file descriptors). The bad-input cases run here, without a new interpreter's
    imports; the console script's own refusal is `test_existing_run_dir_is_not_overwritten`."""
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("LEGOLM_CACHE", str(tmp / "cache"))
    capfd.readouterr()
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


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
    for column in ("shallow PPL", "deep PPL", "routed PPL (soft)", "decode-path PPL", "shallow ratio", "acceptance",
                   "call cost", "weight cost", "vs full depth", "wall/call"):
        assert column in stdout
    for label in ("full depth", "never exit", "calibrated r=0.5", "r=0.3", "always exit", "speculative d=2"):
        assert f"| {label} |" in stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = {(r["label"], r["kv_mode"]): r for r in summary["rows"]}
    assert {m for (label, m) in rows if label.startswith("calibrated")} == {"fill", "skip", "propagate"}
    assert rows[("full depth", "—")]["speedup"] == 1.0 and rows[("full depth", "—")]["call_cost"] == 1.0
    assert rows[("never exit", "fill")]["call_cost"] == 1.0
    assert rows[("always exit", "fill")]["call_cost"] == pytest.approx(1 / 3)  # 1 of 3 layers
    assert rows[("always exit", "fill")]["hard_routed_ppl"] == pytest.approx(summary["phase1_ppl"])
    assert rows[("never exit", "fill")]["hard_routed_ppl"] == pytest.approx(summary["deep_ppl"])
    spec = rows[("speculative d=2", "—")]
    assert spec["decode_ppl"] == rows[("never exit", "fill")]["decode_ppl"]  # lossless: the deep model's path
    assert 0.0 <= spec["acceptance"] <= 1.0 and 1.0 <= spec["tokens_per_round"] <= 3.0
    q = summary["quality"]
    assert q["all_shallow_ppl"] == pytest.approx(summary["phase1_ppl"]) and q["hard_deep_ppl"] > 1.0
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
    model = load_pretrained(run_dir / "model")
    assert isinstance(model, LegoLM) and model.extended and model.split == 1 and model.n_layer == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert model.threshold == pytest.approx(summary["threshold"])
    choice = summary["kv_choice"]  # fill and skip were both measured at τ: the model keeps the better one
    assert choice["kv_mode"] in ("fill", "skip") and model.meta.kv_mode == choice["kv_mode"]
    assert f"kv mode saved with the model: {choice['kv_mode']}" in (run_dir.parent / "stdout.txt").read_text()
    idx = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        deep = model.forward_exits(idx).deep_logits
        torch.testing.assert_close(model(idx), deep, rtol=0, atol=0)


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
    (["--decode.fused-kernel", "persistent"], ("fused-kernel", "splitk")),
    (["--decode.if-node-kv-modes", "propagate"], ("decode.if_node_kv_modes takes fill and skip",)),
    (["--decode.kv-tolerance", "-0.1"], ("decode.kv_tolerance must be >= 0",)),
    (["--lego.calibrate", "quality"], ("lego.calibrate: quality", "pretrained route")),
    (["--lego.calibrate", "often"], ("lego.calibrate",)),
    (["--lego.phase2-easy-weight", "-1"], ("lego.phase2_easy_weight must be >= 0",)),
    (["--lego.distill-weight", "1.5"], ("lego.distill_weight must be in [0, 1]",)),
    (["--lego.distill-weight", "-0.1", "--phase3.max-steps", "10"], ("lego.distill_weight must be in [0, 1]",)),
    (["--lego.distill-into", "heads"], ("lego.distill_into", "draft|exit")),
    (["--phase3.max-steps", "-1"], ("phase3.max_steps must be >= 0",)),
    (["--phase3.max-steps", "10", "--phase3.optim.lr", "-1"], ("phase3.optim.lr",)),
])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, flags: list[str], fragments: tuple[str, ...],
                                        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    proc = _in_process(["lego", "--config", TINY, "--run.out-dir", str(tmp_path / "run"), *flags], tmp_path, capfd,
                       monkeypatch)
    _assert_user_error(proc, *fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags", [
    ["--early-exit", "threshold"],
    ["--early-exit", "threshold", "--target-ratio", "0.3", "--kv-mode", "skip", "--fused"],
    ["--early-exit", "speculative", "--draft-tokens", "2", "--fused"],
    ["--early-exit", "speculative", "--draft-tokens", "2", "--fused", "--fused-kernel", "splitk"],  # exact sums
])
def test_generate_decodes_the_lego_model_through_its_exits(run_dir: Path, flags: list[str]) -> None:
    """The text, then one stats line; speculative output equals plain greedy decoding of the same model."""
    args = ["generate", "--model", str(run_dir / "model"), "--prompt", "The king", "--greedy",
            "--max-new-tokens", "8", "--no-stop-at-eos"]
    proc = _run([*args, *flags], run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = proc.stdout.rstrip("\n").rsplit("\n", 1)[1]
    kv = flags[flags.index("--kv-mode") + 1] if "--kv-mode" in flags else \
        json.loads((run_dir / "model" / "lego.json").read_text())["kv_mode"]  # the model's own, measured by lego
    head = "speculative: acceptance" if "speculative" in flags else f"early exit (kv {kv}): shallow ratio"
    assert stats.startswith(head) and "tok/s" in stats, stats
    if "speculative" in flags:
        plain = _run(args, run_dir.parent)
        assert plain.returncode == 0 and proc.stdout == plain.stdout + stats + "\n"


@pytest.mark.parametrize(("flags", "fragments"), [
    (["--early-exit", "threshold", "--threshold", "1.5"], ("threshold must be in [0, 1]",)),
    (["--early-exit", "threshold", "--target-ratio", "0"], ("target_ratio must be in (0, 1)",)),
    (["--early-exit", "speculative", "--draft-tokens", "0"], ("draft_tokens must be >= 1",)),
    (["--early-exit", "sometimes"], ("--early-exit", "expected one of none|threshold|speculative")),
])
def test_generate_bad_early_exit_input_is_one_line(run_dir: Path, flags: list[str], fragments: tuple[str, ...],
                                                   capfd: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    proc = _in_process(["generate", "--model", str(run_dir / "model"), "--prompt", "The", "--greedy", *flags],
                       run_dir.parent, capfd, monkeypatch)
    _assert_user_error(proc, *fragments)


def test_generate_early_exit_on_a_model_without_an_exit_is_one_line(smollm2_gguf: Path, tmp_path: Path) -> None:
    proc = _run(["generate", "--model", str(smollm2_gguf), "--prompt", "The", "--greedy", "--early-exit", "threshold"],
                tmp_path)
    _assert_user_error(proc, "needs a LEGO model with a shallow exit")


@pytest.mark.parametrize(("calibrate", "joint", "cost"),
                         [("ratio", 0.0, "weights"), ("quality", 0.0, "weights"), ("ratio", 0.5, "weights"),
                          ("ratio", 0.0, "decode")])
def test_lego_from_a_pretrained_checkpoint_chooses_its_split_by_the_curve(tmp_path: Path, shared_dir: Path,
                                                                          calibrate: str, joint: float,
                                                                          cost: str) -> None:
    """The pretrained route end to end: tuned-lens exits at the candidates, the split curve, phase 2 on the
    model's own upper blocks, and a model/ that loads as a LegoLM whose deep model is the checkpoint's
    architecture; the summary compares the routed perplexity with the unmodified model's.

    Calibrated by quality on this random base, the trained exit beats the untrained upper blocks, so every
    token may exit within tolerance and phase 2 has nothing to learn from: one line saying so (the mid-range
    case is hand-checked in test_lego.py). With ``lego.joint_exit_weight`` the model trains with its exits in
    phase 1: the curve's full-depth perplexity moves away from the unmodified model's, which stays the
    reference of the summary and the tolerance. With ``lego.split_cost decode`` every candidate's cost is also
    measured by decoding, and the split is the cheapest by that measure."""
    from legolm.checkpoints.native import save_checkpoint
    from legolm.core.config import ModelConfig
    from legolm.model.transformer import TransformerLM

    torch.manual_seed(0)
    base = TransformerLM(ModelConfig.from_name("tiny-pythia", vocab_size=50304, layers=["pythia"] * 4))
    save_checkpoint(base, tmp_path / "base")
    out = tmp_path / "run"
    # 32-token windows, not the config's 64: half the work (three heads over Pythia's 50,304 tokens a step), the same
    # outcomes (the joint run moves full depth by 24% either way; the quality route finds no hard example)
    proc = _run(["lego", "--config", str(ROOT / "configs" / "lego-split-tiny.yaml"), "--model.init",
                 str(tmp_path / "base"), "--run.out-dir", str(out), "--lego.calibrate", calibrate, "--window", "32",
                 "--lego.joint-exit-weight", str(joint), *(["--lego.exit-lr-scale", "10"] if joint else []),
                 "--lego.split-cost", cost], tmp_path)
    if calibrate == "quality":
        _assert_user_error(proc, "no hard examples", "every token exits within tolerance", "lego.split_tolerance")
        assert "calibrated" not in proc.stdout
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    curve = {p["split"]: p for p in summary["split_curve"]}
    assert summary["vs_unmodified"]["unmodified_ppl"] == pytest.approx(curve[1]["reference_ppl"], rel=1e-4)
    assert "vs the unmodified model's" in proc.stdout and "vs the trained deep model's" in proc.stdout
    vs = summary["vs_unmodified"]  # the gap the exits spend is also shown against the model after training
    assert vs["deep_ppl"] == pytest.approx(summary["deep_ppl"])
    assert vs["routed_over_deep"] == pytest.approx(summary["routed_ppl"] / summary["deep_ppl"])
    assert set(curve) == {1, 2} and all(p["full_ppl"] == curve[1]["full_ppl"] for p in curve.values())
    if joint:  # the whole model trained: its full depth is another model than the unmodified one
        assert "unmodified model: validation perplexity" in proc.stdout
        assert abs(curve[1]["full_ppl"] / curve[1]["reference_ppl"] - 1) > 1e-3
    else:
        assert curve[1]["full_ppl"] == curve[1]["reference_ppl"]
    assert curve[1]["cost"] < curve[2]["cost"]  # fewer blocks below the exit: cheaper
    if cost == "decode":
        assert all(p["decode_cost"] > 0 for p in curve.values()) and "decode cost" in proc.stdout
        within = [p for p in curve.values() if p["within_tolerance"]]
        if within:
            assert summary["split"] == min(within, key=lambda p: p["decode_cost"])["split"]
    else:
        assert all(p["decode_cost"] is None for p in curve.values())
    assert summary["split"] in curve and (out / "split_curve.csv").is_file()
    model = load_pretrained(out / "model")
    assert isinstance(model, LegoLM) and model.meta.exit_lens and model.split == summary["split"]
    assert model.n_layer == 4 and model.threshold == pytest.approx(summary["threshold"])
