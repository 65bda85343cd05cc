"""``legolm export``: convert a checkpoint to Hugging Face or legolm format.

    legolm export --model SRC --out DIR [--format hf|legolm] [--overwrite]

Every setting is an `ExportConfig` key; the job is `legolm.recipes.export.run`.
"""

from __future__ import annotations

import argparse

from legolm.cli.args import add_config_args, printed_config, resolve_config
from legolm.recipes import export


def run(ns: argparse.Namespace) -> None:
    cfg = resolve_config(export.ExportConfig, ns)
    if printed_config(ns, cfg):
        return
    export.run(cfg)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="convert a checkpoint to Hugging Face or legolm format", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, export.ExportConfig)
    p.set_defaults(func=run)
