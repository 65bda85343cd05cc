"""`Tokenizer`: a thin wrapper over Hugging Face `tokenizers` with legolm's loading rules.

Loads a ``tokenizer.json``, GPT-2 style ``vocab.json`` + ``merges.txt``, or the BPE vocabulary
stored inside a GGUF file; remembers BOS/EOS ids and whether BOS is prepended.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from legolm.errors import CheckpointError


class Tokenizer:
    """Text <-> token ids.

    Args:
        backend: The `tokenizers.Tokenizer` doing the work.
        bos_id: Beginning-of-sequence id, or None.
        eos_id: End-of-sequence id, or None.
        add_bos: Prepend ``bos_id`` in `encode`.
    """

    def __init__(self, backend: HFTokenizer, bos_id: int | None = None, eos_id: int | None = None,
                 add_bos: bool = False) -> None:
        self.backend, self.bos_id, self.eos_id, self.add_bos = backend, bos_id, eos_id, add_bos

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(ids, skip_special_tokens=skip_special_tokens))

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``legolm_tokenizer.json`` (special ids) into a directory."""
        directory = Path(directory)
        self.backend.save(str(directory / "tokenizer.json"))
        meta = {"bos_id": self.bos_id, "eos_id": self.eos_id, "add_bos": self.add_bos}
        (directory / "legolm_tokenizer.json").write_text(json.dumps(meta) + "\n")

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """Load from a model or tokenizer directory (tokenizer.json, or vocab.json + merges.txt)."""
        d = Path(directory)
        if (d / "tokenizer.json").is_file():
            backend = HFTokenizer.from_file(str(d / "tokenizer.json"))
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            backend = HFTokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
        else:
            raise CheckpointError(f"no tokenizer in {d}: expected tokenizer.json or vocab.json + merges.txt")
        return cls(backend, **_special_ids(d, backend))

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any]) -> Tokenizer:
        """Rebuild the byte-level BPE tokenizer that a GGUF file stores (``tokenizer.ggml.*``)."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise CheckpointError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2')")
        tokens: list[str] = fields["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        backend = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        # SmolLM's pre-tokenizer splits digits one by one before the GPT-2 regex.
        backend.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if fields.get("tokenizer.ggml.pre") == "smollm" else byte_level
        )
        backend.decoder = decoders.ByteLevel()
        types = fields.get("tokenizer.ggml.token_type", [])
        special = [tokens[i] for i, t in enumerate(types) if t == 3]  # 3 = CONTROL
        backend.add_special_tokens(special)
        return cls(backend, fields.get("tokenizer.ggml.bos_token_id"), fields.get("tokenizer.ggml.eos_token_id"),
                   bool(fields.get("tokenizer.ggml.add_bos_token", False)))


def _special_ids(d: Path, backend: HFTokenizer) -> dict[str, Any]:
    """BOS/EOS ids from legolm's own metadata or from Hugging Face's tokenizer/generation configs."""
    if (d / "legolm_tokenizer.json").is_file():
        meta = json.loads((d / "legolm_tokenizer.json").read_text())
        return {"bos_id": meta["bos_id"], "eos_id": meta["eos_id"], "add_bos": meta["add_bos"]}
    ids: dict[str, Any] = {"bos_id": None, "eos_id": None, "add_bos": False}
    for name in ("config.json", "generation_config.json"):
        if (d / name).is_file():
            cfg = json.loads((d / name).read_text())
            for key in ("bos", "eos"):
                value = cfg.get(f"{key}_token_id")
                if isinstance(value, list):
                    value = value[0] if value else None
                if value is not None:
                    ids[f"{key}_id"] = value
    if ids["eos_id"] is None:
        ids["eos_id"] = backend.token_to_id("<|endoftext|>")
    return ids
