"""The training stage: Ray Train workers fine-tune a peft_core method under DeepSpeed ZeRO.

Public API: :class:`TrainConfig`, :class:`ModelConfig`, :class:`ZeroConfig`,
:func:`train` -> :class:`TrainResult`, :func:`build_trainer` (for Ray Tune trials),
:func:`train_loop_per_worker`, :func:`check_inputs`, :func:`find_dataset`, and the metric
names in :mod:`pipelines.train.metrics`.
"""

from .config import ModelConfig, TrainConfig, ZeroConfig
from .data import DatasetError, find_dataset, read_manifest
from .loop import train_loop_per_worker
from .stage import TrainResult, build_trainer, check_inputs, train

__all__ = [
    "DatasetError",
    "ModelConfig",
    "TrainConfig",
    "TrainResult",
    "ZeroConfig",
    "build_trainer",
    "check_inputs",
    "find_dataset",
    "read_manifest",
    "train",
    "train_loop_per_worker",
]
