"""``vera``: vector-based random matrix adaptation (Kopiczko et al. 2024, arXiv 2310.11454).

One pair of frozen random matrices is shared by every wrapped layer; each layer trains only
two vectors, ``d`` (rank r) and ``b`` (its output size)::

    y = W x + b_vec ⊙ (B_s (d ⊙ (A_s x)))

As in Hugging Face peft, the shared pair has the largest (in, out) among the targets
(``A``: r × max_in, ``B``: max_out × r) and each layer uses its leading slice
``A[:, :in]``, ``B[:out, :]``, so layers of different shapes share one pair. Both are drawn
from ``projection_seed`` with kaiming-uniform (bound sqrt(6 / fan_in)) on a CPU generator,
A first then B, exactly as peft does, so the same seed gives peft's matrices.
``b`` starts at 0 (identity at init), ``d`` at ``d_initial``.

Stored or regenerated: by default (``save_projection: true``, peft's default too) A and B
are saved in the adapter file. They cost r·(max_in + max_out) numbers, small next to the
model, and make the adapter independent of the random generator's implementation: a
regenerated pair is only right while torch's CPU generator and ``uniform_`` keep producing
the same stream, which no library promises across versions. ``save_projection: false``
regenerates them from the seed at load (smaller files) and is exactly as safe as that.

The pair lives once on the model (``peft_vera``); layers reach it by reference, so it moves
and saves once. Mergeable: the update ``(b ⊙ B_s)(d ⊙ A_s)`` is a plain matrix.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import targets
from ..config import MethodConfig, check
from ..files import write_hf_folder
from ..layers import MergeableLayer
from ..method import Method
from ..registry import register
from . import _weights
from ._peft_export import head_state, modules_to_save
from .lora import hf_target_modules

SHARED = "peft_vera"


@dataclasses.dataclass
class VeraConfig(MethodConfig):
    """``rank`` r of the shared random matrices (peft's default 256), ``d_initial`` (d's
    starting value), ``projection_seed``, ``save_projection``, ``dropout`` on the input."""

    name = "vera"
    rank: int = 256
    d_initial: float = 0.1
    projection_seed: int = 0
    save_projection: bool = True
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.rank, int) and self.rank > 0, self.name, "rank", "an integer > 0",
              self.rank)
        check(isinstance(self.projection_seed, int), self.name, "projection_seed", "an integer",
              self.projection_seed)
        check(0 <= self.dropout < 1, self.name, "dropout", "a number in [0, 1)", self.dropout)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """kaiming-uniform with gain sqrt(2) over fan_in = shape[1], drawn from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def shared_projections(
    rank: int, max_in: int, max_out: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen (A, B) for ``seed``: A (rank, max_in) then B (max_out, rank), float32, CPU."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = _kaiming_uniform((rank, max_in), g)
    b = _kaiming_uniform((max_out, rank), g)
    return a, b


class VeraProjections(nn.Module):
    """The shared frozen pair; buffers, so they follow ``.to()`` and are not trained."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, *, persistent: bool):
        super().__init__()
        self.register_buffer("vera_A", a, persistent=persistent)
        self.register_buffer("vera_B", b, persistent=persistent)


class VeraLayer(MergeableLayer):
    """A frozen linear-like ``base`` plus ``b ⊙ B_s (d ⊙ A_s x)`` over the shared pair."""

    def __init__(self, base: nn.Module, shared: VeraProjections, config: VeraConfig):
        super().__init__()
        self.base = base
        # A tuple hides the shared module from this layer's children, so it is registered
        # (moved, saved) once, on the model.
        self._shared = (shared,)
        self.d_in, self.d_out = targets.linear_dims(base)
        dev, dtype = base.weight.device, _weights.adapter_dtype(base)
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.d_out, device=dev, dtype=dtype))
        self.vera_lambda_d = nn.Parameter(
            torch.full((config.rank,), config.d_initial, device=dev, dtype=dtype)
        )
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False

    def _slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self._shared[0]
        dtype = self.vera_lambda_d.dtype
        return shared.vera_A[:, : self.d_in].to(dtype), shared.vera_B[: self.d_out, :].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        a, b = self._slices()
        h = F.linear(self.dropout(x).to(a.dtype), a) * self.vera_lambda_d
        return y + (F.linear(h, b) * self.vera_lambda_b).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        a, b = self._slices()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)

    def _fold(self, sign: float) -> None:
        with torch.no_grad():
            _weights.add_to_weight(self.base, self.delta_weight(), sign, why="merging VeRA")


@register
class Vera(Method):
    config_cls = VeraConfig
    family = "reparameterisation"
    mergeable = True

    def inject(self, model: nn.Module) -> None:
        cfg = self.config
        found = targets.linear_targets(model, cfg.target_modules)
        dims = [targets.linear_dims(m) for _, m in found]
        a, b = shared_projections(
            cfg.rank, max(d for d, _ in dims), max(d for _, d in dims), cfg.projection_seed
        )
        dev = found[0][1].weight.device
        shared = VeraProjections(a.to(dev), b.to(dev), persistent=cfg.save_projection)
        model.add_module(SHARED, shared)
        for name, module in found:
            targets.set_submodule(model, name, VeraLayer(module, shared, cfg))

    def extra_state_keys(self, model: nn.Module) -> list[str]:
        return [f"{SHARED}.vera_A", f"{SHARED}.vera_B"] if self.config.save_projection else []

    def expected_trainable_params(self, model: nn.Module) -> int:
        """``out + r`` per wrapped layer (b and d), + the new task head."""
        outs = [layer.d_out for _, layer in targets.modules_of_type(model, VeraLayer)] or [
            targets.linear_dims(m)[1]
            for _, m in targets.linear_targets(model, self.config.target_modules)
        ]
        return sum(o + self.config.rank for o in outs) + self.head_params(model)

    def export_hf(self, peft_model: nn.Module, path: Path) -> dict[str, Any]:
        model = peft_model.base_model
        layers = targets.modules_of_type(model, VeraLayer)
        state: dict[str, torch.Tensor] = {}
        for name, layer in layers:
            state[f"base_model.model.{name}.vera_lambda_b"] = (
                layer.vera_lambda_b.detach().cpu().clone()
            )
            state[f"base_model.model.{name}.vera_lambda_d"] = (
                layer.vera_lambda_d.detach().cpu().clone()
            )
        if self.config.save_projection:
            shared = model.get_submodule(SHARED)
            state["base_model.vera_A"] = shared.vera_A.detach().cpu().clone()
            state["base_model.vera_B"] = shared.vera_B.detach().cpu().clone()
        heads, head_tensors = head_state(model, self.config.train_head)
        state.update(head_tensors)
        cfg = model.config
        hf_cfg = {
            "peft_type": "VERA",
            "task_type": "SEQ_CLS" if heads else "CAUSAL_LM",
            "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
            "r": self.config.rank,
            "target_modules": hf_target_modules(model, [n for n, _ in layers]),
            "projection_prng_key": self.config.projection_seed,
            "save_projection": self.config.save_projection,
            "vera_dropout": self.config.dropout,
            "d_initial": self.config.d_initial,
            "fan_in_fan_out": any(targets.is_conv1d(layer.base) for _, layer in layers),
            "bias": "none",
            "modules_to_save": modules_to_save(heads),
            "init_weights": True,
            "inference_mode": True,
        }
        write_hf_folder(path, hf_cfg, state)
        return hf_cfg
