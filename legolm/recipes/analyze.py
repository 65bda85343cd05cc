"""The ``legolm analyze rank`` job: singular values and energy of fine-tuning weight deltas, per layer.

The deltas are a fine-tuned (or merged-LoRA) model's weights minus the base's, or a LoRA adapter's
s·BA. It prints a per-layer table (the rank kept at each energy threshold) and a summary, and writes
``rank.csv``, ``rank.json`` (with the energy curves) and ``energy.png`` to ``out``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from legolm.adapters.peft_io import load_adapter
from legolm.analysis.rank import (
    ENERGY_PNG,
    PLOT_NOTE,
    RankProfile,
    checkpoint_deltas,
    format_rows,
    lora_deltas,
    rank_profiles,
    rank_rows,
    summary,
    write_rank_outputs,
)
from legolm.checkpoints.loader import load_pretrained
from legolm.errors import ConfigError, LegolmError
from legolm.utils.io import atomic_dir, check_deletable, check_writable


@dataclass
class RankConfig:
    """``legolm analyze rank``: whose weight deltas to analyse, and where the results go.

    Attributes:
        base: The base model (legolm/HF directory, .gguf, hub name).
        tuned: The fine-tuned (or merged-LoRA) model of the same architecture.
        adapter: A peft-format LoRA adapter directory for the base model.
        energy: Energy thresholds to report the rank for.
        out: Directory for rank.csv, rank.json and energy.png (must not exist unless overwrite; None: print only).
        overwrite: Replace an existing out directory.
        plot: Write energy.png (needs matplotlib; skipped with a note without it).
        max_rank: Keep the energy curves up to this rank (None: all).
    """

    base: str = ""
    tuned: str | None = None
    adapter: str | None = None
    energy: list[float] = field(default_factory=lambda: [0.9, 0.95])
    out: str | None = None
    overwrite: bool = False
    plot: bool = True
    max_rank: int | None = None

    def validate(self) -> None:
        """Raise `LegolmError` naming the first missing or bad setting."""
        if not self.base:
            raise ConfigError("give --base (the base model: a legolm/Hugging Face directory, .gguf file or hub name)")
        if (self.tuned is None) == (self.adapter is None):
            raise LegolmError("give exactly one of --tuned CHECKPOINT (full fine-tune or merged LoRA) or --adapter DIR")
        if any(not 0 < t <= 1 for t in self.energy):
            raise LegolmError(f"--energy thresholds must be in (0, 1], got {self.energy}")


def run(cfg: RankConfig) -> list[RankProfile]:
    """Check, load, measure the deltas, print the table and write the outputs; return the profiles."""
    cfg.validate()
    thresholds = sorted(set(cfg.energy))
    if cfg.out is not None:
        check_out(cfg.out, [cfg.base, cfg.tuned, cfg.adapter], cfg.overwrite)
    base = load_pretrained(cfg.base)
    if cfg.adapter is not None:
        load_adapter(base, cfg.adapter)
        deltas = lora_deltas(base)
    else:
        assert cfg.tuned is not None
        deltas = checkpoint_deltas(base, load_pretrained(cfg.tuned))
    profiles = rank_profiles(deltas)
    print(format_rows(rank_rows(profiles, thresholds)))
    print(summary(profiles, thresholds))
    if cfg.out is not None:
        with atomic_dir(cfg.out, cfg.overwrite) as tmp:
            names = [p.name for p in write_rank_outputs(profiles, thresholds, tmp, plot=cfg.plot,
                                                        max_rank=cfg.max_rank)]
        print(f"wrote {', '.join(names)} to {cfg.out}")
        if cfg.plot and ENERGY_PNG not in names:
            print(f"note: {PLOT_NOTE}")
    return profiles


def check_out(out: str, inputs: list[str | None], overwrite: bool) -> None:
    """Refuse an --out that cannot or may not be written, before any model is loaded."""
    check_writable(out, "--out")
    if Path(out).exists():
        if not overwrite:
            raise LegolmError(f"{out} already exists; choose another --out or pass --overwrite")
        check_deletable(out, inputs)
