"""Run metrics: one JSON line per event (``metrics.jsonl``), a CSV of the same rows, a loss plot.

Rows are plain dicts with a ``step`` and a ``split`` (``train`` or ``val``). The JSONL file is
appended as training goes (a killed run keeps what it logged); the CSV and ``loss.png`` are
rewritten atomically from it at each evaluation and at the end. TensorBoard is optional.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from legolm.errors import ConfigError
from legolm.utils.io import atomic_savefig, atomic_write_text, pyplot

JSONL, CSV, PLOT = "metrics.jsonl", "metrics.csv", "loss.png"


def format_loss(value: float | None) -> str:
    """A loss for a log line or table (``-`` when there is none, e.g. no step since the last evaluation)."""
    return "-" if value is None else f"{value:.4f}"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics JSONL file; a last line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLogger:
    """Append rows to ``metrics.jsonl``; write ``metrics.csv`` and ``loss.png`` on `flush`.

    Args:
        run_dir: Where the files go.
        resume_step: When resuming, rows logged after this step (by the killed run) are dropped.
        plot: Draw ``loss.png`` (needs matplotlib).
        tensorboard: Also write TensorBoard events under ``run_dir/tb``.
        enabled: Write anything at all (False on ranks > 0 of a distributed run: rank 0 logs).
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, plot: bool = True,
                 tensorboard: bool = False, enabled: bool = True) -> None:
        self.dir, self.plot, self.enabled = run_dir, plot, enabled
        self.plot_note: str | None = None
        self.tb: Any = None
        self.rows: list[dict[str, Any]] = []
        if not enabled:
            return
        self.rows = read_rows(run_dir / JSONL) if resume_step is not None else []
        self.rows = [r for r in self.rows if r["step"] <= (resume_step or 0)]
        atomic_write_text(run_dir / JSONL, "".join(json.dumps(r) + "\n" for r in self.rows))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("run.tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, row: dict[str, Any]) -> None:
        """Record one row (``step`` and ``split`` plus numbers)."""
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.dir / JSONL, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{row['split']}/{key}", value, row["step"])

    def flush(self) -> None:
        """Rewrite the CSV (and the plot) from all rows."""
        if not self.enabled:
            return
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.dir / CSV, buf.getvalue())
        if self.plot:
            self._plot()
        if self.tb is not None:
            self.tb.flush()

    def _plot(self) -> None:
        plt = pyplot()
        if plt is None:
            self.plot_note = "loss.png skipped: pip install 'legolm[plot]' (matplotlib) to draw it"
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        for split, key, style in (("train", "loss", "-"), ("val", "val_loss", "o-")):
            rows = [r for r in self.rows if r["split"] == split and math.isfinite(r.get(key, math.nan))]
            pts = [(r["step"], r[key]) for r in rows]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=f"{split} loss", markersize=4)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # nothing finite to draw yet (a run that diverged at once): no legend
            ax.legend()
        fig.tight_layout()
        atomic_savefig(fig, self.dir / PLOT, dpi=100)

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()
