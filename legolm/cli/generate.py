"""``legolm generate``: continue prompts with a pretrained model.

A LEGO model (the ``model/`` directory of ``legolm lego``) also decodes through its exits:
``--early-exit threshold [--threshold T | --target-ratio R] [--kv-mode fill|skip|propagate]`` or
``--early-exit speculative [--draft-tokens D]``, with ``--fused`` for the fast batch-1 decoders; one
stats line follows the text (shallow ratio or acceptance, cost against full depth, tok/s).
"""

from __future__ import annotations

import argparse

from legolm.cli.args import OnOffAction, add_dataclass_args, dataclass_from_args
from legolm.cli.common import add_model_args, device_dtype
from legolm.errors import LegolmError
from legolm.generation import GenerationConfig, complete


def run(ns: argparse.Namespace) -> None:
    from legolm.checkpoints.loader import load

    device, dtype = device_dtype(ns)
    config = dataclass_from_args(GenerationConfig, ns)
    config.validate()
    if any(not p for p in ns.prompt):
        raise LegolmError("empty prompt: give --prompt some text to continue")
    model, tokenizer = load(ns.model, device=device, dtype=dtype)
    texts, result = complete(model, tokenizer, ns.prompt, config)
    for prompt, text in zip(ns.prompt, texts, strict=True):
        print(prompt + text if ns.echo else text, flush=True)
    if result.early_exit is not None:
        print(result.early_exit.line(sum(len(row) for row in result.tokens)), flush=True)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a pretrained model")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="text to continue (repeat for a batch)")
    p.add_argument("--echo", action=OnOffAction, default=False, help="print the prompt too")
    add_dataclass_args(p, GenerationConfig)
    p.set_defaults(func=run)
