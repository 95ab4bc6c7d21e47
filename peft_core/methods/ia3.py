"""``ia3``: (IA)³, learned rescaling vectors (Liu et al. 2022, arXiv 2205.05638).

Each wrapped linear layer gets one trained vector ``l``, initialised to ones (so the model
starts as the base). As in Hugging Face peft: on a *feed-forward* layer (the FFN's down
projection, whose input is the activated hidden layer) ``l`` scales the layer's input,
``y = W (l ⊙ x) + b``; on any other layer (keys, values) it scales the output,
``y = l ⊙ (W x + b)``.

Defaults per architecture (``peft_core.targets``): the key and value projections plus the
FFN's down projection, the latter as feed-forward. GPT-2 fuses q, k and v into ``c_attn``,
so there the whole fused output is rescaled (as peft does). ``target_modules`` and
``feedforward_modules`` (a subset of the targets) override them.

Mergeable: ``W ← W diag(l)`` for a feed-forward layer, ``W ← diag(l) W, b ← l ⊙ b``
otherwise; unmerge divides again (exact up to rounding; merging refuses a zero scale,
which could not be undone).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import targets
from ..config import MethodConfig
from ..errors import ConfigError, PeftError
from ..files import write_hf_folder
from ..layers import MergeableLayer
from ..method import Method
from ..registry import register
from . import _weights
from ._peft_export import head_state, modules_to_save


@dataclasses.dataclass
class IA3Config(MethodConfig):
    """``target_modules`` (default: keys, values, FFN down projection) and
    ``feedforward_modules`` (which of them scale their input; default: the FFN down
    projections among the targets). Both take suffixes or a ``re:`` / regex string."""

    name = "ia3"
    feedforward_modules: list[str] | str | None = None

    def validate(self) -> None:
        super().validate()
        ff = self.feedforward_modules
        if ff is not None and not isinstance(ff, str) and (
            not isinstance(ff, (list, tuple)) or not all(isinstance(t, str) for t in ff)
        ):
            raise ConfigError(
                f"{self.name}.feedforward_modules: expected a list of module-name suffixes "
                f"or one regular expression, got {ff!r}"
            )


class IA3Layer(MergeableLayer):
    """A frozen linear-like ``base`` whose input (``feedforward``) or output is rescaled."""

    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__()
        self.base = base
        self.feedforward = feedforward
        d_in, d_out = targets.linear_dims(base)
        self.ia3_l = nn.Parameter(
            torch.ones(
                d_in if feedforward else d_out,
                device=base.weight.device,
                dtype=_weights.adapter_dtype(base),
            )
        )
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.feedforward:
            return self.base((x.to(self.ia3_l.dtype) * self.ia3_l).to(x.dtype))
        y = self.base(x)
        return (y.to(self.ia3_l.dtype) * self.ia3_l).to(y.dtype)

    def _fold(self, sign: float) -> None:
        with torch.no_grad():
            scale = self.ia3_l.float()
            if sign > 0 and bool((scale == 0).any()):
                raise PeftError(
                    "ia3: a scale is exactly 0, so merging could not be undone; refusing"
                )
            if sign < 0:
                scale = 1.0 / scale
            w = _weights.read_weight(self.base).float()
            new = w * scale[None, :] if self.feedforward else w * scale[:, None]
            _weights.write_weight(self.base, new, why="merging IA3")
            bias = getattr(self.base, "bias", None)
            if not self.feedforward and bias is not None:
                bias.mul_(scale.to(bias.dtype))


def _default_patterns(model: nn.Module) -> tuple[list[str], list[str]]:
    """Regexes for the default targets and their feed-forward subset, from the block table."""
    arch = targets.architecture(model)
    if not arch.attn_kv:
        raise ConfigError(
            "ia3: this architecture has no default key/value projections; pass target_modules"
        )
    ff = [f"re:{arch.blocks}\\.{re.escape(arch.ffn_out)}"]
    kv = [f"re:{arch.blocks}\\.{re.escape(p)}" for p in arch.attn_kv]
    return kv + ff, ff


@register
class IA3(Method):
    config_cls = IA3Config
    family = "rescaling"
    mergeable = True

    def _plan(self, model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
        cfg = self.config
        if cfg.target_modules is None or cfg.feedforward_modules is None:
            default_targets, default_ff = _default_patterns(model)
        found = targets.linear_targets(
            model, cfg.target_modules if cfg.target_modules is not None else default_targets
        )
        if cfg.feedforward_modules is None:
            ff_pats, kind = default_ff, None
        else:
            ff_pats, kind = cfg.feedforward_modules, "feed-forward linear module"
        if kind is None:  # defaults: the FFN down projections among the targets, if any
            ff = {n for n, _ in found if any(re.fullmatch(p[3:], n) for p in ff_pats)}
        else:
            ff = {
                n
                for n, _ in targets.match_modules(
                    model, ff_pats, kind=kind, predicate=targets.is_linear_like
                )
            }
            outside = sorted(ff - {n for n, _ in found})
            if outside:
                raise ConfigError(
                    f"ia3.feedforward_modules: {outside[:4]} are not among the target modules; "
                    "feed-forward modules must be a subset of target_modules"
                )
        return [(n, m, n in ff) for n, m in found]

    def inject(self, model: nn.Module) -> None:
        for name, module, ff in self._plan(model):
            targets.set_submodule(model, name, IA3Layer(module, ff))

    def expected_trainable_params(self, model: nn.Module) -> int:
        """One scale per input (feed-forward layers) or output unit of each target, + the head."""
        wrapped = targets.modules_of_type(model, IA3Layer)
        if wrapped:
            total = sum(layer.ia3_l.numel() for _, layer in wrapped)
        else:
            total = sum(targets.linear_dims(m)[0 if ff else 1] for _, m, ff in self._plan(model))
        return total + self.head_params(model)

    def export_hf(self, peft_model: nn.Module, path: Path) -> dict[str, Any]:
        model = peft_model.base_model
        layers = targets.modules_of_type(model, IA3Layer)
        state: dict[str, torch.Tensor] = {}
        for name, layer in layers:
            # peft's shapes: (1, in) for feed-forward layers, (out, 1) otherwise.
            v = layer.ia3_l.detach().cpu().clone()
            state[f"base_model.model.{name}.ia3_l"] = (
                v[None, :] if layer.feedforward else v[:, None]
            )
        heads, head_tensors = head_state(model, self.config.train_head)
        state.update(head_tensors)
        wrapped = [n for n, _ in layers]
        ff = [n for n, layer in layers if layer.feedforward]
        cfg = model.config
        hf_cfg = {
            "peft_type": "IA3",
            "task_type": "SEQ_CLS" if heads else "CAUSAL_LM",
            "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
            "target_modules": _exact_regex(wrapped),
            "feedforward_modules": _exact_regex(ff) if ff else [],
            "fan_in_fan_out": any(targets.is_conv1d(layer.base) for _, layer in layers),
            "modules_to_save": modules_to_save(heads),
            "init_ia3_weights": True,
            "inference_mode": True,
        }
        write_hf_folder(path, hf_cfg, state)
        return hf_cfg


def _exact_regex(names: list[str]) -> str:
    """A regex matching exactly ``names`` (peft full-matches a string ``target_modules``);
    leaf names could select more than the wrapped set (BERT's ``output.dense``)."""
    return "^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"
