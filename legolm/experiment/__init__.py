"""The unified experiment: pythia and the memory-layer models trained and scored under equal conditions."""

from legolm.experiment.config import ExperimentConfig, ExperimentModelSpec
from legolm.experiment.run import ModelResult, run_experiment, train_and_score

__all__ = ["ExperimentConfig", "ExperimentModelSpec", "ModelResult", "run_experiment", "train_and_score"]
