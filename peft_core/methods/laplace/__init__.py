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

One job a module, each using only those above it: ``config`` (the fields), ``posterior``
(the blocks the LoRA layers hold, the prior precision), ``taps`` (hooks reading inputs and
output gradients), ``fit`` (the curvature), ``predictive`` (linearised moments,
probabilities), ``prior`` (choosing τ), ``method`` (the registered method); ``metrics``
(calibration of any classifier) stands apart.
"""

from ..lora import lora_layers
from .config import LaplaceLoraConfig
from .fit import fit_posterior
from .method import LaplaceLora
from .metrics import calibration_metrics
from .posterior import (
    DiagPosterior,
    KronPosterior,
    LaplaceLoraLayer,
    laplace_layers,
    prior_precision,
    set_prior_precision,
)
from .predictive import linearised_moments, predictive_probs, probs_from_moments
from .prior import log_marglik, tune_prior_marglik, tune_prior_on_validation

__all__ = [
    "DiagPosterior",
    "KronPosterior",
    "LaplaceLora",
    "LaplaceLoraConfig",
    "LaplaceLoraLayer",
    "calibration_metrics",
    "fit_posterior",
    "laplace_layers",
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
