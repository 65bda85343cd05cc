"""``legolm analyze rank``: singular values and energy of fine-tuning weight deltas, per layer.

    legolm analyze rank --base gpt2-dir --tuned finetuned-dir --out runs/rank     # full FT (or merged LoRA)
    legolm analyze rank --base gpt2-dir --adapter runs/lora/adapter --out runs/rank   # a LoRA adapter (s·BA)

Prints a per-layer table (rank kept at each --energy threshold) and writes ``rank.csv``,
``rank.json`` (with the energy curves) and ``energy.png`` to ``--out``. Every setting is a
`RankConfig` key; the job is `legolm.recipes.analyze.run`.
"""

from __future__ import annotations

import argparse

from legolm.cli.args import add_config_args, printed_config, resolve_config
from legolm.recipes import analyze


def run_rank(ns: argparse.Namespace) -> None:
    cfg = resolve_config(analyze.RankConfig, ns)
    if printed_config(ns, cfg):
        return
    analyze.run(cfg)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="analyses of trained models (rank of fine-tuning updates)")
    kinds = p.add_subparsers(dest="analysis", required=True)
    r = kinds.add_parser("rank", help="singular values / energy of weight deltas per layer", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(r, analyze.RankConfig)
    r.set_defaults(func=run_rank)
