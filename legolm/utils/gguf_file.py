"""Opening a GGUF file (llama.cpp) and reading its metadata, for the weights and the tokenizer loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from legolm.errors import CheckpointError


def gguf_reader(path: Path) -> Any:
    """A `gguf.GGUFReader` of ``path``; a missing package or an unreadable file is one `CheckpointError`."""
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading GGUF needs the gguf package: pip install 'legolm[gguf]'") from None
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as err:
        raise CheckpointError(f"{path} is not a readable GGUF file ({err}); is it truncated?") from None


def read_fields(reader: Any) -> dict[str, Any]:
    """All metadata as plain Python values."""
    return {name: f.contents() for name, f in reader.fields.items()}
