"""Fitting the curvature: the generalised Gauss-Newton (or a Monte-Carlo Fisher) of every
LoRA ``Linear``, summed over the training data as KFAC factors or an exact diagonal."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import PeftError
from .._util import eval_mode, to_device
from .config import LaplaceLoraConfig
from .posterior import layers_or_fail
from .taps import Tap, model_inputs, per_example, prediction_logits, token_mask

#: the most classes for which ``fisher: auto`` takes the exact GGN (C - 1 backward passes)
GGN_MAX_CLASSES = 16


class Accumulator:
    """Running sums for one LoRA Linear: KFAC factors or the exact per-example diagonal."""

    def __init__(self, kind: str):
        self.kind = kind
        self.a_sum: torch.Tensor | float = 0.0
        self.a_count = 0.0
        self.g_sum: torch.Tensor | float = 0.0
        self.diag: torch.Tensor | float = 0.0

    def add_inputs(self, a: torch.Tensor, mask: torch.Tensor, reduce: bool) -> None:
        if self.kind != "kfac":
            return
        a = a.float()
        if reduce:  # one unit per sequence: its token-averaged input
            abar = (a * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
            self.a_sum = self.a_sum + abar.T @ abar
            self.a_count += a.shape[0]
        else:
            flat, m = a.reshape(-1, a.shape[-1]), mask.reshape(-1)
            self.a_sum = self.a_sum + (flat * m[:, None]).T @ flat
            self.a_count += float(m.sum())

    def add_grads(self, a: torch.Tensor, g: torch.Tensor, reduce: bool) -> None:
        g = g.float()
        if self.kind == "kfac":
            if reduce:
                gsum = g.sum(1)
                self.g_sum = self.g_sum + gsum.T @ gsum
            else:
                flat = g.reshape(-1, g.shape[-1])
                self.g_sum = self.g_sum + flat.T @ flat
        else:
            per_ex = torch.einsum("bto,bti->boi", g, a.float())
            self.diag = self.diag + per_ex.square().sum(0)

    def scale(self, factor: float) -> None:
        if self.kind == "kfac":
            self.g_sum = self.g_sum * factor
        else:
            self.diag = self.diag * factor


def fit_posterior(peft_model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> int:
    """Fill every layer's curvature from ``batches`` (the training data); returns the number of
    predictions seen. Does not touch the prior precision (see :func:`tune_prior_marglik`)."""
    cfg: LaplaceLoraConfig = peft_model.method.config
    layers = layers_or_fail(peft_model)
    blocks = [(lin, post) for layer in layers for lin, post in layer.blocks()]
    accs = [Accumulator(cfg.hessian) for _ in blocks]
    device = layers[0].lora_A.weight.device
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    seen = 0.0
    with eval_mode(peft_model), torch.enable_grad(), Tap([lin for lin, _ in blocks]) as tap:
        for batch in batches:
            batch = to_device(batch, device)
            logits, units = prediction_logits(peft_model(**model_inputs(batch)).logits, batch)
            reduce = logits.ndim == 2
            bsz = logits.shape[0]
            inputs = [per_example(a, bsz) for a in tap.inputs]
            for acc, a in zip(accs, inputs):
                acc.add_inputs(a, token_mask(batch, bsz, a.shape[1], device), reduce)
            for v in pseudo_residuals(logits.detach(), units, cfg.fisher, gen):
                grads = tap.output_grads((logits * v).sum())
                for acc, a, g in zip(accs, inputs, grads):
                    acc.add_grads(a, per_example(g, bsz), reduce)
            seen += float(units.sum())
    if seen == 0:
        raise PeftError("laplace_lora.finalize: needs at least one batch of training data")
    factor = cfg.dataset_size / seen if cfg.dataset_size else 1.0
    with torch.no_grad():
        for acc, (_, post) in zip(accs, blocks):
            acc.scale(factor)
            post.set_curvature(acc)
    return int(seen)


def pseudo_residuals(
    logits: torch.Tensor, units: torch.Tensor, fisher: str, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """Vectors ``v`` with ``Σ_v J_vᵀ J_v`` = the GGN, or a one-sample Fisher; zero where
    ``units`` is 0. ``ggn``: per prediction, ``v_j = √μ_j q_j`` over the eigenpairs of the
    softmax Hessian ``diag(p) - ppᵀ`` except its null direction (the all-ones vector), so
    ``C - 1`` backward passes give it exactly (one for binary). ``mc``: ``v = p - e_y``,
    ``y ~ p``."""
    probs = logits.float().softmax(-1)
    n_cls = probs.shape[-1]
    w = units[..., None]
    if fisher == "ggn" or (fisher == "auto" and n_cls <= GGN_MAX_CLASSES):
        hess = torch.diag_embed(probs) - probs[..., :, None] * probs[..., None, :]
        vals, vecs = torch.linalg.eigh(hess.double())  # ascending: [0] is the null direction
        for j in range(1, n_cls):
            v = vecs[..., :, j] * vals[..., j : j + 1].clamp_min(0).sqrt()
            yield (v.float() * w).to(logits.dtype)
    else:
        flat = probs.reshape(-1, n_cls)
        y = torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1])
        yield ((probs - F.one_hot(y, n_cls).to(probs.dtype)) * w).to(logits.dtype)
