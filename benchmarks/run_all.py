"""Every GPU benchmark in one run, legolm against its peer in the same process, one report.

Runs each benchmark module in its own process (so one model's memory and compiled graphs do not
leak into the next), then reads the JSON each wrote to ``benchmarks/results/`` and prints one
table: for every benchmark row, the figure that matters and the peer's where there is one. The
whole report (the combined table and every benchmark's own table) goes to
``benchmarks/results/all-<date>.json``; paste the table into docs/results/benchmarks.md with the date and device.

    python -m benchmarks.prepare_data                      # once, where the shared data is
    python -m benchmarks.run_all                           # GPU (carry .bench)
    python -m benchmarks.run_all --only decode lora        # a subset
    python -m benchmarks.run_all --smoke                   # CPU: every harness runs (figures meaningless)
    python -m benchmarks.run_all --collect                 # no runs: today's JSONs (run one by one) -> one table

The multi-GPU scaling benchmark is separate (`python -m benchmarks.distributed` on 2 GPUs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from typing import Any

from benchmarks.common import RESULTS, device_info, print_table, write_result

SUITE: dict[str, list[str]] = {
    "pretrain": ["benchmarks.pretrain"],
    "lora": ["benchmarks.lora"],
    "lora-pythia-160m": ["benchmarks.lora", "--model", "pythia-160m"],  # the litgpt rows (litgpt has no GPT-2)
    "skip2lora": ["benchmarks.skip2lora"],
    "skip2lora-pythia-160m": ["benchmarks.skip2lora", "--model", "pythia-160m"],
    "linear_ce": ["benchmarks.linear_ce"],
    "ce_step": ["benchmarks.ce_step"],
    "decode": ["benchmarks.decode", "--no-hf-static"],
    "early_exit": ["benchmarks.early_exit"],
    "memory_layers": ["benchmarks.memory_layers"],
    "lct": ["benchmarks.lct"],
    "serve": ["benchmarks.serve"],
}


def run(name: str, argv: list[str], timeout: float) -> str:
    """Run one benchmark module; return 'ok' or why it failed (the suite goes on)."""
    print(f"== {name}: python -m {' '.join(argv)}", flush=True)
    try:
        proc = subprocess.run([sys.executable, "-m", *argv], timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    return "ok" if proc.returncode == 0 else f"exit {proc.returncode}"


def latest(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}-{date.today().isoformat()}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def summary_rows(name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per row of a benchmark's JSON: its label columns, then its other columns as text."""
    rows = []
    labels = ("model", "impl", "variant", "label", "kv_mode", "batch", "context", "server", "clients")
    for row in result.get("rows", []):
        label = " ".join(str(row[k]) for k in labels if k in row)
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                            if k not in labels and v not in ("", None))
        rows.append({"benchmark": name, "row": label, "figures": figures})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(SUITE), help="run these benchmarks only")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per benchmark")
    parser.add_argument("--smoke", action="store_true", help="each benchmark's CPU smoke mode")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: combine the JSONs the benchmarks wrote today (run one at a time)")
    args = parser.parse_args()
    chosen = {n: a for n, a in SUITE.items() if not args.only or n in args.only}
    if args.collect:
        status = {name: "ok" if latest(name) else "not run today" for name in chosen}
    else:
        status = {name: run(name, [*argv, "--smoke"] if args.smoke else argv, args.timeout)
                  for name, argv in chosen.items()}
    if args.smoke:  # crash checks only: no figures, and the day's combined table stays as it is
        print("\n".join(f"{name}: {state}" for name, state in status.items()))
        return
    rows: list[dict[str, Any]] = []
    tables: dict[str, str] = {}
    for name, state in status.items():
        result = latest(name) if state == "ok" else None
        if result is None:
            rows.append({"benchmark": name, "row": "-", "figures": f"no result ({state})"})
            continue
        rows += summary_rows(name, result)
        tables[name] = result.get("table", "")
    source = next((r for r in map(latest, status) if r), None) if args.collect else device_info()
    where = f"{source['device']}, torch {source['torch']}" if source else "no results"
    print(f"\nlegolm benchmark suite, {where}, {date.today()}")
    table = print_table(rows, ["benchmark", "row", "figures"])
    payload = {**(source or device_info()), "status": status, "table": table, "tables": tables}
    print(f"wrote {write_result('all', payload)}")


if __name__ == "__main__":
    main()
