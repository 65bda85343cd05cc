"""`load_pretrained`: one entry point for every checkpoint kind.

A path may be a legolm checkpoint directory, a Hugging Face model directory, or a ``.gguf``
file; anything else that is not a path is taken as a Hugging Face hub name (needs network,
`legolm.utils.hub.resolve`). The tokenizer that comes with a checkpoint is
`legolm.data.tokenizer.load_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from legolm.checkpoints.gguf import load_gguf
from legolm.checkpoints.hf import load_hf_dir
from legolm.checkpoints.native import CONFIG_NAME, load_checkpoint
from legolm.errors import CheckpointError
from legolm.model.transformer import TransformerLM
from legolm.utils.hub import resolve


def load_pretrained(path_or_name: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> TransformerLM:
    """Load a model from a legolm/HF directory, a GGUF file or a hub name; eval mode.

    Args:
        path_or_name: Where the checkpoint is.
        device: Where to put the weights.
        dtype: Cast floating weights to this dtype (default: as stored; GGUF dequantises to fp32).
    """
    path = resolve(path_or_name)
    if path.is_file() and path.suffix == ".gguf":
        config, state, _ = load_gguf(path)
        model = TransformerLM.from_state_dict(config, state)
    elif path.is_dir() and (path / CONFIG_NAME).is_file():
        model = load_checkpoint(path)
    elif path.is_dir():
        config, state = load_hf_dir(path)
        model = TransformerLM.from_state_dict(config, state)
    else:
        raise CheckpointError(f"{path} is neither a model directory nor a .gguf file")
    return model.to(device=device, dtype=dtype).eval()
