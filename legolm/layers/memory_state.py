"""Memory state of a model's memory layers: carry it across calls, save it, load it elsewhere.

Stream a long document through a memory model in chunks, keep the memory, and continue later
(another process or machine) from the saved file::

    reset_memory(model)
    with carry_memory(model):                      # each call continues the memory of the last
        for chunk in chunks:                       # (B, T) ids, T a multiple of segment_len
            logits = model(chunk)
    save_memory_state(model, "doc.memory.safetensors")
    ...
    load_memory_state(other_model, "doc.memory.safetensors")   # same config and weights, else refused
    with carry_memory(other_model):
        logits = other_model(next_chunk)

The file is one safetensors file: the state tensors named ``<layer module>.<tensor>`` (e.g.
``blocks.0.attn.M``) and, in its metadata, a JSON record of the model's config fingerprint, a
fingerprint of its weights (a memory is only meaningful for the weights that wrote it), the
shape of every tensor and the byte count.

The same file as bytes, for a state held apart from the model (a server's memory sessions):
`memory_state_to_bytes(state, ModelFingerprint.of(model))` and `memory_state_from_bytes(model, data,
fingerprint)`, which refuses another model's state as `load_memory_state` does; the fingerprint is
computed once (hashing the weights is the slow part).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file
from torch import Tensor, nn

from legolm.errors import CheckpointError, ConfigError, LegolmError
from legolm.layers.memory import MemoryLayer

FORMAT = "legolm-memory"
FORMAT_VERSION = 1
METADATA_KEY = "legolm_memory"
HASH_CHUNK_ELEMENTS = 1 << 22  # parameters hashed per step (bounds the temporary copy)
HEADER_LENGTH_BYTES = 8  # safetensors: a little-endian u64 header length, then the JSON header


def memory_layers(model: nn.Module) -> dict[str, MemoryLayer]:
    """Every memory layer of ``model`` by module name (e.g. ``blocks.0.attn``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MemoryLayer)}


def _require_layers(model: nn.Module) -> dict[str, MemoryLayer]:
    layers = memory_layers(model)
    if not layers:
        raise ConfigError("the model has no memory layers (infini, multi_memory, hierarchical): it keeps no memory")
    return layers


def reset_memory(model: nn.Module) -> None:
    """Forget the stored memory of every memory layer (a model without any is left as is)."""
    for layer in memory_layers(model).values():
        layer.reset_memory()


@contextlib.contextmanager
def carry_memory(model: nn.Module) -> Iterator[None]:
    """Within the block, each forward continues from the memory the previous one left (or the loaded one)."""
    layers = _require_layers(model)
    before = {name: layer.carry for name, layer in layers.items()}
    for layer in layers.values():
        layer.carry = True
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.carry = before[name]


def get_memory_state(model: nn.Module) -> dict[str, Tensor]:
    """The stored memory of every memory layer as ``{"<layer>.<tensor>": tensor}`` (detached copies)."""
    return {f"{name}.{key}": t for name, layer in memory_layers(model).items()
            for key, t in layer.get_memory_state().items()}


