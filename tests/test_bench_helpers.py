"""Helpers the GPU benchmarks share, checked on CPU (a hang here once cost a GPU run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.common import cycled
from legolm.train.batches import WindowBatches


def test_cycled_goes_through_epochs_instead_of_hanging() -> None:
    ids = np.arange(3 * 2 * 8 + 1, dtype=np.uint16)  # 6 windows of 8: 3 batches of 2 per epoch
    source = WindowBatches(ids, 8, 2, shuffle=True, seed=0)
    out = cycled(source, 7, torch.device("cpu"))
    assert len(out) == 7 and source.epoch == 2
    first_epoch = sorted(int(s) for b in out[:3] for s in b["sample_ids"])
    assert first_epoch == list(range(6))  # every window once per epoch
    assert not all(torch.equal(a["sample_ids"], b["sample_ids"]) for a, b in zip(out[:3], out[3:6], strict=True))


def test_serve_benchmark_runs_end_to_end_on_the_cpu() -> None:
    """`python -m benchmarks.serve --smoke`: both servers start, stream to 1 and 2 clients, and the table prints
    (the GPU run cannot be checked here; this catches a benchmark that hangs or crashes)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--smoke"], capture_output=True, text=True,
                          timeout=600, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tiny-gpt2")]
    assert len(rows) == 4 and {"legolm serve", "hf generate server"} <= {r.split("|")[2].strip() for r in rows}


def test_early_exit_benchmark_overrides_nest_dotted_keys_with_yaml_values() -> None:
    from benchmarks.early_exit import overrides

    assert overrides(["lego.phase2_easy_weight=0.5", "lego.split_candidates=[3, 6]", "window=64", "run.device=cpu"]) \
        == {"lego": {"phase2_easy_weight": 0.5, "split_candidates": [3, 6]}, "window": 64, "run": {"device": "cpu"}}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        overrides(["lego.phase2_easy_weight"])
