"""Training: ``python -m crate_kernels.train`` (``crate-train``), or ``train(TrainConfig(...))`` from Python."""

from crate_kernels.train.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TaskConfig,
    TrainConfig,
    parse_args,
)
from crate_kernels.train.loop import train

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TaskConfig",
    "TrainConfig",
    "parse_args",
    "train",
]
