"""legolm's own checkpoint: ``legolm.json`` (the ModelConfig) + ``model.safetensors`` (+ tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from legolm.checkpoints.hf import export_hf_state, read_weights
from legolm.data.tokenizer import Tokenizer
from legolm.errors import CheckpointError
from legolm.model.config import ModelConfig
from legolm.model.transformer import TransformerLM
from legolm.utils.io import atomic_dir

CONFIG_NAME = "legolm.json"


def _cpu_state(model: TransformerLM) -> dict:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same storage as wte.weight; safetensors refuses shared tensors
    return state


def save_checkpoint(model: TransformerLM, directory: str | Path, tokenizer: Tokenizer | None = None,
                    overwrite: bool = False) -> Path:
    """Write a legolm checkpoint atomically (a temp directory renamed into place)."""
    with atomic_dir(directory, overwrite) as tmp:
        save_file(_cpu_state(model), str(tmp / "model.safetensors"))
        model.config.save(tmp / CONFIG_NAME)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(directory)


def load_checkpoint(directory: Path) -> TransformerLM:
    try:
        config = ModelConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{directory / CONFIG_NAME} is not valid JSON ({err})") from None
    return TransformerLM.from_state_dict(config, read_weights(directory))


def export_hf(model: TransformerLM, directory: str | Path, tokenizer: Tokenizer | None = None,
              overwrite: bool = False) -> Path:
    """Write a Hugging Face model directory (config.json + model.safetensors) that `transformers` loads."""
    hf_cfg, state = export_hf_state(model.config, _cpu_state(model))
    with atomic_dir(directory, overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps({**hf_cfg, "torch_dtype": str(model.wte.weight.dtype)[6:]},
                                                    indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.backend.save(str(tmp / "tokenizer.json"))
    return Path(directory)
