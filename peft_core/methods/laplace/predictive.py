"""The Bayesian predictive: the network linearised in the LoRA weights gives Gaussian logits
``N(f(x), J Σ Jᵀ)``; class probabilities by the probit approximation or Monte Carlo."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import PeftError
from .._util import eval_mode, to_device
from .config import LaplaceLoraConfig
from .posterior import layers_or_fail, prior_precision
from .taps import Tap, model_inputs, per_example


def linearised_moments(
    peft_model: nn.Module, batch: Mapping[str, torch.Tensor],
    taus: Sequence[float] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(B, C)`` and covariance ``(T, B, C, C)`` of the linearised logits, one covariance
    per prior precision in ``taus`` (default: the fitted one). Classification logits only.

    For two classes only the margin ``f₁ - f₀`` matters to the softmax, so the moments are
    those of ``(0, f₁ - f₀)``: one backward pass instead of two, the same Monte-Carlo
    predictive, and the probit link becomes the usual binary one."""
    layers = layers_or_fail(peft_model)
    device = layers[0].lora_A.weight.device
    if taus is None:
        tau = prior_precision(peft_model)
        if tau <= 0:
            raise PeftError("laplace_lora: no posterior fitted yet; call "
                            "peft_model.finalize(train_batches)")
        taus = [tau]
    taus = torch.as_tensor(taus, dtype=torch.float32, device=device).reshape(-1)
    blocks = [(lin, post) for layer in layers for lin, post in layer.blocks()]
    batch = to_device(batch, device)
    with eval_mode(peft_model):
        with torch.enable_grad(), Tap([lin for lin, _ in blocks]) as tap:
            logits = peft_model(**model_inputs(batch)).logits
            if logits.ndim != 2:
                raise PeftError("laplace_lora: the predictive needs classification logits "
                                f"(B, C), got {tuple(logits.shape)}")
            bsz, n_cls = logits.shape
            inputs = [per_example(a, bsz).float() for a in tap.inputs]
            outs = [logits[:, 1] - logits[:, 0]] if n_cls == 2 else list(logits.unbind(1))
            per_out = [tap.output_grads(o.sum()) for o in outs]
        cov = torch.zeros(len(taus), bsz, len(outs), len(outs), device=device)
        with torch.no_grad():
            for i, (_, post) in enumerate(blocks):
                jac = torch.stack([
                    torch.einsum("bto,bti->boi", per_example(g[i], bsz).float(), inputs[i])
                    for g in per_out
                ])
                cov += post.function_cov(jac, taus)
    mean = logits.detach().float()
    if n_cls == 2:
        mean = torch.stack([torch.zeros_like(mean[:, 0]), mean[:, 1] - mean[:, 0]], 1)
        cov = F.pad(cov, (1, 0, 1, 0))  # the reference logit is a constant 0
    return mean, cov


def probs_from_moments(
    mean: torch.Tensor, cov: torch.Tensor, link: str = "probit", n_samples: int = 100,
    seed: int = 0,
) -> torch.Tensor:
    """Class probabilities from Gaussian logits ``N(mean, cov)``: the (multi-class) probit
    approximation ``softmax(μ / √(1 + π/8 · diag Σ))``, or the Monte-Carlo average of
    ``softmax`` over ``n_samples`` draws."""
    if link == "probit":
        var = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0)
        return torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), -1)
    if link != "mc":
        raise PeftError(f"laplace_lora: link must be 'probit' or 'mc', got {link!r}")
    gen = torch.Generator(device=mean.device).manual_seed(seed)
    n_cls = mean.shape[-1]
    cov = cov.double()
    # A jitter far below any variance that matters, so a degenerate (e.g. reference-class)
    # direction still factorises.
    scale = torch.diagonal(cov, dim1=-2, dim2=-1).amax(-1).clamp_min(1.0)[..., None, None]
    eye = torch.eye(n_cls, dtype=torch.float64, device=mean.device)
    chol = torch.linalg.cholesky(cov + 1e-12 * scale * eye).float()
    eps = torch.randn((n_samples, *mean.shape), generator=gen, device=mean.device)
    samples = mean + torch.einsum("...ij,s...j->s...i", chol, eps)
    return torch.softmax(samples, -1).mean(0)


def predictive_probs(
    peft_model: nn.Module, batch: Mapping[str, torch.Tensor], *, link: str | None = None,
    n_samples: int | None = None,
) -> torch.Tensor:
    """Posterior-predictive class probabilities ``(B, C)`` of a fitted ``laplace_lora`` model
    for one batch of classification inputs (``link``/``n_samples`` default to the config)."""
    cfg: LaplaceLoraConfig = peft_model.method.config
    mean, cov = linearised_moments(peft_model, batch)
    return probs_from_moments(
        mean, cov[0], link or cfg.predictive, n_samples or cfg.n_samples, cfg.seed
    )
