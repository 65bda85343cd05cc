"""`python -m benchmarks.low_rank_ce --smoke`: the fused low-rank kernels' sweep and the library's unfused way run on
the CPU (Triton's interpreter, fp32), the defaults are marked, the best settings are combined, and every row's
loss, dz and Gᵀz match torch."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench_smoke import run_smoke


def test_low_rank_ce_benchmark_smoke_sweeps_both_kernels_and_is_accurate(tmp_path: Path) -> None:
    out = tmp_path / "low_rank_ce.json"
    proc = run_smoke("low_rank_ce", "--json", str(out))
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["copy", "unfused (library)", "fused (default)", "rows 16/64/4/-", "rows 32/64/4/-",
                          "columns 32/128/4/-", "fused (best rows + best columns)"]
    table = [line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table == ["impl", *rows]
    fastest_rows = min(("rows 16/64/4/-", "rows 32/64/4/-"), key=lambda k: rows[k]["ms"])
    m = fastest_rows.split()[1].split("/")[0]
    assert rows["fused (best rows + best columns)"]["launch"].startswith(f"LowRankLaunch(rows=TileLaunch(block_m={m},")
    for name, r in rows.items():
        assert r["ms"] > 0, name
        errs = {k: v for k, v in r.items() if k.endswith("_rel_err")}
        assert len(errs) == {"copy": 0, "columns 32/128/4/-": 1}.get(name, 2 if name.startswith("rows") else 3)
        for key, err in errs.items():  # fp32 logits and factors: products summed in fp32, in other orders
            assert err < 1e-5, (name, key, err)
