"""Lagged Cache Training vs exact sequential training on one GPU: time per epoch and exact val perplexity.

Both methods train the same recurrent-context Pythia (`configs/lct-gpu.yaml`: 4 x 256, 512 Tiny
Shakespeare windows of 128 tokens, bf16) in this process, one after the other, through `legolm lct`'s
own code; the peer of LCT is the exact token-by-token recurrence. The text comes from ``.bench/shared``
(made by `benchmarks.prepare_data`), used as the shared-data folder.

    python -m benchmarks.prepare_data            # once, where the shared data is
    python -m benchmarks.lct                     # GPU (carry .bench)
    python -m benchmarks.lct --name lct-1024 --set max_train_windows=1024 --set lct.grad_passes=1 ...
    python -m benchmarks.lct --smoke             # CPU: 1 epoch of 64 windows, fp32: checks it runs
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from benchmarks.common import BENCH_DATA, ROOT, device_info, overrides, print_table, write_result
from legolm.config import config_from_dict, load_yaml, merge
from legolm.lct.train import LCTConfig

SMOKE = {"epochs": 1, "max_train_windows": 64, "lag_windows": 8,
         "run": {"device": "cpu", "precision": "fp32", "out_dir": "runs/lct-bench-smoke"}}


def rows_of(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method: mean epoch seconds (first and later), final exact val ppl, final lag."""
    rows = []
    for run in summary["runs"]:
        epochs = run["epochs"]
        later = epochs[1:] or epochs
        rows.append({"impl": run["method"], "epoch 1 s": f"{epochs[0]['train_seconds']:.2f}",
                     "later epochs s": f"{sum(e['train_seconds'] for e in later) / len(later):.2f}",
                     "final val ppl": f"{run['final_val_ppl']:.2f}",
                     "final lag": f"{epochs[-1]['lag_rel']:.1%}" if "lag_rel" in epochs[-1] else ""})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "lct-gpu.yaml"))
    parser.add_argument("--smoke", action="store_true", help="CPU, 1 epoch of 64 windows: checks it runs")
    parser.add_argument("--name", default="lct", help="result file label")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted, YAML value), e.g. lct.grad_passes=1; repeatable")
    args = parser.parse_args()
    shared = BENCH_DATA / "shared"
    if not (shared / "data" / "tinyshakespeare.txt").is_file():
        raise SystemExit(f"missing {shared}: run `python -m benchmarks.prepare_data` first (needs LEGOLM_DATA)")
    os.environ["LEGOLM_DATA"] = str(shared)  # the GPU machine has no ../shared
    data = merge(load_yaml(args.config), overrides(args.set))
    data = merge(data, SMOKE) if args.smoke else data
    cfg = config_from_dict(LCTConfig, merge(data, {"run": {"overwrite": True}}))
    from legolm.recipes import lct

    summary = lct.run(cfg)
    rows = rows_of(summary)
    comparison = summary["comparison"]
    versus = (f": LCT epochs {comparison['epoch_speedup']:.1f}x faster, val ppl ratio {comparison['ppl_ratio']:.3f}"
              if comparison else "")
    print(f"\n{' vs '.join(cfg.methods)}, {cfg.max_train_windows} windows of {cfg.window}, {cfg.epochs} epochs, "
          f"{cfg.run.precision}, {device_info()['device']}{versus}")
    table = print_table(rows, ["impl", "epoch 1 s", "later epochs s", "final val ppl", "final lag"])
    if not args.smoke:
        epochs = {run["method"]: run["epochs"] for run in summary["runs"]}  # per-epoch seconds, exact val ppl, lag
        payload = {**device_info(), "config": summary["config"], "comparison": comparison, "rows": rows,
                   "epochs": epochs, "table": table}
        print(f"wrote {write_result(args.name, payload)}")


if __name__ == "__main__":
    main()
