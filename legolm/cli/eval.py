"""``legolm eval ppl``: perplexity of a model on held-out real text.

    legolm eval ppl --model PATH_OR_NAME --data tinyshakespeare [--max-length 1024 --stride 512] [--json out.json]

``--data`` (short for ``--data.source``) is a named source or a file/folder (tokenized once with the
model's own tokenizer and split by document exactly as training splits it), or a folder of tokenized
data that `legolm.data.prepare_corpus` wrote (refused if another tokenizer made it); ``--tokenizer``
(short for ``--data.tokenizer``) uses another tokenizer. Every setting is a `PPLConfig` key
(``--print-config`` shows them all); the job is `legolm.recipes.evaluate.run`.
"""

from __future__ import annotations

import argparse

from legolm.cli.args import add_config_args, printed_config, resolve_config
from legolm.recipes import evaluate

ALIASES = {"--data": "data.source", "--tokenizer": "data.tokenizer"}


def run(ns: argparse.Namespace) -> None:
    cfg = resolve_config(evaluate.PPLConfig, ns)
    if printed_config(ns, cfg):
        return
    evaluate.run(cfg)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model (perplexity)")
    tasks = p.add_subparsers(dest="eval_task", required=True)
    ppl = tasks.add_parser("ppl", help="sliding-window perplexity on held-out text", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ppl, evaluate.PPLConfig, ALIASES)
    ppl.set_defaults(func=run)
