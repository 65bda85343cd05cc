"""`load` and `load_pretrained`: one entry point for every checkpoint kind.

A path may be a legolm checkpoint directory, a Hugging Face model directory, or a ``.gguf``
file; anything else that is not a path is taken as a Hugging Face hub name (needs network,
`legolm.utils.hub.resolve`). `load` gives the model and the tokenizer that comes with it, resolving
the path and reading each file once (a GGUF file is parsed once for both); `load_pretrained` gives
the model alone and reads no tokenizer files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, overload

import torch

from legolm.checkpoints.gguf import load_gguf
from legolm.checkpoints.hf import load_hf_dir
from legolm.checkpoints.native import CONFIG_NAME, load_checkpoint
from legolm.data.tokenizer import Tokenizer, checkpoint_tokenizer
from legolm.errors import CheckpointError, TokenizerError
from legolm.model.transformer import TransformerLM
from legolm.utils.hub import resolve


@overload
def load(path_or_name: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         tokenizer_required: Literal[True] = True) -> tuple[TransformerLM, Tokenizer]: ...


@overload
def load(path_or_name: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         tokenizer_required: bool) -> tuple[TransformerLM, Tokenizer | None]: ...


def load(path_or_name: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         tokenizer_required: bool = True) -> tuple[TransformerLM, Tokenizer | None]:
    """The model (eval mode) and the tokenizer of a legolm/HF directory, a GGUF file or a hub name.

    Args:
        path_or_name: Where the checkpoint is.
        device: Where to put the weights.
        dtype: Cast floating weights to this dtype (default: as stored; GGUF dequantises to fp32).
        tokenizer_required: False: a directory without a readable tokenizer gives None instead of raising.

    Raises:
        CheckpointError: The weights cannot be loaded. TokenizerError: The tokenizer is missing or
            unreadable (unless ``tokenizer_required`` is False).
    """
    path = resolve(path_or_name)
    model, tokenizer = _read(path)
    if tokenizer is None:  # a directory: its tokenizer files, from the path resolved above
        try:
            tokenizer = checkpoint_tokenizer(path)
        except TokenizerError:
            if tokenizer_required:
                raise
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def load_pretrained(path_or_name: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> TransformerLM:
    """The model alone (eval mode) of a legolm/HF directory, a GGUF file or a hub name; see `load`."""
    model, _ = _read(resolve(path_or_name))
    return model.to(device=device, dtype=dtype).eval()


def _read(path: Path) -> tuple[TransformerLM, Tokenizer | None]:
    """The model at a resolved path, and the tokenizer a GGUF file holds (None for a directory)."""
    if path.is_file() and path.suffix == ".gguf":
        config, state, tokenizer = load_gguf(path)
        return TransformerLM.from_state_dict(config, state), tokenizer
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return load_checkpoint(path), None
    if path.is_dir():
        config, state = load_hf_dir(path)
        return TransformerLM.from_state_dict(config, state), None
    raise CheckpointError(f"{path} is neither a model directory nor a .gguf file")
