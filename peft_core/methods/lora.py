"""The LoRA family: ``lora``, ``lora_plus`` and ``moslora``.

LoRA (Hu et al. 2021) adds ``(alpha/r) B A x`` beside a frozen linear map, B zero-initialised
so training starts from the base model.

``init`` chooses the starting A, B: ``kaiming`` (the default, and Hugging Face peft's default
``init_lora_weights=True``: A kaiming-uniform with a=sqrt(5), B = 0), ``gaussian`` (A ~ N(0, 1/r),
B = 0), or the two that start from the base weight's principal directions and rewrite the
base to the residual ``W_res = W - s·B0 A0`` so the output is unchanged at init: ``pissa``
(Meng et al. 2024, arXiv 2404.02948: the top-r singular triplets, ``B0 = U_r sqrt(S_r/s)``,
``A0 = sqrt(S_r/s) V_rᵀ``) and ``olora`` (Büyükakyüz 2024, arXiv 2406.01775: the first r
columns of Q and rows of R of ``W = QR``).
Because the base is rewritten, an adapter with those inits also stores ``lora_A0``/``lora_B0``
(the initial factors). Loading onto a fresh, unmodified base recomputes the residual from
them (not from a new SVD, whose signs could differ on another machine or library build), and
the Hugging Face export converts to a plain rank-2r LoRA on the *original* weight:
``s(BA - B0A0) = (2α/2r)[B | -B0][A ; A0]`` (what peft's ``save_pretrained(...,
path_initial_model_for_weight_conversion=...)`` writes), so peft/vLLM load it onto the
untouched base. LoRA+ (Hayou et al. 2024) trains B with a learning
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
from ..errors import PeftError
from ..files import write_hf_folder
from ..layers import MergeableLayer
from ..method import Method
from ..registry import register
from . import _weights
from ._peft_export import head_state, modules_to_save

LORA_INITS = ("kaiming", "gaussian", "pissa", "olora")
#: inits that start from the base weight and rewrite it to the residual
REWRITING_INITS = ("pissa", "olora")


@dataclasses.dataclass
class LoraConfig(MethodConfig):
    """``rank`` r, ``alpha`` (scale alpha/r, or alpha/sqrt(r) with ``use_rslora``), ``dropout``
    on the adapter's input."""

    name = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"

    #: methods whose save/load/export handle a base rewritten by ``pissa``/``olora``
    _REWRITING_INIT_METHODS = ("lora", "lora_plus", "moslora", "dora")

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.rank, int) and self.rank > 0, self.name, "rank", "an integer > 0",
              self.rank)
        check(self.alpha > 0, self.name, "alpha", "a number > 0", self.alpha)
        check(0 <= self.dropout < 1, self.name, "dropout", "a number in [0, 1)", self.dropout)
        check(self.init in LORA_INITS, self.name, "init", f"one of {LORA_INITS}", self.init)
        if self.init in REWRITING_INITS:
            check(self.name in self._REWRITING_INIT_METHODS, self.name, "init",
                  f"kaiming or gaussian ({self.init} is available for "
                  f"{self._REWRITING_INIT_METHODS})", self.init)

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
        check(self.mixer_init in allowed, self.name, "mixer_init", f"one of {allowed}",
              self.mixer_init)
        if self.init in REWRITING_INITS:
            # B M A only equals B0 A0 at init when M starts as the identity.
            check(self.mixer_init == "identity", self.name, "mixer_init",
                  f"identity with init {self.init!r}", self.mixer_init)


