"""``legolm generate``: continue prompts with a pretrained model.

    legolm generate --model PATH_OR_NAME --prompt TEXT [--prompt TEXT2 ...] [--max-new-tokens N --greedy ...]

A LEGO model (the ``model/`` directory of ``legolm lego``) also decodes through its exits:
``--early-exit threshold [--threshold T | --target-ratio R] [--kv-mode fill|skip|propagate]`` or
``--early-exit speculative [--draft-tokens D]``, with ``--fused`` for the fast batch-1 decoders; one
stats line follows the text (shallow ratio or acceptance, cost against full depth, tok/s). Every
setting is a `GenerateConfig` key (``--print-config`` shows them all); the job is
`legolm.recipes.generate.run`.
"""

from __future__ import annotations

import argparse

from legolm.cli.args import add_config_args, printed_config, resolve_config
from legolm.recipes import generate


def run(ns: argparse.Namespace) -> None:
    cfg = resolve_config(generate.GenerateConfig, ns)
    if printed_config(ns, cfg):
        return
    generate.run(cfg)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a pretrained model", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, generate.GenerateConfig)
    p.set_defaults(func=run)
