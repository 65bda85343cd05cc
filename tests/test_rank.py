"""Rank analysis of weight deltas: hand-checked energies, truncated-SVD LoRA init, and `legolm analyze rank`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import legolm
from legolm.adapters import LoRAConfig, LoRALinear, adapter_parameters, inject_lora, merge_and_unload, save_adapter
from legolm.analysis import (
    checkpoint_deltas,
    energy_curve,
    init_lora_from_delta,
    lora_deltas,
    rank_for_energy,
    rank_profiles,
)
from legolm.errors import ConfigError, LegolmError


def test_energy_and_rank_hand_values() -> None:
    e = energy_curve(torch.tensor([4.0, 3.0]))  # 16/25, 25/25
    assert e.tolist() == [0.64, 1.0]
    assert [rank_for_energy(e, t) for t in (0.5, 0.64, 0.65, 0.9, 1.0)] == [1, 1, 2, 2, 2]
    assert rank_for_energy(energy_curve(torch.zeros(3)), 0.9) == 0
    with pytest.raises(ConfigError, match="threshold"):
        rank_for_energy(e, 0.0)


def test_profile_of_a_hand_matrix() -> None:
    (p,) = rank_profiles({"w": torch.diag(torch.tensor([3.0, 4.0, 0.0]))})
    assert p.singular_values.tolist() == [4.0, 3.0, 0.0]
    assert p.norm == 5.0 and p.rank_for(0.9) == 2 and p.rank_for(0.6) == 1 and p.shape == (3, 3)


def test_init_lora_from_delta_is_the_truncated_svd() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(24, 16, generator=g, dtype=torch.float64)
    layer = LoRALinear(nn.Linear(16, 24).double(), r=4, alpha=8.0)  # scaling 2
    init_lora_from_delta(layer, delta)
    u, s, vt = np.linalg.svd(delta.numpy(), full_matrices=False)  # reference: numpy's SVD
    best = (u[:, :4] * s[:4]) @ vt[:4]
    np.testing.assert_allclose(layer.delta_weight().detach().numpy(), best, atol=1e-10)
    # Eckart–Young: the squared relative error of the best rank-r approximation is 1 - E(r)
    err = np.linalg.norm(delta.numpy() - best) ** 2 / np.linalg.norm(delta.numpy()) ** 2
    assert err == pytest.approx(1 - float(energy_curve(torch.from_numpy(s))[3]), rel=1e-9)
    x = torch.randn(3, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ torch.from_numpy(best).T)
    with pytest.raises(ConfigError, match="does not fit"):
        init_lora_from_delta(layer, delta.T)


def _tiny(seed: int = 0) -> legolm.TransformerLM:
    torch.manual_seed(seed)
    return legolm.TransformerLM(legolm.ModelConfig.from_name("tiny-gpt2")).eval()


def test_merged_lora_delta_has_the_lora_rank() -> None:
    base, tuned = _tiny(), _tiny()
    inject_lora(tuned, LoRAConfig(r=3, alpha=6.0, target_modules=["c_attn", "c_fc"]))
    with torch.no_grad():
        for p in adapter_parameters(tuned):
            p.normal_(0, 0.3)
    from_adapter = {p.name: p for p in rank_profiles(lora_deltas(tuned))}
    merged = merge_and_unload(tuned)
    profiles = rank_profiles(checkpoint_deltas(base, merged))
    changed = [p for p in profiles if p.norm > 0]
    assert [p.name for p in changed] == sorted(from_adapter, key=[p.name for p in changed].index)
    assert len(changed) == 4 and all(p.rank_for(1 - 1e-9) == 3 for p in changed)
    for p in changed:  # the merged weights' delta has the adapter's spectrum
        expected = from_adapter[p.name].singular_values[:3]
        torch.testing.assert_close(p.singular_values[:3], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(LegolmError, match="different layers"):
        checkpoint_deltas(base, legolm.TransformerLM(legolm.ModelConfig.from_name("tiny-llama")))


# -- CLI -----------------------------------------------------------------------------------------
def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("legolm", path=str(Path(sys.executable).parent)) or shutil.which("legolm")
    assert exe, "the legolm console script is not installed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300, env=env)


def _full_finetune(model: legolm.TransformerLM, ids: torch.Tensor, steps: int = 15) -> None:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_cli_rank_of_a_real_text_finetune_and_an_adapter(tmp_path: Path, shakespeare_text: str,
                                                         gpt2_tokenizer_dir: Path) -> None:
    tok = legolm.Tokenizer.from_dir(gpt2_tokenizer_dir)
    ids = (torch.tensor(tok.encode(shakespeare_text[:10_000])) % 512)[: 8 * 33].view(8, 33)
    base = _tiny()
    legolm.save_checkpoint(base, tmp_path / "base")
    tuned = _tiny()
    _full_finetune(tuned, ids)
    legolm.save_checkpoint(tuned, tmp_path / "tuned")

    out = tmp_path / "rank"
    res = _run(["analyze", "rank", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"),
                "--out", str(out), "--energy", "0.9", "0.95"])
    assert res.returncode == 0, res.stderr
    assert "rank@0.9" in res.stdout and "blocks.1.mlp.proj" in res.stdout and "8/8 layers changed" in res.stdout
    rows = list(csv.DictReader((out / "rank.csv").read_text().splitlines()))
    assert len(rows) == 8 and {"layer", "shape", "rank@0.9", "rank@0.95"} <= set(rows[0])
    assert all(1 <= int(r["rank@0.9"]) <= int(r["rank@0.95"]) <= int(r["full_rank"]) for r in rows)
    data = json.loads((out / "rank.json").read_text())
    assert len(data["energy"]["blocks.0.attn.qkv"]) == 64 and data["energy"]["blocks.0.attn.qkv"][-1] == 1.0
    assert (out / "energy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = _run(["analyze", "rank", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"),
                  "--out", str(out)])
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [again.stderr.strip()]
    assert "already exists" in again.stderr and "Traceback" not in again.stderr

    cfg = LoRAConfig(r=2, alpha=4.0, target_modules=["c_attn"])
    inject_lora(base, cfg)
    with torch.no_grad():
        for p in adapter_parameters(base):
            p.normal_(0, 0.2)
    save_adapter(base, tmp_path / "adapter", cfg)
    res = _run(["analyze", "rank", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                "--energy", "0.99", "--no-plot"])
    assert res.returncode == 0, res.stderr
    assert "2/2 layers changed; E≥0.99: median rank 2, max 2" in res.stdout

    bad = _run(["analyze", "rank", "--base", str(tmp_path / "base")])
    assert bad.returncode == 2 and "exactly one of --tuned" in bad.stderr


def test_cli_rank_without_matplotlib_writes_csv_and_json_and_skips_the_png(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Like every other command: the PNG is skipped with a note, the table files are written, exit 0."""
    from legolm.cli.main import main

    base, tuned = _tiny(), _tiny()
    with torch.no_grad():  # a rank-1 change of one matrix
        tuned.blocks[0].attn.qkv.weight.add_(torch.outer(torch.ones(192), torch.ones(64)))
    legolm.save_checkpoint(base, tmp_path / "base")
    legolm.save_checkpoint(tuned, tmp_path / "tuned")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "rank"
    code = main(["analyze", "rank", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"),
                 "--out", str(out), "--energy", "0.9"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["rank.csv", "rank.json"]
    assert f"wrote rank.csv, rank.json to {out}" in captured.out
    assert "note: energy.png skipped: pip install 'legolm[plot]' (matplotlib) to draw it" in captured.out
    rows = {r["layer"]: r for r in csv.DictReader((out / "rank.csv").read_text().splitlines())}
    assert rows["blocks.0.attn.qkv"]["rank@0.9"] == "1" and rows["blocks.0.attn.proj"]["rank@0.9"] == "0"
    assert json.loads((out / "rank.json").read_text())["energy"]["blocks.0.attn.qkv"][0] == 1.0
