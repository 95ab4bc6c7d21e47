"""``dora``: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

The adapted weight is split into a trained magnitude ``m`` (one value per output unit) and a
direction that LoRA updates::

    W' = m ⊙ (W0 + s·B A) / ||W0 + s·B A||_row        (||·|| over each output row)

``m`` starts as ``||W0||_row`` and B at 0, so the model starts as the base. As in the paper
(§4.3) and Hugging Face peft, the norm is treated as a constant in the backward pass (it is
detached), which saves the memory of its graph; the forward stays exact::

    y = W0 x + b + (k - 1)·(W0 x) + k·s·B A x,     k = m / ||W0 + s·B A||  (detached)

computed from the base layer's own output, so the base matmul runs once. The norm needs the
whole base weight every step (read through :mod:`._weights`, dequantized on a 4-bit base:
QDoRA). ``merge`` folds ``k`` into the weight exactly; ``unmerge`` divides it out again with
the norm remembered from the merge. Exports to peft's LORA folder with ``use_dora: true``.

Everything else (targets, ``init``, ranks, export of A and B) is LoRA's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from . import _weights
from .lora import Lora, LoraConfig, LoraLayer, lora_layers, target_dims


@dataclasses.dataclass
class DoraConfig(LoraConfig):
    """LoRA's fields; the magnitude vector is always trained."""

    name = "dora"


class DoraLayer(LoraLayer):
    """A :class:`LoraLayer` with a trained per-output-unit magnitude ``lora_magnitude``."""

    def __init__(self, base: nn.Module, config: DoraConfig, mixer: str | None = None):
        super().__init__(base, config, mixer)
        with torch.no_grad(), _weights.whole(base):
            norm = self._weight_norm()
        self.lora_magnitude = nn.Parameter(norm.to(self.lora_A.weight.dtype))
        self._merge_norm: torch.Tensor | None = None

    def peft_external_params(self) -> list[nn.Parameter]:
        """The forward reads the whole base weight (for the norm): ZeRO-3 must gather it."""
        return [self.base.weight]

    def _weight_norm(self) -> torch.Tensor:
        """``||W0 + s·B A||`` per output row, without gradient (the paper's constant)."""
        w = _weights.read_weight(self.base).detach().to(self.lora_A.weight.dtype)
        return torch.linalg.norm(w + self.delta_weight().detach(), dim=1).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        dtype = self.lora_A.weight.dtype
        k = self.lora_magnitude / self._weight_norm()
        if isinstance(self.dropout, nn.Identity) or not self.training:
            xd = x
            base_out = y.to(dtype)
            bias = getattr(self.base, "bias", None)
            if bias is not None:
                base_out = base_out - bias.to(dtype)
        else:
            # Dropout applies to the adapter's input, so the direction term needs W0 on the
            # same dropped input rather than the base output.
            xd = self.dropout(x)
            base_out = F.linear(xd.to(dtype), _weights.read_weight(self.base).to(dtype))
        return y + ((k - 1) * base_out + k * self.lora_update(xd)).to(y.dtype)

    def _fold(self, sign: float) -> None:
        with torch.no_grad():
            delta = self.delta_weight().float()
            w = _weights.read_weight(self.base).float()
            m = self.lora_magnitude.float()
            if sign > 0:
                norm = torch.linalg.norm(w + delta, dim=1)
                self._merge_norm = norm
                new = (m / norm)[:, None] * (w + delta)
            else:
                if self._merge_norm is None:
                    raise RuntimeError("DoRA layer unmerged without a recorded merge")
                new = w / (m / self._merge_norm)[:, None] - delta
                self._merge_norm = None
            _weights.write_weight(self.base, new, why="merging DoRA")


@register
class Dora(Lora):
    config_cls = DoraConfig
    layer_cls = DoraLayer

    def expected_trainable_params(self, model: nn.Module) -> int:
        """LoRA's count plus one magnitude per output unit of every wrapped layer."""
        extra = sum(d_out for _, d_out in target_dims(model, self.config.target_modules))
        return super().expected_trainable_params(model) + extra

    def hf_adapter(self, peft_model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        # A PiSSA/OLoRA-converted LoRA gives the same W0 + s·BA, so m carries over unchanged.
        hf_cfg, state = super().hf_adapter(peft_model)
        for name, layer in lora_layers(peft_model.base_model):
            key = f"base_model.model.{name}.lora_magnitude_vector"
            state[key] = layer.lora_magnitude.detach().cpu().clone()
        return {**hf_cfg, "use_dora": True}, state
