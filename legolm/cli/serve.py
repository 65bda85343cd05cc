"""``legolm serve``: an OpenAI-compatible HTTP server (completions, chat, streaming, metrics, memory sessions).

    legolm serve --model PATH_OR_NAME [--host 127.0.0.1 --port 8000] [--device cuda --dtype bfloat16]
                 [--max-batch 16] [--fused] [--early-exit threshold|speculative ...]

Every setting is a `ServeConfig` key (``--print-config`` shows them all); the job is
`legolm.recipes.serve.run`.
"""

from __future__ import annotations

import argparse

from legolm.cli.args import add_config_args, printed_config, resolve_config
from legolm.serve.config import ServeConfig


def run(ns: argparse.Namespace) -> None:
    cfg = resolve_config(ServeConfig, ns)
    if printed_config(ns, cfg):
        return
    from legolm.recipes import serve  # the heavy imports (torch, FastAPI, uvicorn) only when it runs

    serve.run(cfg)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP with the OpenAI API", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, ServeConfig)
    p.set_defaults(func=run)
