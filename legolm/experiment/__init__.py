"""The unified experiment: pythia and the memory-layer models trained and scored under equal conditions.

Its settings (`ExperimentConfig`), its table (`ModelResult`, `legolm.experiment.report`) and the
memory-state sizes; the job itself is `legolm.recipes.experiment.run`.
"""

from legolm.experiment.config import ExperimentConfig, ExperimentModelSpec
from legolm.experiment.report import ModelResult

__all__ = ["ExperimentConfig", "ExperimentModelSpec", "ModelResult"]
