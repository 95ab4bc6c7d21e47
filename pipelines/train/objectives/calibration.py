"""Whether a classifier's probabilities can be trusted: the softmax's calibration over the
eval split, and a fitted ``laplace_lora``'s posterior predictive, which replaces the MAP
scores in a run's last evaluation (serving and promotion answer with the predictive)."""

from __future__ import annotations

from typing import Any

import torch

from .. import metrics as M


class CalibratedSums:
    """``eval_ece`` and ``eval_nll`` of the softmax of each batch's logits."""

    def __init__(self) -> None:
        self.calib = M.Calibration()

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.calib.add(torch.softmax(logits.float(), -1), labels)

    def result(self) -> dict[str, float]:
        c = self.calib.summarise()
        return {M.EVAL_ECE: c[M.EVAL_ECE], M.EVAL_NLL: c[M.EVAL_NLL]}


def posterior_scores(peft_model: Any, metrics: dict[str, float],
                     batches: list[dict[str, torch.Tensor] | None], device: torch.device,
                     *, partitioned: bool) -> dict[str, float]:
    """``metrics`` with a fitted ``laplace_lora``'s posterior predictive in place of the MAP
    scores (kept as ``eval_map_*``). With partitioned weights (ZeRO-3) the predictive is
    not computed (its Jacobian pass is not a collective every rank would join): the MAP
    scores stand, ``laplace_predictive`` 0. Any other model: ``metrics`` unchanged."""
    if not M.uses_posterior(peft_model):
        return metrics
    if partitioned:
        return {**metrics, M.LAPLACE_PREDICTIVE: 0.0}
    post = M.posterior_eval(peft_model, batches, device)
    mapped = {f"eval_map_{k[len('eval_'):]}": v for k, v in metrics.items() if k in post}
    return {**metrics, **mapped, **post, M.LAPLACE_PREDICTIVE: 1.0}
