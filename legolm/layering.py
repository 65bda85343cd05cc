"""The floors of the package, bottom to top: a module may import its own floor and the floors below.

Each floor names packages (``legolm.layers``) or single modules (``legolm.config``); a module
belongs to the floor of its longest listed prefix. No import may point to a higher floor, also
not one inside a function or under ``TYPE_CHECKING``, and no import circle may close, also not
within a floor; ``tests/test_layering.py`` checks both over every file of ``legolm/``.
ARCHITECTURE.md draws the house.
"""

from __future__ import annotations

FLOORS: list[tuple[str, list[str]]] = [  # (name, packages or modules), bottom first
    ("foundation", ["legolm.errors", "legolm.utils", "legolm.config", "legolm.kernels", "legolm.layering"]),
    ("core", ["legolm.core"]),  # ModelConfig, layer-type names, RoPE, KV cache, layer context
    ("layers", ["legolm.layers"]),  # layer builders, attention/MLP/norms, memory layers and their state
    ("model", ["legolm.model"]),  # TransformerLM, LegoLM, factory, state-dict validation
    ("data", ["legolm.data"]),  # tokenizers, sources, corpora, tokenized splits
    ("eval", ["legolm.eval"]),  # perplexity, sanity bands, reversal-curse tests
    ("checkpoints", ["legolm.checkpoints"]),  # legolm / Hugging Face / GGUF weights in and out
    ("train", ["legolm.train"]),  # fit: batches, optimizer, schedule, metrics, run directories, distributed
    ("generation", ["legolm.generation"]),  # decoding: sampling, caches, fused and early-exit decoders
    ("adapters", ["legolm.adapters", "legolm.analysis"]),  # LoRA, Skip2-LoRA, PEFT files, rank analysis
    ("methods", ["legolm.lego", "legolm.lct", "legolm.experiment", "legolm.serve"]),  # each method's pieces
    ("recipes", ["legolm.recipes"]),  # one job per command: config dataclass + run
    ("cli", ["legolm.cli"]),  # argparse front doors
    ("api", ["legolm"]),  # the package's public names (legolm/__init__.py)
]


def floor_of(module: str) -> int:
    """The floor index of a dotted module name (``legolm.core.config`` -> 1); -1 outside the table."""
    best, floor = -1, -1
    for i, (_, names) in enumerate(FLOORS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, floor = len(name), i
    return floor
