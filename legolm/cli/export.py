"""``legolm export``: convert a checkpoint to Hugging Face or legolm format."""

from __future__ import annotations

import argparse

from legolm.errors import LegolmError


def run(ns: argparse.Namespace) -> None:
    from legolm.checkpoints.load import load_pretrained, load_tokenizer
    from legolm.checkpoints.native import export_hf, save_checkpoint

    model = load_pretrained(ns.model)
    try:
        tokenizer = load_tokenizer(ns.model)
    except LegolmError:
        tokenizer = None
    save = export_hf if ns.format == "hf" else save_checkpoint
    out = save(model, ns.out, tokenizer, overwrite=ns.overwrite)
    print(f"wrote {ns.format} checkpoint to {out}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="convert a checkpoint to Hugging Face or legolm format")
    p.add_argument("--model", required=True, help="legolm/Hugging Face directory, .gguf file, or hub name")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--format", choices=["hf", "legolm"], default="hf")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=run)
