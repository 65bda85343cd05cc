"""Where a model is: a local path, or a Hugging Face hub snapshot downloaded for a name.

Used by the checkpoint loaders (`legolm.checkpoints.loader`), the tokenizer loader
(`legolm.data.tokenizer.load_tokenizer`) and the chat templates (`legolm.serve.chat`).
"""

from __future__ import annotations

from pathlib import Path

from legolm.errors import CheckpointError

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
