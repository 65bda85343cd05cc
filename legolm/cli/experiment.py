"""``legolm experiment``: pythia and memory-layer models trained on the same real text, same budget
and seed, then compared in one table and chart.

    legolm experiment --models pythia infini multi_memory hierarchical --samples 2000 --epochs 1 \
        --lr 1e-3 [--data tinystories] [--config configs/experiment-tiny.yaml] [--overwrite]

Every setting is an `ExperimentConfig` key (``--print-config`` shows them all); ``--lr`` and
``--data`` are short for ``--optim.lr`` and ``--data.source``. The output directory
(``--run.out-dir``, default runs/experiment) gets one run directory per model and
results.md/.csv/.jsonl/.png. ``--state-sizes`` only prints the memory state each model carries per
sequence at the given settings (``--model.memory-heads 8`` gives the guidelines' sizes).
"""

from __future__ import annotations

import argparse

from legolm.cli.args import add_config_args, printed_config, resolve_config
from legolm.experiment.config import ExperimentConfig

ALIASES = {"--overwrite": "run.overwrite", "--lr": "optim.lr", "--data": "data.source"}


def run(ns: argparse.Namespace) -> None:
    cfg = resolve_config(ExperimentConfig, ns)
    if printed_config(ns, cfg):
        return
    if ns.state_sizes:
        from legolm.experiment.state_sizes import state_size_table

        cfg.validate()
        print(state_size_table(cfg.model, cfg.models))
        return
    from legolm.recipes import experiment

    experiment.run(cfg)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="compare pythia and memory-layer models under equal training",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    p.add_argument("--state-sizes", action="store_true",
                   help="print the memory state per sequence of each model at these settings and exit (no training)")
    add_config_args(p, ExperimentConfig, ALIASES)
    p.set_defaults(func=run)
