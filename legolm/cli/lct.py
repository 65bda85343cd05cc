"""``legolm lct``: Lagged Cache Training vs exact sequential training of a recurrent-context Pythia.

    legolm lct --config configs/lct-tiny.yaml [--methods lct sequential] [--epochs 4] [--overwrite]

Every setting is an `LCTConfig` key (``--print-config`` shows them resolved). Each method gets its
own run directory under ``run.out_dir``; the comparison goes to ``lct.json`` and ``lct.png`` there.
"""

from __future__ import annotations

import argparse

from legolm.cli.args import add_config_args, printed_config, resolve_config
from legolm.lct.train import LCTConfig

ALIASES = {"--overwrite": "run.overwrite"}


def run(ns: argparse.Namespace) -> None:
    from legolm.recipes import lct

    cfg = resolve_config(LCTConfig, ns)
    if printed_config(ns, cfg):
        return
    lct.run(cfg)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lct", help="Lagged Cache Training vs sequential training of a recurrent-context model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    add_config_args(p, LCTConfig, ALIASES)
    p.set_defaults(func=run)
