"""Analyses of trained models: the rank of fine-tuning updates (`legolm analyze rank`)."""

from legolm.analysis.rank import (
    RankProfile,
    checkpoint_deltas,
    energy_curve,
    init_lora_from_delta,
    lora_deltas,
    rank_for_energy,
    rank_profiles,
)

__all__ = [
    "RankProfile",
    "checkpoint_deltas",
    "energy_curve",
    "init_lora_from_delta",
    "lora_deltas",
    "rank_for_energy",
    "rank_profiles",
]
