"""Choosing the prior precision τ: the maximiser of the Laplace marginal likelihood, or the
grid value with the lowest predictive NLL on validation data."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .config import LaplaceLoraConfig
from .posterior import layers_or_fail, lora_params, set_prior_precision
from .predictive import linearised_moments, probs_from_moments


def _curvature(peft_model: nn.Module) -> tuple[float, torch.Tensor]:
    """(‖θ‖² of the LoRA weights, every posterior eigenvalue λ) in float64."""
    layers = layers_or_fail(peft_model)
    sq = sum(float(p.detach().double().square().sum()) for p in lora_params(layers))
    lam = torch.cat([post.eigenvalues().double().cpu()
                     for layer in layers for _, post in layer.blocks()])
    return sq, lam


def log_marglik(peft_model: nn.Module, tau: float | torch.Tensor) -> torch.Tensor:
    """The Laplace log marginal likelihood as a function of the prior precision, up to terms
    that do not depend on it: ``-½ τ ‖θ‖² - ½ Σ log(1 + λ/τ)`` over the posterior's
    eigenvalues ``λ`` (the ``P/2 log τ`` of the prior cancels against the directions with no
    curvature)."""
    sq, lam = _curvature(peft_model)
    tau = torch.as_tensor(tau, dtype=torch.float64)
    penalty = torch.log1p(lam[None] / tau.reshape(-1, 1)).sum(-1).reshape(tau.shape)
    return -0.5 * tau * sq - 0.5 * penalty


def tune_prior_marglik(peft_model: nn.Module) -> float:
    """Set τ to the maximiser of :func:`log_marglik`: the root of
    ``Σ λ/(τ(λ+τ)) = ‖θ‖²`` (the left side falls monotonically in τ), by bisection on log τ."""
    sq, lam = _curvature(peft_model)
    lam = lam[lam > 0]

    def excess(log_tau: float) -> float:
        t = math.exp(log_tau)
        return float((lam / (t * (lam + t))).sum()) - sq

    lo, hi = math.log(1e-8), math.log(1e12)
    if lam.numel() == 0 or sq == 0:
        # nothing to trade off; keep the configured one
        tau = peft_model.method.config.prior_precision
    elif excess(hi) > 0 or excess(lo) < 0:
        tau = math.exp(hi if excess(hi) > 0 else lo)  # optimum outside the bracket: its edge
    else:
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
        tau = math.exp(0.5 * (lo + hi))
    set_prior_precision(peft_model, tau)
    return tau


def tune_prior_on_validation(
    peft_model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
    grid: Sequence[float] | None = None, link: str | None = None,
) -> float:
    """Set τ to the grid value with the lowest predictive NLL on labelled ``batches`` (one
    Jacobian pass; every τ of the grid is scored from it). Returns τ."""
    cfg: LaplaceLoraConfig = peft_model.method.config
    grid = (torch.logspace(-4, 6, 41) if grid is None
            else torch.as_tensor(grid, dtype=torch.float32))
    nll = torch.zeros(len(grid), dtype=torch.float64)
    for batch in batches:
        mean, cov = linearised_moments(peft_model, batch, grid)
        labels = batch["labels"].to(mean.device)
        for t in range(len(grid)):
            p = probs_from_moments(mean, cov[t], link or cfg.predictive, cfg.n_samples, cfg.seed)
            nll[t] += float(-torch.log(p.gather(1, labels[:, None]).clamp_min(1e-12)).sum())
    tau = float(grid[int(torch.argmin(nll))])
    set_prior_precision(peft_model, tau)
    return tau
