"""Running a benchmark's ``--smoke`` mode the way a user would: ``python -m benchmarks.<name> --smoke ...`` from the
repository root, one CPU thread, Triton's kernels in its interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_smoke(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """``python -m benchmarks.<module> --smoke *args``; fails the test unless it exits 0."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--smoke", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
