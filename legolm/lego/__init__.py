"""LEGO training: a shallow model (or a pretrained model's first blocks) with an exit of its own,
deepened only where it is unsure; the model type is `legolm.model.lego.LegoLM`, its decoders are in
`legolm.generation` (early exit, self-speculative).

    model = LegoLM(shallow_config)                # grown: phase 1 trains it (run_phase1)
    tau = compute_confidence_threshold(model, val_batches, target_ratio=0.5)
    model.extend(num_layers=6, routing_threshold=tau)
    hard = collect_hard_examples(model, train_batches, tau)     # lower-layer states, stored once
    ...                                           # phase 2 trains the upper layers (run_phase2)
    ...                                           # optional phase 3 distils the shallow exit (run_phase3)
    generate(model, prompts, GenerationConfig(early_exit="threshold", fused=True))
"""

from legolm.lego.hard_examples import HardExamples, collect_hard_examples, evaluate_on_hard_examples
from legolm.lego.threshold import compute_confidence_threshold
from legolm.lego.train import LegoTraining, run_phase1, run_phase2, run_phase3, train_lego

__all__ = [
    "HardExamples",
    "LegoTraining",
    "collect_hard_examples",
    "compute_confidence_threshold",
    "evaluate_on_hard_examples",
    "run_phase1",
    "run_phase2",
    "run_phase3",
    "train_lego",
]