class LoraLayer(MergeableLayer):
    """A frozen linear-like ``base`` (``nn.Linear`` or GPT-2 ``Conv1D``) plus a low-rank update."""

    def __init__(self, base: nn.Module, config: LoraConfig, mixer: str | None = None):
        super().__init__()
        self.base = base
        d_in, d_out = targets.linear_dims(base)
        dev, dtype = base.weight.device, _weights.adapter_dtype(base)
        self.lora_A = nn.Linear(d_in, config.rank, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(config.rank, d_out, bias=False, device=dev, dtype=dtype)
        self.scaling = config.scaling
        self.init = config.init
        self._init_factors(config)
        self.lora_M: nn.Linear | None = None
        if mixer is not None:
            self.lora_M = nn.Linear(config.rank, config.rank, bias=False, device=dev, dtype=dtype)
            if mixer == "kaiming":
                nn.init.kaiming_uniform_(self.lora_M.weight, a=math.sqrt(5))
            elif mixer == "orthogonal":
                nn.init.orthogonal_(self.lora_M.weight)
            else:
                nn.init.eye_(self.lora_M.weight)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False

    def _init_factors(self, config: LoraConfig) -> None:
        a, b = self.lora_A.weight, self.lora_B.weight
        with torch.no_grad():
            if config.init == "kaiming":
                # The paper's reference code and peft's default: A ~ kaiming-uniform, B = 0.
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)
            elif config.init == "gaussian":
                nn.init.normal_(a, std=1 / config.rank)
                nn.init.zeros_(b)
            else:
                # Every rank computes the same factors from the same whole weight, so the
                # rewritten residual agrees across ranks (rank 0's is kept under ZeRO-3).
                with _weights.whole(self.base, modified=True):
                    a0, b0 = principal_factors(
                        _weights.read_weight(self.base), config.rank, self.scaling, config.init
                    )
                    a.copy_(a0)
                    b.copy_(b0)
                    self.register_buffer("lora_A0", a.detach().clone())
                    self.register_buffer("lora_B0", b.detach().clone())
                    self._rewrite_residual(a0, b0, previous=None)

    def set_initial_factors(
        self, a0: torch.Tensor, b0: torch.Tensor, previous: tuple[torch.Tensor, torch.Tensor] | None
    ) -> None:
        """Make the base the residual ``W - s·B0 A0`` for these initial factors.

        ``previous`` are the factors the base currently has subtracted (None: the base is
        still the original weight).
        """
        with _weights.whole(self.base, modified=True):
            self._rewrite_residual(a0, b0, previous)

    def _rewrite_residual(
        self, a0: torch.Tensor, b0: torch.Tensor, previous: tuple[torch.Tensor, torch.Tensor] | None
    ) -> None:
        # The caller holds the weight whole (ZeRO-3 gathers must not nest).
        why = f"LoRA init {self.init!r} rewrites the base weight to its residual"
        delta = self.scaling * (b0.float() @ a0.float())
        if previous is not None:
            delta = delta - self.scaling * (previous[1].float() @ previous[0].float())
        _weights.add_to_weight(self.base, delta, -1.0, why=why)
        with torch.no_grad():
            self.lora_A0.copy_(a0)
            self.lora_B0.copy_(b0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.lora_update(self.dropout(x)).to(y.dtype)

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """``s · B (M) A x`` in the adapter's dtype (float32 on a quantized base)."""
        h = self.lora_A(x.to(self.lora_A.weight.dtype))
        if self.lora_M is not None:
            h = self.lora_M(h)
        return self.lora_B(h) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B (M) A`` as an (out, in) matrix."""
        a = self.lora_A.weight
        if self.lora_M is not None:
            a = self.lora_M.weight @ a
        return (self.lora_B.weight @ a) * self.scaling

    def _fold(self, sign: float) -> None:
        with torch.no_grad():
            _weights.add_to_weight(self.base, self.delta_weight(), sign, why="merging LoRA")


def principal_factors(
    w: torch.Tensor, rank: int, scaling: float, init: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's or OLoRA's (A0, B0) for the (out, in) weight ``w``, with ``s·B0 A0`` the part of
    ``w`` they take over. Computed in float32, as the papers (and peft) do."""
    w = w.detach().float()
    if rank > min(w.shape):
        raise PeftError(
            f"LoRA init {init!r}: rank {rank} exceeds the weight's smaller side {tuple(w.shape)}"
        )
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(s[:rank] / scaling)
        return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
    q, r = torch.linalg.qr(w)
    # OLoRA takes the factors as they are; W_res absorbs the scale so W_res + s·B0A0 = W.
    return r[:rank].contiguous(), q[:, :rank].contiguous()


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """Every LoRA layer (DoRA's and Laplace-LoRA's too) of ``model``, by name."""
    return targets.modules_of_type(model, LoraLayer)


@register
class Lora(Method):
    config_cls = LoraConfig
    family = "reparameterisation"
    mergeable = True
    _mixer: str | None = None

    layer_cls: type[LoraLayer] = LoraLayer

    def inject(self, model: nn.Module) -> None:
        for name, module in targets.linear_targets(model, self.config.target_modules):
            targets.set_submodule(model, name, self.layer_cls(module, self.config, self._mixer))

    def extra_state_keys(self, model: nn.Module) -> list[str]:
        if self.config.init not in REWRITING_INITS:
            return []
        return [f"{n}.{b}" for n, _ in lora_layers(model) for b in ("lora_A0", "lora_B0")]

    def decode_state(
        self, model: nn.Module, state: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # A PiSSA/OLoRA adapter carries the initial factors its base residual was built from;
        # make this model's residual the saved one (this inject's SVD may differ in sign).
        if self.config.init in REWRITING_INITS:
            for name, layer in lora_layers(model):
                a0, b0 = state.get(f"{name}.lora_A0"), state.get(f"{name}.lora_B0")
                if a0 is not None and b0 is not None:
                    layer.set_initial_factors(
                        a0.to(layer.lora_A0),
                        b0.to(layer.lora_B0),
                        previous=(layer.lora_A0.clone(), layer.lora_B0.clone()),
                    )
        return state

    def expected_trainable_params(self, model: nn.Module) -> int:
        """``r·(in + out)`` per wrapped layer (+ ``r²`` for MoSLoRA's mixer) + the new task
        head; works on the base model or the adapted one."""
        r = self.config.rank
        per_mixer = r * r if self._mixer is not None else 0
        total = sum(
            r * (d_in + d_out) + per_mixer
            for d_in, d_out in target_dims(model, self.config.target_modules)
        )
        return total + self.head_params(model)

    def export_hf(self, peft_model: nn.Module, path: Path) -> dict[str, Any]:
        hf_cfg, state = self.hf_adapter(peft_model)
        write_hf_folder(path, hf_cfg, state)
        return hf_cfg

    def hf_adapter(self, peft_model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """peft's LORA ``adapter_config`` and state dict for this adapter."""
        model = peft_model.base_model
        layers = lora_layers(model)
        rewritten = self.config.init in REWRITING_INITS
        state: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, layer in layers:
                a = layer.lora_A.weight
                if layer.lora_M is not None:
                    a = layer.lora_M.weight @ a  # B M A == B (M A): the mixer folds into A exactly
                b = layer.lora_B.weight
                if rewritten:
                    # Relative to the original weight: s(BA - B0A0) = s [B | -B0] [A ; A0].
                    a = torch.cat([a, layer.lora_A0], dim=0)
                    b = torch.cat([b, -layer.lora_B0], dim=1)
                state[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().clone()
                state[f"base_model.model.{name}.lora_B.weight"] = b.detach().cpu().clone()
        heads, head_tensors = head_state(model, self.config.train_head)
        state.update(head_tensors)
        cfg = model.config
        # A converted PiSSA/OLoRA adapter has rank 2r; alpha changes so the scale stays s.
        factor = 2 if rewritten else 1
        alpha = self.config.alpha * (math.sqrt(factor) if self.config.use_rslora else factor)
        hf_cfg = {
            "peft_type": "LORA",
            "task_type": "SEQ_CLS"
            if heads
            else ("CAUSAL_LM" if not cfg.is_encoder_decoder else None),
            "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
            "r": self.config.rank * factor,
            "lora_alpha": alpha,
            "lora_dropout": self.config.dropout,
            "use_rslora": self.config.use_rslora,
            "target_modules": hf_target_modules(model, [n for n, _ in layers]),
            "fan_in_fan_out": any(targets.is_conv1d(layer.base) for _, layer in layers),
            "bias": "none",
            "modules_to_save": modules_to_save(heads),
            "init_lora_weights": True,
            "inference_mode": True,
        }
        return hf_cfg, state


def target_dims(model: nn.Module, patterns: list[str] | str | None) -> list[tuple[int, int]]:
    """(in, out) of each layer a LoRA-family method wraps (or has wrapped) in ``model``."""
    wrapped = lora_layers(model)
    if wrapped:
        return [targets.linear_dims(layer.base) for _, layer in wrapped]
    return [targets.linear_dims(m) for _, m in targets.linear_targets(model, patterns)]


def hf_target_modules(model: nn.Module, wrapped: list[str]) -> list[str] | str:
    """Leaf names when they select exactly the wrapped modules (the form most tools expect),
    otherwise an exact regex (e.g. BERT's ``dense`` would also catch the pooler)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    by_leaf = {
        n
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in leaves
        and (targets.is_linear_like(m) or isinstance(m, LoraLayer))
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
