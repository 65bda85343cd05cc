"""`ExperimentConfig`: every setting of ``legolm experiment`` (YAML keys and dotted flags).

It is a `FitConfig` (the budget, optimizer, schedule and run directory shared by every model)
plus the models to compare, their sizes and memory options, the corpus and the reversal data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from legolm.core.config import PRESETS
from legolm.data.tokenized import DataConfig
from legolm.errors import ConfigError
from legolm.eval.reversal import ReversalConfig
from legolm.model.factory import KINDS, layer_options
from legolm.train.config import FitConfig, RunConfig


@dataclass
class ExperimentModelSpec:
    """Sizes of every compared model and the options of its special layer.

    Attributes:
        base: ModelConfig preset giving the sizes (pythia-70m: 6 layers, 512 wide, 8 heads, MLP 2,048).
        num_layers: Layers per model (the special layer plus num_layers - 1 Pythia layers).
        special_position: Index of the special layer (negative counts from the top).
        n_embd: Model width (None: the preset's).
        n_head: Attention heads (None: the preset's).
        intermediate_size: MLP width (None: the preset's MLP/width ratio times n_embd).
        block_size: Longest sequence (None: the preset's).
        pad_vocab_to: The vocabulary is the tokenizer's, rounded up to a multiple of this.
        segment_len: Memory layers: tokens per segment.
        use_delta_rule: Memory layers: write with the delta rule.
        memory_heads: Memory layers: memory heads (1 = one head of width n_embd).
        num_memory_banks: infini: memory banks.
        segments_per_bank: infini: segments written into a bank before the next.
        num_memories: multi_memory: independent memories; hierarchical: levels, fine to coarse (>= 2).
        coarse_every: hierarchical: segments between consolidations of one level into the next.
    """

    base: str = "pythia-70m"
    num_layers: int = 6
    special_position: int = 0
    n_embd: int | None = None
    n_head: int | None = None
    intermediate_size: int | None = None
    block_size: int | None = None
    pad_vocab_to: int = 64
    segment_len: int = 64
    use_delta_rule: bool = True
    memory_heads: int = 1
    num_memory_banks: int = 1
    segments_per_bank: int = 4
    num_memories: int = 4
    coarse_every: int = 4

    def options(self, kind: str, vocab_size: int, eos_id: int | None, bos_id: int | None) -> dict[str, Any]:
        """Keyword options of `create_model` for ``kind`` (only the layer options ``kind`` has)."""
        if self.base not in PRESETS:
            raise ConfigError(f"unknown model.base preset {self.base!r}; known presets: {sorted(PRESETS)}")
        sizes: dict[str, Any] = {n: getattr(self, n) for n in ("n_embd", "n_head", "intermediate_size", "block_size")
                                 if getattr(self, n) is not None}
        if self.n_embd is not None and self.intermediate_size is None:
            base = PRESETS[self.base]
            sizes["intermediate_size"] = base["intermediate_size"] * self.n_embd // base["n_embd"]
        vocab = -(-vocab_size // self.pad_vocab_to) * self.pad_vocab_to
        layer = {n: getattr(self, n) for n in layer_options(kind) if hasattr(self, n)}
        return dict(num_layers=self.num_layers, special_position=self.special_position, base=self.base,
                    vocab_size=vocab, eos_token_id=eos_id, bos_token_id=bos_id, **sizes, **layer)


@dataclass
class ExperimentConfig(FitConfig):
    """``legolm experiment``: train each model on the same data with the same budget and seed.

    Attributes:
        models: Model kinds to compare (pythia, infini, multi_memory, hierarchical).
        samples: Corpus documents used (train + validation; None: all), same as data.max_documents.
        include_reversal: Add the reversal-curse training sentences to the training text.
        model: Sizes and memory options of the models.
        data: Corpus and tokenizer.
        reversal: Reversal-curse data and scoring.
    """

    max_steps: int | None = None
    epochs: int | None = 1
    window: int = 256
    batch_size: int = 8
    models: list[str] = field(default_factory=lambda: list(KINDS))
    samples: int | None = 2000
    include_reversal: bool = True
    model: ExperimentModelSpec = field(default_factory=ExperimentModelSpec)
    data: DataConfig = field(default_factory=lambda: DataConfig(source="tinystories"))
    reversal: ReversalConfig = field(default_factory=ReversalConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/experiment"))

    def validate(self) -> None:
        super().validate()
        if not self.models:
            raise ConfigError(f"give at least one model to compare: --models {' '.join(KINDS)}")
        unknown = [m for m in self.models if m not in KINDS]
        if unknown:
            raise ConfigError(f"unknown model kind(s) {unknown}; choose from {list(KINDS)}")
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"--models lists a kind twice: {self.models}")
        if self.samples is not None and self.samples < 2:
            raise ConfigError(f"samples must be >= 2 (documents for training and validation), got {self.samples}")
        if self.run.resume:
            raise ConfigError("legolm experiment cannot --resume; rerun it with --overwrite")
        self.reversal.validate()

    def data_config(self) -> DataConfig:
        """The corpus settings with ``samples`` as the document limit."""
        return dataclasses.replace(self.data, max_documents=self.samples)
