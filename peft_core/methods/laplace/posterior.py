"""Where the posterior lives: a Gaussian block per ``lora_A`` / ``lora_B`` weight, held by
the LoRA layer as buffers (so it saves with the adapter), and the fitted prior precision."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from ... import targets
from ...errors import PeftError
from ..lora import LoraLayer
from .config import LaplaceLoraConfig


class Curvature(Protocol):
    """Summed curvature of one LoRA ``Linear`` (what :mod:`.fit` accumulates)."""

    a_sum: torch.Tensor
    a_count: float
    g_sum: torch.Tensor
    diag: torch.Tensor


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

    def set_curvature(self, acc: Curvature) -> None:
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
        # Buffers may have been cast with the model (e.g. to bf16); compute in the Jacobian's
        # dtype.
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

    def set_curvature(self, acc: Curvature) -> None:
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
    return targets.modules_of_type(model, LaplaceLoraLayer)


def layers_or_fail(peft_model: nn.Module) -> list[LaplaceLoraLayer]:
    """The ``laplace_lora`` layers of an unmerged model (a PeftModel or its base)."""
    if getattr(peft_model, "merged", False):
        raise PeftError("laplace_lora: unmerge the adapter first; the posterior lives on the "
                        "LoRA weights")
    base = peft_model.base_model if hasattr(peft_model, "base_model") else peft_model
    layers = [m for _, m in laplace_layers(base)]
    if not layers:
        raise PeftError("laplace_lora: the model has no laplace_lora layers")
    return layers


def lora_params(layers: Sequence[LaplaceLoraLayer]) -> list[torch.Tensor]:
    return [lin.weight for layer in layers for lin, _ in layer.blocks()]


def set_prior_precision(peft_model: nn.Module, tau: float) -> None:
    if not tau > 0:
        raise PeftError(f"laplace_lora: prior precision must be > 0, got {tau!r}")
    for layer in layers_or_fail(peft_model):
        layer.laplace_prior_precision.fill_(tau)


def prior_precision(peft_model: nn.Module) -> float:
    """The fitted prior precision τ (0.0 before :meth:`LaplaceLora.finalize`)."""
    return float(layers_or_fail(peft_model)[0].laplace_prior_precision)
