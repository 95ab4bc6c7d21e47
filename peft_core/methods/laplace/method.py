"""The registered ``laplace_lora`` method: LoRA training, then the posterior in ``finalize``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ... import targets
from ...registry import register
from ..lora import Lora
from .config import LaplaceLoraConfig
from .fit import fit_posterior
from .posterior import LaplaceLoraLayer, laplace_layers, set_prior_precision
from .prior import tune_prior_marglik


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

    def finalize(
        self, peft_model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
    ) -> None:
        fit_posterior(peft_model, batches)
        if self.config.tune_prior == "marglik":
            tune_prior_marglik(peft_model)
        else:
            set_prior_precision(peft_model, self.config.prior_precision)
