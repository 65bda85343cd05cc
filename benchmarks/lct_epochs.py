"""Per-epoch exact val perplexity of several LCT / sequential runs: one table, one PNG, one JSON.

Reads the per-epoch table that `legolm lct` prints (``| method | epoch | train s | val ppl (exact) | ...``),
from logs of one run or from ``tail``-joined logs (``==> NAME.log <==`` headers), and the ``split: val``
lines of a run's ``metrics.jsonl`` (for a run cut before its end table)::

    python -m benchmarks.lct_epochs --name lct-gut-epochs benchmarks/results/lct-gut-2026-11-29.log \\
        benchmarks/results/lct-gut-4096-refresh-2026-11-29.log \\
        --metrics lct-gut-4096-seq=benchmarks/results/lct-gut-val-metrics-2026-11-29.jsonl:128
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from benchmarks.common import print_table, write_result

HEADER = re.compile(r"^==> (?:.*/)?(?P<name>[^/]+?)(?:\.log)? <==$")
ROW = re.compile(r"^\| (?P<method>lct|sequential) \| (?P<epoch>\d+) \| (?P<seconds>[\d.]+) \| (?P<ppl>[\d.]+) \|")


def parse_log(path: Path) -> dict[str, list[dict[str, float]]]:
    """Run name -> [{epoch, train_s, val_ppl}] from the per-epoch tables of a (joined) log."""
    runs: dict[str, list[dict[str, float]]] = {}
    name = path.stem
    for line in path.read_text().splitlines():
        if m := HEADER.match(line.strip()):
            name = m["name"]
        elif m := ROW.match(line.strip()):
            runs.setdefault(name, []).append({"epoch": int(m["epoch"]), "train_s": float(m["seconds"]),
                                              "val_ppl": float(m["ppl"])})
    return runs


def parse_metrics(spec: str) -> tuple[str, list[dict[str, float]]]:
    """``NAME=FILE.jsonl:STEPS_PER_EPOCH``: that run's val evaluations (lines whose text holds NAME when the
    file joins several runs, as ``grep`` output does) as epochs."""
    name, rest = spec.split("=", 1)
    file, per_epoch = rest.rsplit(":", 1)
    epochs = []
    for line in Path(file).read_text().splitlines():
        if name not in line and ":" in line.split("{", 1)[0]:
            continue
        record = json.loads("{" + line.split("{", 1)[1])
        if record.get("split") == "val":
            epochs.append({"epoch": record["step"] // int(per_epoch), "val_ppl": float(record["val_ppl"])})
    return name, epochs


def plot(runs: dict[str, list[dict[str, float]]], png: Path) -> str:
    """Val ppl per epoch, one line per run (matplotlib when installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: pip install matplotlib"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, epochs in runs.items():
        style = "k-" if "seq" in name else "-"
        ax.plot([e["epoch"] for e in epochs], [e["val_ppl"] for e in epochs], style, marker="o", label=name)
    ax.set(xlabel="epoch", ylabel="exact val perplexity", yscale="log", title="LCT vs exact sequential training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return f"plot: {png}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path, help="logs holding `legolm lct`'s per-epoch tables")
    parser.add_argument("--metrics", action="append", default=[], metavar="NAME=FILE:STEPS_PER_EPOCH",
                        help="a run's val lines from metrics.jsonl (a run cut before its end table); repeatable")
    parser.add_argument("--name", default="lct-epochs", help="result file label")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {}
    for log in args.logs:
        runs.update(parse_log(log))
    for spec in args.metrics:
        name, epochs = parse_metrics(spec)
        runs.setdefault(name, epochs)
    if not runs:
        raise SystemExit("no per-epoch tables found in the logs")
    rows: list[dict[str, Any]] = [{"run": name, **{f"epoch {e['epoch']}": f"{e['val_ppl']:.2f}" for e in epochs}}
                                  for name, epochs in sorted(runs.items())]
    width = max(len(epochs) for epochs in runs.values())
    table = print_table(rows, ["run", *(f"epoch {i}" for i in range(1, width + 1))])
    path = write_result(args.name, {"runs": runs, "table": table})
    print(plot(runs, path.with_suffix(".png")))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