def set_memory_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Store ``state`` (from `get_memory_state`) in the memory layers; names and shapes must match.

    Raises:
        ConfigError: A layer is missing from ``state``, a tensor is unknown, or a shape differs.
    """
    layers = check_memory_state(model, state)
    for name, layer in layers.items():
        layer.set_memory_state({key: state[f"{name}.{key}"] for key in layer.empty_memory_state(1)})


def check_memory_state(model: nn.Module, state: dict[str, Tensor]) -> dict[str, MemoryLayer]:
    """Check that ``state`` has exactly the tensors (names and shapes) of ``model``'s memory layers.

    Returns:
        The memory layers by module name.

    Raises:
        ConfigError: A layer is missing from ``state``, a tensor is unknown, or a shape differs.
    """
    layers = _require_layers(model)
    known: set[str] = set()
    for name, layer in layers.items():
        M = state.get(f"{name}.M")
        expected = layer.empty_memory_state(M.shape[0] if M is not None and M.dim() else 1)
        known |= {f"{name}.{key}" for key in expected}
        missing = sorted(f"{name}.{key}" for key in expected if f"{name}.{key}" not in state)
        if missing:
            raise ConfigError(f"memory state lacks {missing}: it was not written by this model's memory layers")
        for key, want in expected.items():
            got = state[f"{name}.{key}"]
            if got.shape != want.shape:
                raise ConfigError(f"memory state {name}.{key} has shape {tuple(got.shape)}, this model needs "
                                  f"{tuple(want.shape)}: it belongs to a model with other memory sizes")
    unknown = sorted(set(state) - known)
    if unknown:
        raise ConfigError(f"memory state holds tensors this model has no layer for: {unknown[:3]}")
    return layers


def memory_state_nbytes(model: nn.Module, batch: int = 1) -> int:
    """Bytes of the memory state of every memory layer for ``batch`` sequences."""
    return sum(t.numel() * t.element_size() for layer in memory_layers(model).values()
               for t in layer.empty_memory_state(batch).values())


# -- fingerprints -------------------------------------------------------------------------------------
def config_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's architecture (its ModelConfig without the report name)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError("memory state files need a TransformerLM (a model with a .config)")
    data = {k: v for k, v in config.to_dict().items() if k != "name"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter's name, dtype and bytes: equal only for identical weights."""
    digest = hashlib.sha256()
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied weights once
            continue
        seen.add(id(p))
        digest.update(f"{name}:{p.dtype}:{tuple(p.shape)};".encode())
        flat = p.detach().reshape(-1)
        for i in range(0, flat.numel(), HASH_CHUNK_ELEMENTS):
            digest.update(flat[i:i + HASH_CHUNK_ELEMENTS].cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelFingerprint:
    """What a memory file must match to be loaded: the architecture and the weights that wrote it.

    Attributes:
        config: `config_fingerprint` of the model.
        weights: `weights_fingerprint` of the model.
    """

    config: str
    weights: str

    @classmethod
    def of(cls, model: nn.Module) -> ModelFingerprint:
        """Both fingerprints of ``model`` (hashing every weight: compute it once per model)."""
        return cls(config_fingerprint(model), weights_fingerprint(model))


def memory_record(state: dict[str, Tensor], fingerprint: ModelFingerprint) -> dict[str, Any]:
    """The JSON record a memory file stores beside the tensors of ``state``."""
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "config_fingerprint": fingerprint.config, "weights_fingerprint": fingerprint.weights,
        "shapes": {k: list(v.shape) for k, v in state.items()}, "dtypes": {k: str(v.dtype) for k, v in state.items()},
        "tensor_bytes": sum(v.numel() * v.element_size() for v in state.values()),
    }


def check_memory_record(metadata: dict[str, Any], fingerprint: ModelFingerprint, source: str,
                        check_weights: bool = True) -> None:
    """Refuse the memory of another architecture (or, with ``check_weights``, of other weights).

    Raises:
        CheckpointError: A fingerprint differs; the message names ``source``.
    """
    if metadata.get("config_fingerprint") != fingerprint.config:
        raise CheckpointError(f"{source} holds the memory of a model with another architecture (config fingerprint "
                              "differs); load it into the model that wrote it")
    if check_weights and metadata.get("weights_fingerprint") != fingerprint.weights:
        raise CheckpointError(f"{source} was written by other weights (weights fingerprint differs); load the same "
                              "checkpoint first, or pass check_weights=False to load it anyway")


def memory_state_to_bytes(state: dict[str, Tensor], fingerprint: ModelFingerprint) -> bytes:
    """A memory state as the bytes of the file `save_memory_state` writes (tensors on the CPU + record); equal
    states give equal bytes."""
    cpu = {k: state[k].detach().cpu().contiguous() for k in sorted(state)}
    return save_bytes(cpu, metadata={METADATA_KEY: json.dumps(memory_record(cpu, fingerprint))})


