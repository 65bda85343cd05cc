"""`python -m benchmarks.linear_ce --smoke`: every row runs on the CPU (Triton's interpreter for the kernels), the
table and the JSON list every row, and legolm's gradients stay within a bf16 bound of the fp32 reference."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from benchmarks.linear_ce import row_names
from tests.bench_smoke import run_smoke

SMOKE_CHUNKS, SMOKE_VOCAB_PASS = [64, 32], ["32:256"]  # what --smoke uses


def test_linear_ce_benchmark_smoke_has_every_row_and_bounded_gradient_errors(tmp_path: Path) -> None:
    out = tmp_path / "linear_ce.json"
    proc = run_smoke("linear_ce", "--json", str(out))
    names = row_names(SMOKE_CHUNKS, SMOKE_VOCAB_PASS)
    assert len(names) == 9 and "legolm triton chunk 32 vocab 256" in names
    assert {"plain eager", "plain compile", "liger"} <= set(names)

    table = [line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "impl" and table[1:] == names

    result = json.loads(out.read_text())
    assert result["complete"] and result["shape"] == {"tokens": 128, "hidden": 64, "vocab": 1024}
    rows = {r["impl"]: r for r in result["rows"]}
    assert list(rows) == names
    liger = importlib.util.find_spec("liger_kernel") is not None
    for name, r in rows.items():
        if name.startswith("liger") and not liger:
            assert r == {"impl": name, "status": "not installed"}
            continue
        assert "status" not in r, f"{name}: {r.get('status')}"  # nothing else is skipped or failed
        assert 0 < r["ms_min"] <= r["ms"] <= r["ms_max"] and r["extra_gb"] is None  # no CUDA memory on the CPU
        if name.startswith("legolm"):  # bf16 keeps ~3 significant digits: 1e-2 relative is far above rounding
            assert r["loss_err"] < 1e-3, (name, r["loss_err"])
            assert r["dx_rel"] < 1e-2 and r["dw_rel"] < 1e-2, (name, r["dx_rel"], r["dw_rel"])
            assert r["dx_max_abs"] < 1e-4 and r["dw_max_abs"] < 5e-3, (name, r["dx_max_abs"], r["dw_max_abs"])
