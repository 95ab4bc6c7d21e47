"""The LoRA family: ``lora``, ``lora_plus`` and ``moslora``.

LoRA (Hu et al. 2021) adds ``(alpha/r) B A x`` beside a frozen linear map, B zero-initialised
so training starts from the base model. LoRA+ (Hayou et al. 2024) trains B with a learning
rate λ times A's. MoSLoRA (Wu et al. 2024) puts a trainable r×r mixer between them: ``B M A``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import targets
from ..config import MethodConfig, check
from ..io import write_hf_folder
from ..layers import MergeableLayer
from ..method import Method
from ..registry import register


@dataclasses.dataclass
class LoraConfig(MethodConfig):
    """``rank`` r, ``alpha`` (scale alpha/r, or alpha/sqrt(r) with ``use_rslora``), ``dropout``
    on the adapter's input."""

    name = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.rank, int) and self.rank > 0, self.name, "rank", "an integer > 0", self.rank)
        check(self.alpha > 0, self.name, "alpha", "a number > 0", self.alpha)
        check(0 <= self.dropout < 1, self.name, "dropout", "a number in [0, 1)", self.dropout)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclasses.dataclass
class LoraPlusConfig(LoraConfig):
    """LoRA with B's learning rate ``lr_ratio`` (λ) times A's."""

    name = "lora_plus"
    lr_ratio: float = 16.0

    def validate(self) -> None:
        super().validate()
        check(self.lr_ratio > 0, self.name, "lr_ratio", "a number > 0", self.lr_ratio)


@dataclasses.dataclass
class MosLoraConfig(LoraConfig):
    """LoRA with a trainable r×r mixer; ``mixer_init`` is ``kaiming`` or ``orthogonal``
    (the paper's two choices) or ``identity`` (then it starts as plain LoRA)."""

    name = "moslora"
    mixer_init: str = "kaiming"

    def validate(self) -> None:
        super().validate()
        allowed = ("kaiming", "orthogonal", "identity")
        check(self.mixer_init in allowed, self.name, "mixer_init", f"one of {allowed}", self.mixer_init)


class LoraLayer(MergeableLayer):
    """A frozen linear-like ``base`` (``nn.Linear`` or GPT-2 ``Conv1D``) plus a low-rank update."""

    def __init__(self, base: nn.Module, config: LoraConfig, mixer: str | None = None):
        super().__init__()
        self.base = base
        d_in, d_out = targets.linear_dims(base)
        w = base.weight
        self.lora_A = nn.Linear(d_in, config.rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(config.rank, d_out, bias=False, device=w.device, dtype=w.dtype)
        # Same init as the paper's reference code: A ~ kaiming-uniform, B = 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_M: nn.Linear | None = None
        if mixer is not None:
            self.lora_M = nn.Linear(config.rank, config.rank, bias=False, device=w.device, dtype=w.dtype)
            if mixer == "kaiming":
                nn.init.kaiming_uniform_(self.lora_M.weight, a=math.sqrt(5))
            elif mixer == "orthogonal":
                nn.init.orthogonal_(self.lora_M.weight)
            else:
                nn.init.eye_(self.lora_M.weight)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        h = self.lora_A(self.dropout(x))
        if self.lora_M is not None:
            h = self.lora_M(h)
        return y + self.lora_B(h) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B (M) A`` as an (out, in) matrix."""
        a = self.lora_A.weight
        if self.lora_M is not None:
            a = self.lora_M.weight @ a
        return (self.lora_B.weight @ a) * self.scaling

    def _fold(self, sign: float) -> None:
        with torch.no_grad():
            targets.dense_weight(self.base).add_(self.delta_weight().to(self.base.weight.dtype), alpha=sign)


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@register
class Lora(Method):
    config_cls = LoraConfig
    family = "reparameterisation"
    mergeable = True
    _mixer: str | None = None

    def inject(self, model: nn.Module) -> None:
        for name, module in targets.linear_targets(model, self.config.target_modules):
            targets.set_submodule(model, name, LoraLayer(module, self.config, self._mixer))

    def export_hf(self, peft_model: nn.Module, path: Path) -> dict[str, Any]:
        model = peft_model.base_model
        layers = lora_layers(model)
        state: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, layer in layers:
                a = layer.lora_A.weight
                if layer.lora_M is not None:
                    a = layer.lora_M.weight @ a  # B M A == B (M A): the mixer folds into A exactly
                state[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().clone()
                state[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().clone()
        heads = [h for h in targets.new_task_heads(model) if self.config.train_head]
        for head in heads:
            for pname, p in model.get_submodule(head).named_parameters():
                state[f"base_model.model.{head}.{pname}"] = p.detach().cpu().clone()
        cfg = model.config
        hf_cfg = {
            "peft_type": "LORA",
            "task_type": "SEQ_CLS" if heads else ("CAUSAL_LM" if not cfg.is_encoder_decoder else None),
            "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "use_rslora": self.config.use_rslora,
            "target_modules": _hf_target_modules(model, [n for n, _ in layers]),
            "fan_in_fan_out": any(targets.is_conv1d(layer.base) for _, layer in layers),
            "bias": "none",
            "modules_to_save": [h.rsplit(".", 1)[-1] for h in heads] or None,
            "init_lora_weights": True,
            "inference_mode": True,
        }
        write_hf_folder(path, hf_cfg, state)
        return hf_cfg


def _hf_target_modules(model: nn.Module, wrapped: list[str]) -> list[str] | str:
    """Leaf names when they select exactly the wrapped modules (the form most tools expect),
    otherwise an exact regex (e.g. BERT's ``dense`` would also catch the pooler)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    by_leaf = {
        n for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in leaves and (targets.is_linear_like(m) or isinstance(m, LoraLayer))
    }
    if by_leaf == set(wrapped):
        return leaves
    return "^(?:" + "|".join(re.escape(n) for n in sorted(wrapped)) + ")$"


@register
class LoraPlus(Lora):
    config_cls = LoraPlusConfig

    def param_groups(
        self, named_params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        fast = [(n, p) for n, p in named_params if ".lora_B." in n]
        slow = [(n, p) for n, p in named_params if ".lora_B." not in n]
        groups = super().param_groups(slow, lr, weight_decay)
        for g in super().param_groups(fast, lr * self.config.lr_ratio, weight_decay):
            groups.append({**g, "name": f"lora_B_{g['name']}"})
        return groups


@register
class MosLora(Lora):
    config_cls = MosLoraConfig

    @property
    def _mixer(self) -> str:  # type: ignore[override]
        return self.config.mixer_init
