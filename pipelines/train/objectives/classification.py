"""Sequence classification: cross-entropy on the class head (transformers' loss), accuracy,
and for the last evaluation the softmax's calibration (``eval_ece``, ``eval_nll``); a fitted
``laplace_lora`` is scored by its posterior predictive there instead."""

from __future__ import annotations

from typing import Any

import torch

from ...data.manifest import Manifest
from .. import metrics as M
from .base import EvalSums, Objective, register
from .calibration import CalibratedSums, posterior_scores


class ClassificationSums(EvalSums):
    """Loss and accuracy, plus the calibration of the softmax when asked."""

    def __init__(self, *, calibrate: bool):
        super().__init__()
        self.correct = self.count = 0.0
        self.calib = CalibratedSums() if calibrate else None

    def add(self, loss: float, weight: int, logits: torch.Tensor,
            batch: dict[str, torch.Tensor]) -> None:
        super().add(loss, weight, logits, batch)
        labels = batch["labels"].to(logits.device)
        self.correct += float((logits.argmax(-1) == labels).sum())
        self.count += float(labels.numel())
        if self.calib is not None:
            self.calib.add(logits, labels)

    def result(self) -> dict[str, float]:
        out = super().result()
        correct, count = M.all_reduce([self.correct, self.count])
        out[M.EVAL_ACCURACY] = correct / count if count else float("nan")
        if self.calib is not None:
            out.update(self.calib.result())
        return out


@register
class Classification(Objective):
    name = "classification"
    default_for = ("classification",)

    def __init__(self, info: Manifest):
        super().__init__(info)

    def eval_sums(self, *, calibrate: bool = False) -> EvalSums:
        return ClassificationSums(calibrate=calibrate)

    def final_metrics(self, model: Any, metrics: dict[str, float],
                      batches: list[dict[str, torch.Tensor] | None], device: torch.device,
                      *, partitioned: bool) -> dict[str, float]:
        return posterior_scores(model, metrics, batches, device, partitioned=partitioned)
