"""LEGO: a shallow model trained first, deepened only where it is unsure, with true early exit.

    model = LegoLM(shallow)                       # phase 1 trains model.base (run_phase1)
    tau = compute_confidence_threshold(model, val_batches, target_ratio=0.5)
    model.extend(num_layers=6, routing_threshold=tau)
    hard = collect_hard_examples(model, train_batches, tau)     # lower-layer states, stored once
    ...                                           # phase 2 trains the upper layers (run_phase2)
    out = generate_with_early_exit(model, ids, max_new_tokens=64, routing_threshold=tau)
"""

from legolm.lego.early_exit import EarlyExitResult, EarlyExitStats, generate_with_early_exit
from legolm.lego.model import (
    LegoLM,
    LegoMeta,
    LegoOutput,
    confidence,
    exits,
    load_lego,
    routed_log_probs,
    save_lego,
)

__all__ = [
    "EarlyExitResult",
    "EarlyExitStats",
    "LegoLM",
    "LegoMeta",
    "LegoOutput",
    "confidence",
    "exits",
    "generate_with_early_exit",
    "load_lego",
    "routed_log_probs",
    "save_lego",
]
