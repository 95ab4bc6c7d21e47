"""The learning-rate schedule every run follows, solo or packed."""

from __future__ import annotations

import math
from collections.abc import Callable

from .config import TrainConfig


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Multiplier of each group's base rate at optimizer step ``s`` (0-based): linear warmup,
    then cosine or linear decay to ``min_lr_ratio``, or constant."""
    warm, total, floor = config.warmup_steps, config.max_steps, config.min_lr_ratio

    def f(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warm) / max(1, total - warm))
        if config.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
