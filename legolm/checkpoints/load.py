"""`load_pretrained` / `load_tokenizer`: one entry point for every checkpoint kind.

A path may be a legolm checkpoint directory, a Hugging Face model directory, or a ``.gguf``
file; anything else that is not a path is taken as a Hugging Face hub name (needs network).
"""

from __future__ import annotations

from pathlib import Path

import torch

from legolm.checkpoints.gguf import load_gguf
from legolm.checkpoints.hf import load_hf_dir
from legolm.checkpoints.native import CONFIG_NAME, load_checkpoint
from legolm.data.tokenizer import Tokenizer
from legolm.errors import CheckpointError
from legolm.model.transformer import TransformerLM

# Presets whose real weights live on the Hugging Face hub.
HUB_NAMES = {
    "gpt2": "gpt2", "gpt2-medium": "gpt2-medium", "pythia-14m": "EleutherAI/pythia-14m",
    "pythia-70m": "EleutherAI/pythia-70m", "pythia-160m": "EleutherAI/pythia-160m",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
}


def resolve(path_or_name: str | Path) -> Path:
    """A local path, or a hub snapshot downloaded for a name that is not a local path."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    name = str(path_or_name)
    looks_local = name.startswith((".", "/", "~")) or name.endswith((".gguf", ".safetensors"))
    looks_local = looks_local or ("/" in name and Path(name.split("/")[0]).is_dir())  # runs/nope: a local folder
    if looks_local or name.count("/") > 1:
        raise CheckpointError(f"model path {name} does not exist")
    repo = HUB_NAMES.get(name, name)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{name} is not a local path; downloading it needs pip install 'legolm[hf]'") from None
    try:
        patterns = ["config.json", "generation_config.json", "*.safetensors", "tokenizer*", "vocab.json", "merges.txt"]
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as err:  # network, auth, unknown repo: all are the user's to fix
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{name} is not a local path and the hub download of {repo!r} failed ({first})") from None


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


def load_tokenizer(path_or_name: str | Path) -> Tokenizer:
    """The tokenizer that comes with a checkpoint (directory files or the GGUF's vocabulary)."""
    path = resolve(path_or_name)
    if path.is_file() and path.suffix == ".gguf":
        from legolm.checkpoints.gguf import _reader, read_fields

        return Tokenizer.from_gguf_fields(read_fields(_reader(path)))
    if path.is_dir():
        return Tokenizer.from_dir(path)
    if path.is_file() and path.suffix == ".json":
        return Tokenizer.from_dir(path.parent)
    raise CheckpointError(f"no tokenizer found for {path}")
