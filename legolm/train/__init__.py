"""Training: the one loop `fit`, its configs, batch sources, optimizer, checkpoints and metrics."""

from legolm.train.batches import Batch, BatchSource, WindowBatches
from legolm.train.config import (
    EvalConfig,
    FitConfig,
    ModelSpec,
    OptimConfig,
    RunConfig,
    SampleConfig,
    ScheduleConfig,
    TrainConfig,
)
from legolm.train.distributed import DistContext, Wrapped, init_distributed
from legolm.train.fit import Callback, FitResult, FitState, NextTokenLoss, TrainStep, evaluate_loss, fit
from legolm.train.optim import LRSchedule, build_optimizer

__all__ = [
    "Batch",
    "BatchSource",
    "Callback",
    "DistContext",
    "EvalConfig",
    "FitConfig",
    "FitResult",
    "FitState",
    "LRSchedule",
    "ModelSpec",
    "NextTokenLoss",
    "OptimConfig",
    "RunConfig",
    "SampleConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainStep",
    "WindowBatches",
    "Wrapped",
    "build_optimizer",
    "evaluate_loss",
    "fit",
    "init_distributed",
]
