"""legolm: build, train, fine-tune and serve small decoder-only language models."""

from legolm.checkpoints.loader import load, load_pretrained
from legolm.checkpoints.native import export_hf, save_checkpoint
from legolm.core.config import PRESETS, ModelConfig
from legolm.core.kv_cache import KVCache
from legolm.data.tokenizer import Tokenizer, load_tokenizer
from legolm.errors import LegolmError
from legolm.model.transformer import TransformerLM

__all__ = [
    "PRESETS",
    "KVCache",
    "LegolmError",
    "ModelConfig",
    "Tokenizer",
    "TransformerLM",
    "export_hf",
    "load",
    "load_pretrained",
    "load_tokenizer",
    "save_checkpoint",
]
__version__ = "0.1.0"
