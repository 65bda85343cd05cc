"""``legolm eval ppl``: perplexity of a model on held-out real text.

``--data`` is a named source or a file/folder (tokenized once with the model's own tokenizer and
split by document exactly as training splits it), or a folder of tokenized data that
`legolm.data.prepare_corpus` wrote (refused if another tokenizer made it).
"""

from __future__ import annotations

import argparse

from legolm.cli.args import OnOffAction, add_dataclass_args, dataclass_from_args
from legolm.cli.common import add_model_args, device_dtype
from legolm.data.tokenized import DataConfig
from legolm.eval.sanity import PPLBands
from legolm.recipes import evaluate
from legolm.recipes.evaluate import PPLConfig


def run(ns: argparse.Namespace) -> None:
    data_ns = argparse.Namespace(**{**vars(ns), "tokenizer": ns.tokenizer or ns.model})
    device, dtype = device_dtype(ns)
    evaluate.run(ns.model, dataclass_from_args(PPLConfig, ns), dataclass_from_args(PPLBands, ns),
                 dataclass_from_args(DataConfig, data_ns), device, dtype, own_tokenizer=ns.tokenizer is None,
                 json_path=ns.json, overwrite=ns.overwrite)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model (perplexity)")
    tasks = p.add_subparsers(dest="eval_task", required=True)
    ppl = tasks.add_parser("ppl", help="sliding-window perplexity on held-out text", conflict_handler="resolve")
    add_model_args(ppl)
    add_dataclass_args(ppl, PPLConfig)
    add_dataclass_args(ppl, PPLBands)
    add_dataclass_args(ppl, DataConfig)
    # The brief's names for two DataConfig fields (replacing --source and --tokenizer).
    ppl.add_argument("--data", "--source", dest="source", required=True,
                     help="named source (tinyshakespeare, tinystories, gutenberg, ...), a file/folder, "
                          "or a tokenized-data folder")
    ppl.add_argument("--tokenizer", default=None,
                     help="tokenizer spec (default: the model's own, the same the model was trained with)")
    ppl.add_argument("--json", default=None, help="also write the result as JSON to this path")
    ppl.add_argument("--overwrite", action=OnOffAction, default=False, help="replace an existing --json file")
    ppl.set_defaults(func=run)
