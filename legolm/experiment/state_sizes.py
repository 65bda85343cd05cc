"""The memory state each compared model carries per sequence, built on the meta device (no weights, no data).

    legolm experiment --state-sizes [--model.memory-heads 8 ...]

A memory layer holds, per memory and memory head, an fp32 matrix M (Dk x Dv) and normaliser z (Dk),
plus an int64 segment counter (and ``multi_memory`` one fp32 token count per memory)::

    bytes = memories · heads · (Dk·Dv + Dk) · 4 + 8 (+ 4 · memories for multi_memory)

Infini-attention (Munkhdalai et al. 2024, arXiv 2404.07143) keeps this fixed whatever the
sequence length; a ``pythia`` model keeps none (its KV cache grows with the sequence instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from legolm.core.config import PRESETS
from legolm.experiment.config import ExperimentModelSpec
from legolm.layers.memory import MemoryAttention
from legolm.layers.memory_state import memory_layers, memory_state_nbytes
from legolm.model.factory import create_model


@dataclass
class StateSize:
    """One row: the memory of a model kind at the experiment's sizes.

    Attributes:
        kind: Model kind.
        memories: Memories (slots) per memory layer (0 without memory layers).
        heads: Memory heads per memory.
        head_width: Dk = Dv of each memory head.
        nbytes: State bytes per sequence, all memory layers together.
    """

    kind: str
    memories: int
    heads: int
    head_width: int
    nbytes: int


def state_sizes(spec: ExperimentModelSpec, kinds: list[str]) -> list[StateSize]:
    """The memory state per sequence of each kind built from ``spec`` (on the meta device)."""
    vocab = PRESETS.get(spec.base, {}).get("vocab_size", 0)  # memory sizes do not depend on it (bad base: options)
    rows = []
    for kind in kinds:
        with torch.device("meta"):
            model = create_model(kind, **spec.options(kind, vocab, None, None))
        layers = [m for m in memory_layers(model).values() if isinstance(m, MemoryAttention)]
        rows.append(_row(kind, layers[0], memory_state_nbytes(model)) if layers else StateSize(kind, 0, 0, 0, 0))
    return rows


def _row(kind: str, layer: MemoryAttention, nbytes: int) -> StateSize:
    width = layer.n_head * layer.head_dim // layer.memory_heads
    return StateSize(kind, layer.memory.slots, layer.memory_heads, width, nbytes)


def state_size_table(spec: ExperimentModelSpec, kinds: list[str]) -> str:
    """`state_sizes` as a Markdown table, with the settings that decide it."""
    lines = [f"memory state per sequence (fp32; base {spec.base}, n_embd {spec.n_embd or 'of the preset'}, "
             f"memory_heads {spec.memory_heads}, num_memories {spec.num_memories}, "
             f"num_memory_banks {spec.num_memory_banks}):", "",
             "| model | memories | memory heads | head width | state bytes | KiB |", "|---|---:|---:|---:|---:|---:|"]
    for r in state_sizes(spec, kinds):
        kib = r.nbytes / 1024
        lines.append(f"| {r.kind} | {r.memories} | {r.heads} | {r.head_width} | {r.nbytes:,} | {kib:,.1f} |")
    return "\n".join(lines)
