"""Calibration metrics of any classifier's probabilities (not specific to Laplace)."""

from __future__ import annotations

import torch

from ...errors import PeftError


def calibration_metrics(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> dict[str, float]:
    """Accuracy, mean NLL and expected calibration error of class probabilities ``(N, C)``:
    ``Σ_b (n_b / N) |acc_b - conf_b|`` over ``n_bins`` equal-width confidence bins
    ``((b-1)/n, b/n]`` (Guo et al. 2017)."""
    probs, labels = probs.detach().double().cpu(), labels.detach().long().cpu()
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise PeftError(f"calibration_metrics: probs (N, C) and labels (N,), got "
                        f"{tuple(probs.shape)} and {tuple(labels.shape)}")
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            gap = abs(float(correct[sel].mean()) - float(conf[sel].mean()))
            ece += float(sel.double().mean()) * gap
    nll = float(-torch.log(probs.gather(1, labels[:, None]).clamp_min(1e-12)).mean())
    return {"accuracy": float(correct.mean()), "nll": nll, "ece": ece}
