"""The ``legolm export`` job: convert a checkpoint to Hugging Face or legolm format, its tokenizer with it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from legolm.checkpoints.loader import load
from legolm.checkpoints.native import export_hf, save_checkpoint
from legolm.errors import ConfigError, LegolmError
from legolm.utils.io import check_deletable, check_writable

CHECKPOINT_FILES = ("config.json", "legolm.json")  # an out folder holding one of these is a checkpoint


@dataclass
class ExportConfig:
    """``legolm export``: which checkpoint to convert, and where to.

    Attributes:
        model: The checkpoint: a legolm/Hugging Face directory, .gguf file, or hub name.
        out: Output directory (must not exist unless overwrite).
        format: hf (a directory transformers loads) or legolm.
        overwrite: Replace an existing output checkpoint directory.
    """

    model: str = ""
    out: str = ""
    format: Literal["hf", "legolm"] = "hf"
    overwrite: bool = False

    def validate(self) -> None:
        """Raise `ConfigError` naming the first missing setting."""
        if not self.model:
            raise ConfigError("give --model (the checkpoint to convert: a legolm/Hugging Face directory, .gguf file "
                              "or hub name)")
        if not self.out:
            raise ConfigError("give --out DIR (where the converted checkpoint goes)")


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


def run(cfg: ExportConfig) -> Path:
    """Check --out, load the checkpoint (and its tokenizer, if any), write it in ``cfg.format``; return where."""
    cfg.validate()
    check_out(cfg.out, cfg.model, cfg.overwrite)
    model, tokenizer = load(cfg.model, tokenizer_required=False)  # exported without one when it has none
    save = export_hf if cfg.format == "hf" else save_checkpoint
    out = save(model, cfg.out, tokenizer, overwrite=cfg.overwrite)
    print(f"wrote {cfg.format} checkpoint to {out}")
    return out
