"""`python -m benchmarks.ce_step --smoke`: the softmax step's sweep, the copy and the peers run on the CPU (Triton's
interpreter), the library's launch settings are marked, and legolm's loss and gradient match torch in fp32."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.bench_smoke import run_smoke


def test_ce_step_benchmark_smoke_sweeps_marks_the_default_and_is_accurate(tmp_path: Path) -> None:
    from legolm.kernels.cross_entropy import CE_STEP

    out = tmp_path / "ce_step.json"
    proc = run_smoke("ce_step", "--json", str(out))
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    default, tiles = f"legolm {CE_STEP.block_v}/{CE_STEP.num_warps}/- (default)", f"legolm 256/{CE_STEP.num_warps}/-"
    assert list(rows) == ["copy", tiles, default, "liger", "torch compile"]
    table = [line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table == ["impl", *rows]
    assert rows["copy"]["ms"] > 0
    if importlib.util.find_spec("liger_kernel") is None:
        assert rows["liger"] == {"impl": "liger", "status": "not installed"}
    for name in (default, tiles, "torch compile"):
        r = rows[name]
        assert 0 < r["ms_min"] <= r["ms"] <= r["ms_max"]
        # bf16 logits: the loss is summed in fp32 (tiny error); each gradient entry is stored in bf16 (|g| <= 1:
        # one rounding is at most 2^-8; the interpreter truncates, so up to twice that)
        assert r["loss_rel_err"] < 1e-5, (name, r["loss_rel_err"])
        assert r["grad_max_abs_err"] < 2 ** -7, (name, r["grad_max_abs_err"])