def memory_state_from_bytes(model: nn.Module, data: bytes, fingerprint: ModelFingerprint, source: str = "the upload",
                            check_weights: bool = True) -> dict[str, Tensor]:
    """The state in the bytes of a memory file, checked against ``model`` (fingerprints, names, shapes).

    Raises:
        CheckpointError: Not a memory file, or written by another architecture or other weights.
        ConfigError: Layer names or shapes do not match.
    """
    header = _safetensors_header(data, source)
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    try:
        tensors = load_bytes(data)
    except Exception as err:  # safetensors raises its own error types for broken data
        raise CheckpointError(f"{source} is not a readable safetensors file ({type(err).__name__}: {err})") from None
    metadata = _record(raw, source)
    check_memory_record(metadata, fingerprint, source, check_weights)
    check_memory_state(model, tensors)
    return tensors


def _safetensors_header(data: bytes, source: str) -> dict[str, Any]:
    """The JSON header of safetensors bytes (8-byte little-endian length, then the JSON)."""
    size = int.from_bytes(data[:HEADER_LENGTH_BYTES], "little") if len(data) >= HEADER_LENGTH_BYTES else -1
    try:
        if not 0 < size <= len(data) - HEADER_LENGTH_BYTES:
            raise ValueError("truncated")
        header = json.loads(data[HEADER_LENGTH_BYTES:HEADER_LENGTH_BYTES + size])
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{source} is not a safetensors file (no readable header)")
    return header


def _record(raw: str | None, source: str) -> dict[str, Any]:
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(f"{source} is a safetensors file but not a legolm memory state (no {METADATA_KEY} "
                              "record)")
    return metadata


# -- files --------------------------------------------------------------------------------------------
@dataclass
class MemoryFile:
    """A saved memory state.

    Attributes:
        path: The safetensors file.
        tensor_bytes: Bytes of the state tensors.
        file_bytes: Size of the file (tensors + header).
        metadata: The JSON record stored in the file.
    """

    path: Path
    tensor_bytes: int
    file_bytes: int
    metadata: dict[str, Any]


def save_memory_state(model: nn.Module, path: str | Path, overwrite: bool = False) -> MemoryFile:
    """Write the stored memory to ``path`` (temp file + rename).

    Raises:
        LegolmError: ``path`` exists and ``overwrite`` is False, or no memory is stored yet.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise LegolmError(f"{path} already exists; choose another path or pass overwrite=True (--overwrite)")
    _require_layers(model)
    state = {k: v.detach().cpu().contiguous() for k, v in get_memory_state(model).items()}
    if not state:
        raise LegolmError("no memory is stored yet: run the model inside `with carry_memory(model):` first")
    metadata = memory_record(state, ModelFingerprint.of(model))
    tensor_bytes = metadata["tensor_bytes"]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={METADATA_KEY: json.dumps(metadata)})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return MemoryFile(path, tensor_bytes, path.stat().st_size, metadata)


def read_memory_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the metadata record of a memory file (no model checks)."""
    path = Path(path)
    if not path.is_file():
        raise LegolmError(f"memory state file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as err:  # safetensors raises its own error types for broken files
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from None
    return tensors, _record(raw, str(path))


def load_memory_state(model: nn.Module, path: str | Path, check_weights: bool = True) -> MemoryFile:
    """Load a memory saved by `save_memory_state` into ``model`` (onto its device).

    Args:
        model: A model with the same config (and, with ``check_weights``, the same weights).
        path: The memory file.
        check_weights: Refuse a memory written by other weights (it would be meaningless).

    Raises:
        CheckpointError: Not a memory file, or written by a model of another architecture or weights.
        ConfigError: Layer names or shapes do not match.
    """
    _require_layers(model)
    tensors, metadata = read_memory_file(path)
    weights = weights_fingerprint(model) if check_weights else ""
    check_memory_record(metadata, ModelFingerprint(config_fingerprint(model), weights), str(path), check_weights)
    set_memory_state(model, tensors)
    p = Path(path)
    return MemoryFile(p, int(metadata.get("tensor_bytes", 0)), p.stat().st_size, metadata)
