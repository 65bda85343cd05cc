"""``legolm pretrain``: train a small model from scratch on real text, evaluate it, sample from it.

    legolm pretrain --config configs/pretrain-tiny.yaml [--optim.lr 3e-4 ...] [--overwrite | --resume]

Every setting is a `TrainConfig` key (``--print-config`` shows them all, resolved). Bad input is
caught before the run directory is created; the run directory gets ``config.yaml``, metrics,
``loss.png``, ``checkpoints/`` (for ``--resume``), ``model/`` (a legolm checkpoint that
``legolm generate`` and ``legolm eval ppl`` load) and ``summary.json``.
"""

from __future__ import annotations

import argparse

from legolm.cli.args import add_config_args, printed_config, resolve_run_config
from legolm.train.config import TrainConfig

ALIASES = {"--overwrite": "run.overwrite", "--resume": "run.resume"}


def run(ns: argparse.Namespace) -> None:
    cfg = resolve_run_config(TrainConfig, ns)
    if printed_config(ns, cfg):
        return
    from legolm.recipes import pretrain

    pretrain.run(cfg)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train a small model from scratch on real text",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    add_config_args(p, TrainConfig, ALIASES)
    p.set_defaults(func=run)
