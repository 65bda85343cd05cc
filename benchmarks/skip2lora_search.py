"""Skip2-LoRA against LoRA at equal trainable parameters, each at its own best settings: a search.

Every run is one ``legolm finetune`` (its own process, its own run directory, resumable: a run whose
``summary.json`` exists is read, not repeated) of a base config merged with the grid's ``common``
settings, a corpus and the run's own overrides. Early stopping keeps the best epoch
(``eval.patience`` + ``eval.keep_best`` in ``common``), so "epochs" is searched inside each run.

    python -m benchmarks.skip2lora_search --grid configs/skip2lora-search-smollm2.yaml
    python -m benchmarks.skip2lora_search --grid configs/skip2lora-search-smollm2.yaml --only shakespeare

Per corpus, the table gives each run's held-out sliding-window perplexity (the same tokens for every
run), its gap to the best LoRA run, and the mean seconds of its epochs after the first (Skip-Cache
epochs for Skip2-LoRA); the PNG plots the frontier (perplexity against seconds per later epoch) with
the issue's goal line (best LoRA + 5%). Results: ``benchmarks/results/<name>-<date>.json`` and
``<out>/results.jsonl``.

The grid file:

    base: configs/skip2lora-vs-lora-smollm2.yaml     # a finetune config every run starts from
    out: runs/s2-search                              # run directories: <out>/<corpus>/<run>
    name: skip2lora-search-smollm2                   # result file label
    common: {epochs: 4, eval: {patience: 1, keep_best: true}}
    corpora: {shakespeare: {data: {source: tinyshakespeare}}, ...}
    runs: [{name: lora-lr2e-3, method: lora, set: {optim: {lr: 2.0e-3}}, corpora: [shakespeare]}, ...]

(a run without ``corpora`` runs on every corpus; runs go in the listed order). Selection uses the
validation split that the held-out perplexity also reads: the search budget is the same for both
methods, so is the optimism.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, print_table, write_result
from legolm.config import config_from_dict, dump_yaml, load_yaml, merge
from legolm.recipes.finetune import FinetuneConfig
from legolm.utils.io import atomic_savefig, atomic_write_text, pyplot

GOAL = 1.05  # the bar: held-out ppl within 5% of the best LoRA's


def run_config(grid: dict[str, Any], corpus: str, run: dict[str, Any], out: Path) -> FinetuneConfig:
    """The finetune config of one run (checked by the dataclass: an unknown key fails before anything runs)."""
    data = merge(load_yaml(ROOT / grid["base"]), grid.get("common", {}))
    data = merge(data, grid["corpora"][corpus])
    data = merge(data, {**run.get("set", {}), "method": run["method"],
                        "run": {**run.get("set", {}).get("run", {}), "out_dir": str(out / corpus / run["name"]),
                                "progress": False, "overwrite": True}})  # an unfinished run of this search
    return config_from_dict(FinetuneConfig, data)


def planned(grid: dict[str, Any], only: list[str] | None) -> list[tuple[str, dict[str, Any]]]:
    """(corpus, run) pairs in the grid's run order (each run on its corpora), ``only`` those corpora."""
    corpora = [c for c in grid["corpora"] if not only or c in only]
    return [(c, r) for r in grid["runs"] for c in corpora if c in r.get("corpora", list(grid["corpora"]))]


