"""Loading and saving models: Hugging Face directories, GGUF files, legolm checkpoints."""

from legolm.checkpoints.loader import load, load_pretrained

__all__ = ["load", "load_pretrained"]
