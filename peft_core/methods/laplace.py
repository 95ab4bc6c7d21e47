"""``laplace_lora`` (Yang et al. 2023): LoRA, then a Laplace approximation over the LoRA weights.

Training is plain LoRA (the layers subclass :class:`~peft_core.methods.lora.LoraLayer`), so
the model's own forward is the MAP model. :meth:`LaplaceLora.finalize` fits a Gaussian
posterior ``N(θ_MAP, (H + τI)⁻¹)`` over every ``lora_A`` / ``lora_B`` weight, independent
across those matrices:

- ``H`` is the generalised Gauss-Newton (exact, one backward pass per class, for up to 16
  classes; otherwise a one-sample Monte-Carlo Fisher), either as its **diagonal** or
  **Kronecker-factored** (KFAC) per LoRA ``Linear``: ``H ≈ G ⊗ A`` with ``A`` the mean outer
  product of the layer's input activations and ``G`` the summed outer product of the
  gradients at its output. For one prediction per sequence (classification logits
  ``(B, C)``) the factors come from token-averaged inputs and token-summed gradients
  ("KFAC-reduce", exact when a sequence has one token); for per-token predictions
  (``(B, T, V)``) every token is a unit ("KFAC-expand"). Each factor is stored as its top
  ``kfac_rank`` eigenpairs; directions beyond them keep the prior precision only.
- ``τ`` (the prior precision) maximises the Laplace marginal likelihood (a 1-D root find),
  or the validation NLL via :func:`tune_prior_on_validation`.
- The predictive linearises the network in the LoRA weights: logits ``~ N(f(x), J Σ Jᵀ)``,
  with per-example Jacobians from forward/backward hooks (one backward per class); the
  probabilities use the probit approximation or Monte-Carlo samples of the logits.

The factors are buffers of the LoRA layers and listed in ``extra_state_keys``, so
``save``/``load_adapter`` carry the posterior with the adapter.
:func:`predictive_probs` and :func:`calibration_metrics` (accuracy, NLL, ECE) are the API.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import targets
from ..config import check
from ..errors import PeftError
from ..registry import register
from ._util import eval_mode, to_device
from .lora import Lora, LoraConfig, LoraLayer, lora_layers

_GGN_MAX_CLASSES = 16


@dataclasses.dataclass
class LaplaceLoraConfig(LoraConfig):
    """LoRA's fields plus the posterior's:

    ``hessian``: ``kfac`` or ``diag``. ``kfac_rank``: eigenpairs kept per Kronecker factor
    (0 keeps all). ``fisher``: ``ggn`` (exact), ``mc`` (one sampled label per prediction) or
    ``auto`` (``ggn`` up to 16 classes). ``tune_prior``: ``marglik`` or ``none`` (then
    ``prior_precision`` is used as is). ``dataset_size``: the number of predictions the
    curvature stands for (0: those ``finalize`` saw; set it when finalize gets a subset).
    ``predictive``: ``probit`` or ``mc`` with ``n_samples``. ``seed``: for the sampling.
    """

    name = "laplace_lora"
    hessian: str = "kfac"
    kfac_rank: int = 32
    fisher: str = "auto"
    prior_precision: float = 1.0
    tune_prior: str = "marglik"
    dataset_size: int = 0
    predictive: str = "probit"
    n_samples: int = 100
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        n = self.name
        check(self.hessian in ("kfac", "diag"), n, "hessian", "'kfac' or 'diag'", self.hessian)
        check(isinstance(self.kfac_rank, int) and self.kfac_rank >= 0, n, "kfac_rank", "an integer >= 0", self.kfac_rank)
        check(self.fisher in ("auto", "ggn", "mc"), n, "fisher", "'auto', 'ggn' or 'mc'", self.fisher)
        check(self.prior_precision > 0, n, "prior_precision", "a number > 0", self.prior_precision)
        check(self.tune_prior in ("marglik", "none"), n, "tune_prior", "'marglik' or 'none'", self.tune_prior)
        check(isinstance(self.dataset_size, int) and self.dataset_size >= 0, n, "dataset_size", "an integer >= 0", self.dataset_size)
        check(self.predictive in ("probit", "mc"), n, "predictive", "'probit' or 'mc'", self.predictive)
        check(isinstance(self.n_samples, int) and self.n_samples > 0, n, "n_samples", "an integer > 0", self.n_samples)


# -- posterior blocks ---------------------------------------------------------------------------
class KronPosterior(nn.Module):
    """Precision ``G ⊗ A + τI`` of one (out × in) weight, from truncated eigendecompositions
    ``A ≈ V diag(a) Vᵀ`` (in × m_in) and ``G ≈ U diag(g) Uᵀ`` (out × m_out)."""

    def __init__(self, d_out: int, d_in: int, rank: int, device=None):
        super().__init__()
        m_out = min(d_out, rank) if rank else d_out
        m_in = min(d_in, rank) if rank else d_in
        kw = {"dtype": torch.float32, "device": device}
        self.register_buffer("out_vecs", torch.zeros(d_out, m_out, **kw))
        self.register_buffer("out_vals", torch.zeros(m_out, **kw))
        self.register_buffer("in_vecs", torch.zeros(d_in, m_in, **kw))
        self.register_buffer("in_vals", torch.zeros(m_in, **kw))

    def set_curvature(self, acc: _Accumulator) -> None:
        for name, mat in (("in", acc.a_sum / max(acc.a_count, 1)), ("out", acc.g_sum)):
            vals, vecs = torch.linalg.eigh(mat.double())
            m = getattr(self, f"{name}_vals").numel()
            vals, vecs = vals.flip(0)[:m], vecs.flip(1)[:, :m]  # largest first
            getattr(self, f"{name}_vals").copy_(vals.clamp_min(0))
            getattr(self, f"{name}_vecs").copy_(vecs)

    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of ``G ⊗ A`` in the kept directions (all others are 0)."""
        return torch.outer(self.out_vals.float(), self.in_vals.float()).reshape(-1)

    def function_cov(self, jac: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        """``J Σ Jᵀ`` for per-example, per-class Jacobians ``jac`` (C, B, out, in) and each
        prior precision in ``taus``: (T, B, C, C)."""
        # Σ = Σ_kl (u_k⊗v_l)(u_k⊗v_l)ᵀ/(λ_kl+τ) + (I - P_kept)/τ
        #   = I/τ - Σ_kl (u_k⊗v_l)(u_k⊗v_l)ᵀ λ_kl / (τ(λ_kl+τ))
        # Buffers may have been cast with the model (e.g. to bf16); compute in the Jacobian's dtype.
        u, v = self.out_vecs.to(jac.dtype), self.in_vecs.to(jac.dtype)
        jt = torch.einsum("ok,cboi,il->cbkl", u, jac, v)
        lam = torch.outer(self.out_vals, self.in_vals).to(jac.dtype)
        w = lam / (taus[:, None, None] * (lam + taus[:, None, None]))  # (T, mo, mi)
        full = torch.einsum("cboi,dboi->bcd", jac, jac)
        kept = torch.einsum("cbkl,dbkl,tkl->tbcd", jt, jt, w)
        return full[None] / taus[:, None, None, None] - kept


class DiagPosterior(nn.Module):
    """Precision ``diag(h) + τI`` of one (out × in) weight."""

    def __init__(self, d_out: int, d_in: int, rank: int = 0, device=None):
        super().__init__()
        self.register_buffer("hess", torch.zeros(d_out, d_in, dtype=torch.float32, device=device))

    def set_curvature(self, acc: _Accumulator) -> None:
        self.hess.copy_(acc.diag)

    def eigenvalues(self) -> torch.Tensor:
        return self.hess.float().reshape(-1)

    def function_cov(self, jac: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        inv = 1.0 / (self.hess.to(jac.dtype)[None] + taus[:, None, None])  # (T, out, in)
        return torch.einsum("cboi,dboi,toi->tbcd", jac, jac, inv)


class LaplaceLoraLayer(LoraLayer):
    """A :class:`LoraLayer` that also holds the posterior of its ``lora_A`` and ``lora_B``."""

    def __init__(self, base: nn.Module, config: LaplaceLoraConfig):
        super().__init__(base, config)
        d_in, d_out = targets.linear_dims(base)
        block = KronPosterior if config.hessian == "kfac" else DiagPosterior
        dev = base.weight.device
        self.laplace_A = block(config.rank, d_in, config.kfac_rank, device=dev)
        self.laplace_B = block(d_out, config.rank, config.kfac_rank, device=dev)
        # 0 = no posterior fitted yet.
        self.register_buffer("laplace_prior_precision", torch.zeros((), device=dev))

    def blocks(self) -> list[tuple[nn.Linear, KronPosterior | DiagPosterior]]:
        return [(self.lora_A, self.laplace_A), (self.lora_B, self.laplace_B)]


def laplace_layers(model: nn.Module) -> list[tuple[str, LaplaceLoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LaplaceLoraLayer)]


def _base(peft_model: nn.Module) -> nn.Module:
    return peft_model.base_model if hasattr(peft_model, "base_model") else peft_model


def _layers_or_fail(peft_model: nn.Module) -> list[LaplaceLoraLayer]:
    if getattr(peft_model, "merged", False):
        raise PeftError("laplace_lora: unmerge the adapter first; the posterior lives on the LoRA weights")
    layers = [m for _, m in laplace_layers(_base(peft_model))]
    if not layers:
        raise PeftError("laplace_lora: the model has no laplace_lora layers")
    return layers


# -- hooks: inputs and output-gradients of every LoRA Linear ------------------------------------
class _Tap:
    """Forward hooks keeping each module's input (detached) and output (in the graph)."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)
        self.inputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles: list[Any] = []

    def __enter__(self) -> _Tap:
        for i, m in enumerate(self.modules):
            def hook(_mod, args, out, i=i):
                self.inputs[i] = args[0].detach()
                self.outputs[i] = out
            self._handles.append(m.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()

    def output_grads(self, scalar: torch.Tensor) -> list[torch.Tensor]:
        if any(o is None or not o.requires_grad for o in self.outputs):
            raise PeftError("laplace_lora: a LoRA layer did not run or its weights do not require grad")
        grads = torch.autograd.grad(scalar, self.outputs, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(o) if g is None else g for o, g in zip(self.outputs, grads)]


def _per_example(t: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B, ..., d) -> (B, T, d)."""
    return t.reshape(batch_size, -1, t.shape[-1])


def _token_mask(batch: Mapping[str, torch.Tensor], b: int, t: int, device) -> torch.Tensor:
    am = batch.get("attention_mask")
    if isinstance(am, torch.Tensor) and tuple(am.shape) == (b, t):
        return am.to(device=device, dtype=torch.float32)
    return torch.ones(b, t, device=device)


class _Accumulator:
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
            per_example = torch.einsum("bto,bti->boi", g, a.float())
            self.diag = self.diag + per_example.square().sum(0)

    def scale(self, factor: float) -> None:
        if self.kind == "kfac":
            self.g_sum = self.g_sum * factor
        else:
            self.diag = self.diag * factor


def _prediction_logits(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, unit mask): ``(B, C)`` with every row a unit, or a causal LM's ``(B, T, V)``
    where position t predicts label t+1 and counts if that label exists."""
    if logits.ndim == 2:
        return logits, torch.ones(logits.shape[0], device=logits.device)
    if logits.ndim != 3:
        raise PeftError(f"laplace_lora: expected logits of shape (B, C) or (B, T, V), got {tuple(logits.shape)}")
    b, t, _ = logits.shape
    mask = torch.zeros(b, t, device=logits.device)
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and tuple(labels.shape) == (b, t):
        mask[:, :-1] = (labels[:, 1:] != -100).float().to(logits.device)
    else:
        mask[:, :-1] = _token_mask(batch, b, t, logits.device)[:, 1:]
    return logits, mask


def _model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    # The curvature and the predictive need no loss; drop labels so no head computes one.
    return {k: v for k, v in batch.items() if k != "labels"}


def _lora_params(layers: Sequence[LaplaceLoraLayer]) -> list[torch.Tensor]:
    return [lin.weight for layer in layers for lin, _ in layer.blocks()]


# -- fitting -----------------------------------------------------------------------------------
def fit_posterior(peft_model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> int:
    """Fill every layer's curvature from ``batches`` (the training data); returns the number of
    predictions seen. Does not touch the prior precision (see :func:`tune_prior_marglik`)."""
    cfg: LaplaceLoraConfig = peft_model.method.config
    layers = _layers_or_fail(peft_model)
    blocks = [(lin, post) for layer in layers for lin, post in layer.blocks()]
    accs = [_Accumulator(cfg.hessian) for _ in blocks]
    device = layers[0].lora_A.weight.device
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    seen = 0.0
    with eval_mode(peft_model), torch.enable_grad(), _Tap([lin for lin, _ in blocks]) as tap:
        for batch in batches:
            batch = to_device(batch, device)
            logits, units = _prediction_logits(peft_model(**_model_inputs(batch)).logits, batch)
            reduce = logits.ndim == 2
            bsz = logits.shape[0]
            inputs = [_per_example(a, bsz) for a in tap.inputs]
            for acc, a in zip(accs, inputs):
                acc.add_inputs(a, _token_mask(batch, bsz, a.shape[1], device), reduce)
            for v in _pseudo_residuals(logits.detach(), units, cfg.fisher, gen):
                grads = tap.output_grads((logits * v).sum())
                for acc, a, g in zip(accs, inputs, grads):
                    acc.add_grads(a, _per_example(g, bsz), reduce)
            seen += float(units.sum())
    if seen == 0:
        raise PeftError("laplace_lora.finalize: needs at least one batch of training data")
    factor = cfg.dataset_size / seen if cfg.dataset_size else 1.0
    with torch.no_grad():
        for acc, (_, post) in zip(accs, blocks):
            acc.scale(factor)
            post.set_curvature(acc)
    return int(seen)


def _pseudo_residuals(logits: torch.Tensor, units: torch.Tensor, fisher: str, gen: torch.Generator):
    """Vectors ``v`` with ``Σ_v J_vᵀ J_v`` = the GGN, or a one-sample Fisher; zero where
    ``units`` is 0. ``ggn``: per prediction, ``v_j = √μ_j q_j`` over the eigenpairs of the
    softmax Hessian ``diag(p) - ppᵀ`` except its null direction (the all-ones vector), so
    ``C - 1`` backward passes give it exactly (one for binary). ``mc``: ``v = p - e_y``,
    ``y ~ p``."""
    probs = logits.float().softmax(-1)
    n_cls = probs.shape[-1]
    w = units[..., None]
    if fisher == "ggn" or (fisher == "auto" and n_cls <= _GGN_MAX_CLASSES):
        hess = torch.diag_embed(probs) - probs[..., :, None] * probs[..., None, :]
        vals, vecs = torch.linalg.eigh(hess.double())  # ascending: [0] is the null direction
        for j in range(1, n_cls):
            v = vecs[..., :, j] * vals[..., j : j + 1].clamp_min(0).sqrt()
            yield (v.float() * w).to(logits.dtype)
    else:
        flat = probs.reshape(-1, n_cls)
        y = torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1])
        yield ((probs - F.one_hot(y, n_cls).to(probs.dtype)) * w).to(logits.dtype)


def log_marglik(peft_model: nn.Module, tau: float | torch.Tensor) -> torch.Tensor:
    """The Laplace log marginal likelihood as a function of the prior precision, up to terms
    that do not depend on it: ``-½ τ ‖θ‖² - ½ Σ log(1 + λ/τ)`` over the posterior's
    eigenvalues ``λ`` (the ``P/2 log τ`` of the prior cancels against the directions with no
    curvature)."""
    layers = _layers_or_fail(peft_model)
    tau = torch.as_tensor(tau, dtype=torch.float64)
    sq = sum(float(p.detach().double().square().sum()) for p in _lora_params(layers))
    lam = torch.cat([post.eigenvalues().double().cpu() for layer in layers for _, post in layer.blocks()])
    return -0.5 * tau * sq - 0.5 * torch.log1p(lam[None] / tau.reshape(-1, 1)).sum(-1).reshape(tau.shape)


def tune_prior_marglik(peft_model: nn.Module) -> float:
    """Set τ to the maximiser of :func:`log_marglik`: the root of
    ``Σ λ/(τ(λ+τ)) = ‖θ‖²`` (the left side falls monotonically in τ), by bisection on log τ."""
    layers = _layers_or_fail(peft_model)
    sq = sum(float(p.detach().double().square().sum()) for p in _lora_params(layers))
    lam = torch.cat([post.eigenvalues().double().cpu() for layer in layers for _, post in layer.blocks()])
    lam = lam[lam > 0]

    def excess(log_tau: float) -> float:
        t = math.exp(log_tau)
        return float((lam / (t * (lam + t))).sum()) - sq

    lo, hi = math.log(1e-8), math.log(1e12)
    if lam.numel() == 0 or sq == 0:
        tau = peft_model.method.config.prior_precision  # nothing to trade off; keep the configured one
    elif excess(hi) > 0 or excess(lo) < 0:
        tau = math.exp(hi if excess(hi) > 0 else lo)  # optimum outside the bracket: its edge
    else:
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
        tau = math.exp(0.5 * (lo + hi))
    set_prior_precision(peft_model, tau)
    return tau


def set_prior_precision(peft_model: nn.Module, tau: float) -> None:
    if not tau > 0:
        raise PeftError(f"laplace_lora: prior precision must be > 0, got {tau!r}")
    for layer in _layers_or_fail(peft_model):
        layer.laplace_prior_precision.fill_(tau)


def prior_precision(peft_model: nn.Module) -> float:
    """The fitted prior precision τ (0.0 before :meth:`LaplaceLora.finalize`)."""
    return float(_layers_or_fail(peft_model)[0].laplace_prior_precision)


# -- prediction --------------------------------------------------------------------------------
def linearised_moments(
    peft_model: nn.Module, batch: Mapping[str, torch.Tensor], taus: Sequence[float] | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(B, C)`` and covariance ``(T, B, C, C)`` of the linearised logits, one covariance
    per prior precision in ``taus`` (default: the fitted one). Classification logits only.

    For two classes only the margin ``f₁ - f₀`` matters to the softmax, so the moments are
    those of ``(0, f₁ - f₀)``: one backward pass instead of two, the same Monte-Carlo
    predictive, and the probit link becomes the usual binary one."""
    layers = _layers_or_fail(peft_model)
    device = layers[0].lora_A.weight.device
    if taus is None:
        tau = prior_precision(peft_model)
        if tau <= 0:
            raise PeftError("laplace_lora: no posterior fitted yet; call peft_model.finalize(train_batches)")
        taus = [tau]
    taus = torch.as_tensor(taus, dtype=torch.float32, device=device).reshape(-1)
    blocks = [(lin, post) for layer in layers for lin, post in layer.blocks()]
    batch = to_device(batch, device)
    with eval_mode(peft_model):
        with torch.enable_grad(), _Tap([lin for lin, _ in blocks]) as tap:
            logits = peft_model(**_model_inputs(batch)).logits
            if logits.ndim != 2:
                raise PeftError(
                    f"laplace_lora: the predictive needs classification logits (B, C), got {tuple(logits.shape)}"
                )
            bsz, n_cls = logits.shape
            inputs = [_per_example(a, bsz).float() for a in tap.inputs]
            outs = [logits[:, 1] - logits[:, 0]] if n_cls == 2 else list(logits.unbind(1))
            per_out = [tap.output_grads(o.sum()) for o in outs]
        cov = torch.zeros(len(taus), bsz, len(outs), len(outs), device=device)
        with torch.no_grad():
            for i, (_, post) in enumerate(blocks):
                jac = torch.stack(
                    [torch.einsum("bto,bti->boi", _per_example(g[i], bsz).float(), inputs[i]) for g in per_out]
                )
                cov += post.function_cov(jac, taus)
    mean = logits.detach().float()
    if n_cls == 2:
        mean = torch.stack([torch.zeros_like(mean[:, 0]), mean[:, 1] - mean[:, 0]], 1)
        cov = F.pad(cov, (1, 0, 1, 0))  # the reference logit is a constant 0
    return mean, cov


def probs_from_moments(
    mean: torch.Tensor, cov: torch.Tensor, link: str = "probit", n_samples: int = 100, seed: int = 0
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


def tune_prior_on_validation(
    peft_model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
    grid: Sequence[float] | None = None, link: str | None = None,
) -> float:
    """Set τ to the grid value with the lowest predictive NLL on labelled ``batches`` (one
    Jacobian pass; every τ of the grid is scored from it). Returns τ."""
    cfg: LaplaceLoraConfig = peft_model.method.config
    grid = torch.logspace(-4, 6, 41) if grid is None else torch.as_tensor(grid, dtype=torch.float32)
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


def calibration_metrics(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, mean NLL and expected calibration error of class probabilities ``(N, C)``:
    ``Σ_b (n_b / N) |acc_b - conf_b|`` over ``n_bins`` equal-width confidence bins
    ``((b-1)/n, b/n]`` (Guo et al. 2017)."""
    probs, labels = probs.detach().double().cpu(), labels.detach().long().cpu()
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise PeftError(f"calibration_metrics: probs (N, C) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += float(sel.double().mean()) * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    nll = float(-torch.log(probs.gather(1, labels[:, None]).clamp_min(1e-12)).mean())
    return {"accuracy": float(correct.mean()), "nll": nll, "ece": ece}


# -- the method --------------------------------------------------------------------------------
@register
class LaplaceLora(Lora):
    """LoRA whose ``finalize`` fits the posterior (curvature, then τ by marginal likelihood).
    The model's forward stays the MAP model; use :func:`predictive_probs` for the Bayesian
    predictive."""

    config_cls = LaplaceLoraConfig
    finalize_writes_params = False  # the posterior lives in buffers

    def inject(self, model: nn.Module) -> None:
        for name, module in targets.linear_targets(model, self.config.target_modules):
            targets.set_submodule(model, name, LaplaceLoraLayer(module, self.config))

    def extra_state_keys(self, model: nn.Module) -> list[str]:
        keys = []
        for name, layer in laplace_layers(model):
            keys.append(f"{name}.laplace_prior_precision")
            for sub in ("laplace_A", "laplace_B"):
                keys += [f"{name}.{sub}.{b}" for b, _ in getattr(layer, sub).named_buffers()]
        return keys

    def finalize(self, peft_model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        fit_posterior(peft_model, batches)
        if self.config.tune_prior == "marglik":
            tune_prior_marglik(peft_model)
        else:
            set_prior_precision(peft_model, self.config.prior_precision)


__all__ = [
    "LaplaceLora",
    "LaplaceLoraConfig",
    "LaplaceLoraLayer",
    "calibration_metrics",
    "fit_posterior",
    "linearised_moments",
    "log_marglik",
    "lora_layers",
    "predictive_probs",
    "probs_from_moments",
    "prior_precision",
    "set_prior_precision",
    "tune_prior_marglik",
    "tune_prior_on_validation",
]
