"""Evaluation over every rank's shard of the eval split, through the run's objective: what
each report's ``eval_*`` metrics are, and (with :func:`final_eval`) the run's last scores,
which :mod:`pipelines.evaluate` computes the same way for a saved adapter."""

from __future__ import annotations

from typing import Any

import torch

from .objectives import Objective


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: Any, batches: list[dict[str, torch.Tensor] | None],
             fallback: dict[str, torch.Tensor], objective: Objective, device: torch.device,
             *, calibrate: bool = False) -> dict[str, float]:
    """The objective's eval metrics (loss weighted by its targets, accuracy, ...) over every
    rank's eval batches (``None``: a rank without rows); ``calibrate`` asks a classifier for
    ``eval_ece`` and ``eval_nll`` too."""
    model.eval()
    sums = objective.eval_sums(calibrate=calibrate)
    for b in batches:
        real = b is not None
        loss, logits = objective.forward(model, to_device(b if real else fallback, device))
        if real:  # ZeRO-3's forward is collective: a rank with no rows still takes part
            sums.add(float(loss), objective.weight(b), logits, b)
    model.train()
    return sums.result()


def final_eval(model: Any, peft_model: Any, batches: list[dict[str, torch.Tensor] | None],
               fallback: dict[str, torch.Tensor], objective: Objective, device: torch.device,
               *, partitioned: bool = False) -> dict[str, float]:
    """The last evaluation of a run: :func:`evaluate` calibrated, then the objective's final
    word (a fitted ``laplace_lora`` scored by its posterior predictive, unless the weights
    are ``partitioned``)."""
    out = evaluate(model, batches, fallback, objective, device, calibrate=True)
    return objective.final_metrics(peft_model, out, batches, device, partitioned=partitioned)
