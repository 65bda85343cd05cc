"""Memory state: carry across calls, round trips in memory and through a file read by another
process, and refusal of incompatible models."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from legolm.checkpoints.native import save_checkpoint
from legolm.errors import CheckpointError, ConfigError, LegolmError
from legolm.layers.memory_state import (
    carry_memory,
    get_memory_state,
    load_memory_state,
    memory_state_nbytes,
    read_memory_file,
    reset_memory,
    save_memory_state,
    set_memory_state,
)
from legolm.model.factory import create_model
from legolm.model.transformer import TransformerLM

SEG = 8
KINDS = ["infini", "multi_memory", "hierarchical"]


def _model(kind: str = "infini", seed: int = 0, **options: object) -> TransformerLM:
    torch.manual_seed(seed)
    return create_model(kind, num_layers=2, base="tiny-pythia", segment_len=SEG, **options).eval()


def _copy(model: TransformerLM) -> TransformerLM:
    other = TransformerLM(model.config).eval()
    other.load_state_dict(model.state_dict())
    return other


def _stream(model: TransformerLM, *chunks: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad(), carry_memory(model):
        return [model(c) for c in chunks]


@pytest.fixture
def ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 512, (2, 6 * SEG))


@pytest.mark.parametrize("kind", KINDS)
def test_state_round_trip_gives_identical_outputs(kind: str, ids: torch.Tensor) -> None:
    model = _model(kind)
    _stream(model, ids[:, : 2 * SEG], ids[:, 2 * SEG: 4 * SEG])
    state = get_memory_state(model)
    assert state and all(k.startswith("blocks.0.attn.") for k in state)
    expected = _stream(model, ids[:, 4 * SEG:])[0]
    other = _copy(model)
    set_memory_state(other, state)
    assert torch.equal(_stream(other, ids[:, 4 * SEG:])[0], expected)
    reset_memory(other)
    assert not torch.equal(_stream(other, ids[:, 4 * SEG:])[0], expected), "the memory must matter"


def test_file_round_trip_in_another_process(tmp_path: Path, ids: torch.Tensor) -> None:
    """Save the checkpoint and the memory; a fresh Python process loads both and continues the stream
    with exactly the logits the original model gives."""
    model = _model("multi_memory", num_memories=2)
    _stream(model, ids[:, : 3 * SEG])
    save_checkpoint(model, tmp_path / "ckpt")
    info = save_memory_state(model, tmp_path / "memory.safetensors")
    assert info.tensor_bytes == memory_state_nbytes(model, batch=2)
    assert info.tensor_bytes < info.file_bytes < info.tensor_bytes + 4096  # tensors + a small JSON header
    torch.save(ids, tmp_path / "ids.pt")
    expected = _stream(model, ids[:, 3 * SEG:])[0]
    script = textwrap.dedent(f"""
        import torch
        from legolm.checkpoints.native import load_checkpoint
        from legolm.layers.memory_state import carry_memory, load_memory_state
        from pathlib import Path
        d = Path({str(tmp_path)!r})
        model = load_checkpoint(d / "ckpt").eval()
        load_memory_state(model, d / "memory.safetensors")
        ids = torch.load(d / "ids.pt", weights_only=True)
        with torch.no_grad(), carry_memory(model):
            torch.save(model(ids[:, {3 * SEG}:]), d / "out.pt")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=120)
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), expected)


def test_metadata_records_fingerprints_and_shapes(tmp_path: Path, ids: torch.Tensor) -> None:
    model = _model("hierarchical")
    _stream(model, ids)
    save_memory_state(model, tmp_path / "m.safetensors")
    tensors, meta = read_memory_file(tmp_path / "m.safetensors")
    assert meta["format"] == "legolm-memory" and len(meta["config_fingerprint"]) == 64
    assert meta["shapes"]["blocks.0.attn.M"] == [2, 2, 1, 64, 64]  # (B, fine+coarse, heads, Dk, Dv)
    assert int(tensors["blocks.0.attn.segment"]) == 6


def test_incompatible_models_are_refused(tmp_path: Path, ids: torch.Tensor) -> None:
    model = _model("infini")
    _stream(model, ids)
    path = tmp_path / "m.safetensors"
    save_memory_state(model, path)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_memory_state(_model("infini", num_memory_banks=2), path)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_memory_state(_model("hierarchical"), path)
    other_weights = _model("infini", seed=5)
    with pytest.raises(CheckpointError, match="other weights"):
        load_memory_state(other_weights, path)
    load_memory_state(other_weights, path, check_weights=False)  # the user's explicit choice
    assert torch.equal(get_memory_state(other_weights)["blocks.0.attn.M"], get_memory_state(model)["blocks.0.attn.M"])
    with pytest.raises(ConfigError, match="no memory layers"):
        load_memory_state(create_model("pythia", base="tiny-pythia", num_layers=2), path)


def test_state_of_other_sizes_is_refused_in_memory(ids: torch.Tensor) -> None:
    model = _model("infini")
    _stream(model, ids)
    state = get_memory_state(model)
    wide = _model("infini", memory_heads=2)
    with pytest.raises(ConfigError, match="shape"):
        set_memory_state(wide, state)
    with pytest.raises(ConfigError, match="lacks"):
        set_memory_state(_model("multi_memory"), state)
    with pytest.raises(ConfigError, match="no layer for"):
        set_memory_state(_copy(model), {**state, "blocks.1.attn.M": state["blocks.0.attn.M"]})


def test_files_are_never_overwritten_unasked_and_bad_files_are_named(tmp_path: Path, ids: torch.Tensor) -> None:
    model = _model("infini")
    with pytest.raises(LegolmError, match="no memory is stored"):
        save_memory_state(model, tmp_path / "empty.safetensors")
    _stream(model, ids)
    path = tmp_path / "m.safetensors"
    save_memory_state(model, path)
    with pytest.raises(LegolmError, match="already exists"):
        save_memory_state(model, path)
    save_memory_state(model, path, overwrite=True)
    plain = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not a legolm memory state"):
        load_memory_state(model, plain)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_memory_state(model, broken)
    with pytest.raises(LegolmError, match="does not exist"):
        load_memory_state(model, tmp_path / "missing.safetensors")
