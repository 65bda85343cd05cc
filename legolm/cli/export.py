"""``legolm export``: convert a checkpoint to Hugging Face or legolm format."""

from __future__ import annotations

import argparse
from pathlib import Path

from legolm.cli.args import OnOffAction
from legolm.errors import LegolmError
from legolm.utils.io import check_deletable, check_writable

CHECKPOINT_FILES = ("config.json", "legolm.json")  # an --out folder holding one of these is a checkpoint


def check_out(out: str, model: str, overwrite: bool) -> None:
    """Refuse an --out that export may not write (before the model is loaded): one line each.

    An existing --out is replaced only with --overwrite, only when it is a checkpoint folder (or
    empty), and never when it is the current folder, one above it, or holds the --model input.
    """
    check_writable(out, "--out")
    path = Path(out)
    if not path.exists():
        return
    if not overwrite:
        raise LegolmError(f"{out} already exists; choose another --out or pass --overwrite")
    check_deletable(path, [model])
    if any(path.iterdir()) and not any((path / name).is_file() for name in CHECKPOINT_FILES):
        raise LegolmError(f"--out {out} is not a checkpoint folder (no {' or '.join(CHECKPOINT_FILES)}), so "
                          "--overwrite will not replace it; choose another --out")


def run(ns: argparse.Namespace) -> None:
    from legolm.checkpoints.loader import load
    from legolm.checkpoints.native import export_hf, save_checkpoint

    check_out(ns.out, ns.model, ns.overwrite)
    model, tokenizer = load(ns.model, tokenizer_required=False)  # exported without one when it has none
    save = export_hf if ns.format == "hf" else save_checkpoint
    out = save(model, ns.out, tokenizer, overwrite=ns.overwrite)
    print(f"wrote {ns.format} checkpoint to {out}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="convert a checkpoint to Hugging Face or legolm format")
    p.add_argument("--model", required=True, help="legolm/Hugging Face directory, .gguf file, or hub name")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--format", choices=["hf", "legolm"], default="hf")
    p.add_argument("--overwrite", action=OnOffAction, default=False,
                   help="replace an existing output checkpoint directory")
    p.set_defaults(func=run)
