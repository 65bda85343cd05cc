"""``legolm analyze rank``: singular values and energy of fine-tuning weight deltas, per layer.

    legolm analyze rank --base gpt2-dir --tuned finetuned-dir --out runs/rank     # full FT (or merged LoRA)
    legolm analyze rank --base gpt2-dir --adapter runs/lora/adapter --out runs/rank   # a LoRA adapter (s·BA)

Prints a per-layer table (rank kept at each --energy threshold) and writes ``rank.csv``,
``rank.json`` (with the energy curves) and ``energy.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from legolm.cli.args import OnOffAction
from legolm.errors import LegolmError
from legolm.utils.io import check_deletable, check_writable


def run_rank(ns: argparse.Namespace) -> None:
    from legolm.adapters.peft_io import load_adapter
    from legolm.analysis.rank import (
        ENERGY_PNG,
        PLOT_NOTE,
        checkpoint_deltas,
        format_rows,
        lora_deltas,
        rank_profiles,
        rank_rows,
        summary,
        write_rank_outputs,
    )
    from legolm.checkpoints.loader import load_pretrained
    from legolm.utils.io import atomic_dir

    if (ns.tuned is None) == (ns.adapter is None):
        raise LegolmError("give exactly one of --tuned CHECKPOINT (full fine-tune or merged LoRA) or --adapter DIR")
    thresholds = sorted(set(ns.energy))
    if any(not 0 < t <= 1 for t in thresholds):
        raise LegolmError(f"--energy thresholds must be in (0, 1], got {ns.energy}")
    if ns.out is not None:
        check_out(ns.out, [ns.base, ns.tuned, ns.adapter], ns.overwrite)
    base = load_pretrained(ns.base)
    if ns.adapter is not None:
        load_adapter(base, ns.adapter)
        deltas = lora_deltas(base)
    else:
        deltas = checkpoint_deltas(base, load_pretrained(ns.tuned))
    profiles = rank_profiles(deltas)
    print(format_rows(rank_rows(profiles, thresholds)))
    print(summary(profiles, thresholds))
    if ns.out is not None:
        with atomic_dir(ns.out, ns.overwrite) as tmp:
            names = [p.name for p in write_rank_outputs(profiles, thresholds, tmp, plot=ns.plot, max_rank=ns.max_rank)]
        print(f"wrote {', '.join(names)} to {ns.out}")
        if ns.plot and ENERGY_PNG not in names:
            print(f"note: {PLOT_NOTE}")


def check_out(out: str, inputs: list[str | None], overwrite: bool) -> None:
    """Refuse an --out that cannot or may not be written, before any model is loaded."""
    check_writable(out, "--out")
    if Path(out).exists():
        if not overwrite:
            raise LegolmError(f"{out} already exists; choose another --out or pass --overwrite")
        check_deletable(out, inputs)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="analyses of trained models (rank of fine-tuning updates)")
    kinds = p.add_subparsers(dest="analysis", required=True)
    r = kinds.add_parser("rank", help="singular values / energy of weight deltas per layer")
    r.add_argument("--base", required=True, help="the base model (legolm/HF directory, .gguf, hub name)")
    r.add_argument("--tuned", help="the fine-tuned (or merged-LoRA) model of the same architecture")
    r.add_argument("--adapter", help="a peft-format LoRA adapter directory for --base")
    r.add_argument("--energy", type=float, nargs="+", default=[0.9, 0.95],
                   help="energy thresholds to report the rank for (default: 0.9 0.95)")
    r.add_argument("--out", help="directory for rank.csv, rank.json, energy.png (must not exist unless --overwrite)")
    r.add_argument("--overwrite", action=OnOffAction, default=False, help="replace an existing --out directory")
    r.add_argument("--plot", action=OnOffAction, default=True,
                   help="write energy.png (needs matplotlib; skipped with a note without it; default: on)")
    r.add_argument("--max-rank", type=int, default=None, help="keep the energy curves up to this rank (default: all)")
    r.set_defaults(func=run_rank)
