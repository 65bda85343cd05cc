"""``legolm lego``: LEGO end to end on real text: phase 1, calibration, extension (or a pretrained split),
phase 2, the quality table and LEGO decoding timed against the fastest full-depth decoder.

    legolm lego --config configs/lego-tinystories.yaml [--lego.target-ratio 0.4 ...] [--overwrite]

Every setting is a `LegoConfig` key (``--print-config`` shows them all); the job is
`legolm.recipes.lego.run`. The run directory gets ``phase1/`` and ``phase2/`` (the runs of
`fit`: metrics, loss.png, checkpoints), ``model/`` (the LEGO checkpoint: ``legolm generate --model
run/model --early-exit threshold|speculative``), ``curve.png``, ``curve.csv`` and ``summary.json``.
"""

from __future__ import annotations

import argparse

from legolm.cli.args import add_config_args, printed_config, resolve_run_config
from legolm.lego.config import LegoConfig

ALIASES = {"--overwrite": "run.overwrite", "--resume": "run.resume"}


def run(ns: argparse.Namespace) -> None:
    cfg = resolve_run_config(LegoConfig, ns)
    if printed_config(ns, cfg):
        return
    from legolm.recipes import lego  # the heavy imports (torch, the library) only when it runs

    lego.run(cfg)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lego", help="LEGO: shallow model, hard-token deepening, early-exit and speculative decoding",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    add_config_args(p, LegoConfig, ALIASES)
    p.set_defaults(func=run)
