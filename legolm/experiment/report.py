"""The experiment's outputs: one table (Markdown, CSV, JSONL) and one PNG chart of the same rows."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from legolm.utils.io import atomic_savefig, atomic_write_text, finite_json, pyplot

if TYPE_CHECKING:
    from legolm.experiment.config import ExperimentConfig

TABLE, CSV_FILE, JSONL, CHART = "results.md", "results.csv", "results.jsonl", "results.png"
COLUMNS = [  # (header, field, format)
    ("model", "model", "{}"), ("params", "params", "{:,}"), ("val PPL", "val_ppl", "{:.2f}"),
    ("fwd PPL", "forward_ppl", "{:.2f}"), ("bwd PPL", "backward_ppl", "{:.2f}"), ("gap", "gap", "{:+.2f}"),
    ("fwd acc", "forward_acc", "{:.1%}"), ("bwd acc", "backward_acc", "{:.1%}"),
    ("tok/s", "tokens_per_s", "{:,.0f}"), ("peak MB", "peak_memory_mb", "{:,.0f}"),
    ("memory KiB", "memory_kb", "{:,.1f}"), ("train s", "train_s", "{:,.1f}"), ("total s", "total_s", "{:,.1f}"),
]


@dataclass
class ModelResult:
    """One row of the experiment's table.

    Attributes:
        model: Model kind.
        params: Parameters.
        val_ppl: Sliding-window perplexity of the held-out corpus documents.
        forward_ppl: Reversal-curse completions in the trained direction.
        backward_ppl: Reversal-curse completions in the reversed direction.
        gap: backward_ppl - forward_ppl.
        forward_acc: Greedy exact match, trained direction.
        backward_acc: Greedy exact match, reversed direction.
        tokens_per_s: Training tokens per second.
        peak_memory_mb: Peak memory of training (CUDA allocated, or the process's peak RSS on CPU).
        train_s: Training wall time.
        total_s: Wall time of the model's whole run (build, train, evaluate).
        memory_kb: Memory-layer state per sequence (KiB; 0 for pythia).
        steps: Optimizer steps.
        tokens: Training tokens seen.
        device: Where it ran.
    """

    model: str
    params: int
    val_ppl: float
    forward_ppl: float
    backward_ppl: float
    gap: float
    forward_acc: float
    backward_acc: float
    tokens_per_s: float
    peak_memory_mb: float
    train_s: float
    total_s: float
    memory_kb: float
    steps: int
    tokens: int
    device: str


def markdown_table(results: list[ModelResult]) -> str:
    """The results as one Markdown table, a row per model."""
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|" + "|".join("---" if f == "model" else "---:" for _, f, _ in COLUMNS) + "|"]
    for r in results:
        row = asdict(r)
        lines.append("| " + " | ".join(fmt.format(row[f]) for _, f, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def describe(cfg: ExperimentConfig, results: list[ModelResult]) -> str:
    """One line of the shared conditions under the table."""
    first = results[0]
    return (f"data {cfg.data.source} ({cfg.samples or 'all'} documents, tokenizer {cfg.data.tokenizer})"
            f"{' + reversal-curse training sentences' if cfg.include_reversal else ''}; "
            f"{first.steps:,} steps x {cfg.batch_size} x {cfg.window} tokens ({first.tokens:,} tokens), "
            f"lr {cfg.optim.lr:g}, seed {cfg.run.seed}, {first.device}, precision {cfg.run.precision}; "
            f"val PPL: sliding window {cfg.window}, stride {cfg.eval.final_stride or max(1, cfg.window // 2)}")


def write_reports(results: list[ModelResult], cfg: ExperimentConfig, out: Path,
                  vocab_size: int | None = None) -> str:
    """Write results.md/.csv/.jsonl and results.png into ``out``; print and return the table, with the
    perplexity sanity check of each model's validation PPL (``vocab_size``: the models' vocabulary)."""
    checks = cfg.eval.ppl_bands.lines({f"{r.model} val": r.val_ppl for r in results}, vocab_size)
    table = markdown_table(results) + "\n\n" + describe(cfg, results) + "\n\n" + checks
    atomic_write_text(out / TABLE, table + "\n")
    atomic_write_text(out / JSONL, "".join(finite_json(asdict(r), f"the {r.model} result") for r in results))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(asdict(results[0])))
    writer.writeheader()
    writer.writerows(asdict(r) for r in results)
    atomic_write_text(out / CSV_FILE, buf.getvalue())
    note = chart(results, out / CHART)
    print("\n" + table + (f"\n{note}" if note else "") + f"\n\nresults in {out}", flush=True)
    return table


def chart(results: list[ModelResult], path: Path) -> str | None:
    """Bar charts of validation PPL, reversal PPL (forward/backward), exact match and speed; a note
    instead of the PNG when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return f"{path.name} skipped: pip install matplotlib to draw the chart"
    names = [r.model for r in results]
    x = list(range(len(results)))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].bar(x, [r.val_ppl for r in results], color="tab:blue")
    axes[0].set_title("validation PPL (lower is better)")
    for ax, fields, title in ((axes[1], ("forward_ppl", "backward_ppl"), "reversal PPL"),
                              (axes[2], ("forward_acc", "backward_acc"), "reversal exact match")):
        for j, (f, label) in enumerate(zip(fields, ("forward", "backward"), strict=True)):
            ax.bar([i + (j - 0.5) * 0.4 for i in x], [getattr(r, f) for r in results], width=0.4, label=label)
        ax.set_title(title)
        top = max(getattr(r, f) for r in results for f in fields)
        ax.set_ylim(0, 1.3 * top if top > 0 else 1.0)  # room for the legend above the bars
        ax.legend(loc="upper center", ncols=2, fontsize=8)
    axes[3].bar(x, [r.tokens_per_s for r in results], color="tab:green")
    axes[3].set_title("training tokens/s")
    for ax in axes:
        ax.set_xticks(x, names, rotation=20)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    return None