def execute(cfg: FinetuneConfig, log: Path) -> None:
    """``legolm finetune --config <this run's YAML>`` in its own process, its output in ``log``."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(dump_yaml(cfg))
    try:
        with log.open("w") as out:
            proc = subprocess.run([sys.executable, "-m", "legolm.cli.main", "finetune", "--config", f.name],
                                  stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise SystemExit(f"{cfg.run.out_dir}: finetune failed (exit {proc.returncode}); see {log}")


def result_row(corpus: str, run: dict[str, Any], cfg: FinetuneConfig) -> dict[str, Any]:
    s = json.loads((Path(cfg.run.out_dir) / "summary.json").read_text())
    seconds = [e["train_seconds"] for e in s["epochs"]]
    later = seconds[1:] or seconds
    vals = [e["val_ppl"] for e in s["epochs"]]
    return {"corpus": corpus, "run": run["name"], "method": s["method"], "trainable": s["fit"]["trainable_params"],
            "before": s["before"]["ppl"], "after": s["after"]["ppl"], "epochs": len(seconds),
            "best epoch": 1 + min(range(len(vals)), key=vals.__getitem__) if vals else 0,
            "epoch 1 s": seconds[0] if seconds else float("nan"), "later s": sum(later) / max(len(later), 1),
            "val ppl per epoch": vals, "settings": run.get("set", {})}


def report(rows: list[dict[str, Any]]) -> str:
    """Per corpus, sorted by held-out ppl, with the gap to the best LoRA run."""
    table_rows = []
    for corpus in dict.fromkeys(r["corpus"] for r in rows):
        mine = sorted((r for r in rows if r["corpus"] == corpus), key=lambda r: r["after"])
        lora = min((r["after"] for r in mine if r["method"] == "lora"), default=float("nan"))
        for r in mine:
            r["vs best lora"] = r["after"] / lora - 1
            table_rows.append({**r, "held-out ppl": f"{r['before']:.2f} -> {r['after']:.2f}",
                               "vs best lora": f"{r['vs best lora']:+.1%}", "trainable": f"{r['trainable']:,}",
                               "epoch 1 s": f"{r['epoch 1 s']:.1f}", "later s": f"{r['later s']:.1f}",
                               "best epoch": f"{r['best epoch']}/{r['epochs']}"})
    return print_table(table_rows, ["corpus", "run", "method", "trainable", "held-out ppl", "vs best lora",
                                    "best epoch", "epoch 1 s", "later s"])


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Held-out ppl against seconds per later epoch, one panel per corpus, with the 5% goal line (False: no
    matplotlib)."""
    plt = pyplot()
    if plt is None:
        return False
    corpora = list(dict.fromkeys(r["corpus"] for r in rows))
    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.5), squeeze=False)
    for ax, corpus in zip(axes[0], corpora, strict=True):
        mine = [r for r in rows if r["corpus"] == corpus]
        for method, colour in (("lora", "tab:blue"), ("skip2lora", "tab:orange")):
            pts = [r for r in mine if r["method"] == method]
            ax.scatter([r["later s"] for r in pts], [r["after"] for r in pts], c=colour, label=method)
            for r in pts:
                ax.annotate(r["run"], (r["later s"], r["after"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        lora = [r["after"] for r in mine if r["method"] == "lora"]
        if lora:
            ax.axhline(min(lora) * GOAL, ls="--", c="grey", label="best LoRA + 5%")
        ax.axhline(mine[0]["before"], ls=":", c="black", label="base model")
        ax.set(xlabel="seconds per epoch after the first", ylabel="held-out perplexity (log)", yscale="log",
               title=corpus)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="the search's YAML (see above)")
    parser.add_argument("--only", nargs="+", help="corpora to run (default: all)")
    parser.add_argument("--collect", action="store_true", help="only read the runs that finished; run nothing")
    args = parser.parse_args()
    grid = load_yaml(args.grid)
    out = ROOT / grid.get("out", "runs/s2-search")
    plan = [(c, r, run_config(grid, c, r, out)) for c, r in planned(grid, args.only)]  # all checked first
    rows = []
    for i, (corpus, run, cfg) in enumerate(plan, 1):
        done = (Path(cfg.run.out_dir) / "summary.json").is_file()
        if not done and not args.collect:
            print(f"[{i}/{len(plan)}] {corpus} / {run['name']} ...", flush=True)
            (out / corpus).mkdir(parents=True, exist_ok=True)
            execute(cfg, out / corpus / f"{run['name']}.log")
            done = True
        if done:
            rows.append(result_row(corpus, run, cfg))
            r = rows[-1]
            print(f"  {corpus} / {run['name']}: held-out {r['before']:.2f} -> {r['after']:.2f}, "
                  f"later epochs {r['later s']:.1f} s", flush=True)
    if not rows:
        raise SystemExit("no finished run to report")
    table = report(rows)
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    png = out / "frontier.png"
    plotted = plot(rows, png)
    name = grid.get("name", "skip2lora-search")
    print(f"wrote {out / 'results.jsonl'}, {png if plotted else 'no PNG (matplotlib missing)'}, "
          f"{write_result(name, {'grid': grid, 'rows': rows, 'table': table})}")


if __name__ == "__main__":
    main()
