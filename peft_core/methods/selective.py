"""The selective family: only a budgeted subset of the existing weights is fine-tuned.

- ``pafi`` (Liao et al. 2023): the ``k`` smallest-magnitude entries of the target matrices,
  chosen once at inject time from the base weights alone (task-agnostic).
- ``sam`` (Fu et al. 2023): the ``k`` entries with the largest second-order score, chosen in
  :meth:`Method.prepare` from a few training batches (see :func:`sam_scores`).
- ``diff_pruning`` (Guo et al. 2020): ``W = W0 + z ⊙ w`` with a dense ``w`` and a
  hard-concrete gate ``z`` per entry (Louizos et al. 2018); the expected L0 norm of the gates
  is the regulariser. After ``1 - fixed_mask_fraction`` of the training steps
  (:meth:`Method.on_step`) the update is projected onto the budget by magnitude and the
  rest of training re-trains only the kept entries with the mask fixed, the paper's second
  phase; :meth:`Method.finalize` projects (again, a no-op after the second phase).

``pafi`` and ``sam`` share :class:`._sparse.SparseDeltaLayer` (``W0 + scatter(idx, δ)``);
all three save the same sparse file format, ``<module>.sparse_idx`` + ``<module>.sparse_delta``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .. import partition, targets
from ..config import check
from ..errors import PeftError
from ..layers import MergeableLayer
from ..method import Method
from ..registry import register
from ._sparse import (
    DELTA_SUFFIX,
    IDX_SUFFIX,
    SelectiveConfig,
    SparseDeltaLayer,
    SparseDeltaMethod,
    budget_count,
    encode_sparse,
    global_topk,
    sparse_layers,
)
from ._util import eval_mode, to_device


# -- PaFi --------------------------------------------------------------------------------------
@dataclasses.dataclass
class PafiConfig(SelectiveConfig):
    """The ``budget`` fraction of smallest-magnitude target weights trains."""

    name = "pafi"


@register
class Pafi(SparseDeltaMethod):
    config_cls = PafiConfig

    def select(self, model: nn.Module, layers: list[SparseDeltaLayer]) -> list[torch.Tensor]:
        # One global ranking over all targets, as the paper ranks the whole model.
        return global_topk((_magnitude(layer) for layer in layers), self.budget_k(layers),
                           largest=False)


def _magnitude(layer: SparseDeltaLayer) -> torch.Tensor:
    # One target gathered at a time under ZeRO-3 (the generator above is consumed lazily).
    with partition.whole([layer.base.weight]):
        return targets.dense_weight(layer.base).abs().float().clone()


# -- SAM ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class SamConfig(SelectiveConfig):
    """The ``budget`` fraction of target weights with the largest accumulated squared
    gradient, scored on the batches given to ``prepare``."""

    name = "sam"


def sam_scores(
    peft_model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """SAM's score of every target entry, as an (out, in) float32 matrix per wrapped module.

    SAM approximates the loss after fine-tuning the entries in a mask by its second-order
    Taylor expansion; with a diagonal Hessian the best mask keeps the entries with the
    largest ``g_i² / h_ii``, and the paper replaces the curvature by a constant and the
    noisy gradient by one accumulated over several iterations. Here: ``Σ_b g_b²`` over the
    given batches, ``g_b`` the gradient of batch ``b``'s mean loss w.r.t. the base weights
    (the diagonal empirical Fisher over batches). The model runs in eval mode (no dropout),
    so the score is deterministic; it is scored at the current weights, δ included.
    """
    model = peft_model.base_model if hasattr(peft_model, "base_model") else peft_model
    layers = sparse_layers(model)
    if not layers:
        raise PeftError("sam: the model has no selective layers to score")
    weights = [layer.base.weight for _, layer in layers]
    scores = {
        n: torch.zeros(
            layer.d_out, layer.d_in, dtype=torch.float32, device=layer.base.weight.device
        )
        for n, layer in layers
    }
    device = weights[0].device
    for w in weights:
        w.requires_grad_(True)
    seen = 0
    try:
        with eval_mode(peft_model), torch.enable_grad():
            for i, batch in enumerate(batches):
                out = peft_model(**to_device(batch, device))
                loss = getattr(out, "loss", None)
                if loss is None:
                    raise PeftError(
                        f"sam.prepare: batch {i} gave no loss; each batch needs 'labels'"
                    )
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for (name, layer), g in zip(layers, grads):
                    if g is not None:
                        g = g.T if targets.is_conv1d(layer.base) else g
                        scores[name] += g.float().square()
                seen += 1
    finally:
        for w in weights:
            w.requires_grad_(False)
    if seen == 0:
        raise PeftError("sam.prepare: needs at least one training batch to score the weights")
    return scores


@register
class Sam(SparseDeltaMethod):
    """Until :meth:`prepare` runs, every mask is empty (nothing trains, the model is the base
    model); ``prepare`` scores the weights and fills them. ``param_groups`` refuses to build
    an optimizer over empty masks, so a forgotten ``prepare`` fails loudly."""

    config_cls = SamConfig

    def prepare(self, peft_model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        scores = sam_scores(peft_model, batches)
        layers = [layer for _, layer in sparse_layers(peft_model.base_model)]
        chosen = global_topk(list(scores.values()), self.budget_k(layers), largest=True)
        for layer, idx in zip(layers, chosen):
            layer.set_indices(idx)

    def param_groups(
        self, named_params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        if not any(n.endswith(DELTA_SUFFIX) and p.numel() for n, p in named_params):
            raise PeftError(
                "sam: no weights selected yet; call peft_model.prepare(batches) with a few "
                "training batches before building the optimizer"
            )
        return super().param_groups(named_params, lr, weight_decay)


# -- diff pruning ------------------------------------------------------------------------------
@dataclasses.dataclass
class DiffPruningConfig(SelectiveConfig):
    """``budget``: fraction of target entries kept by the final magnitude projection.
    ``l0_weight``: coefficient of the expected L0 norm as a fraction of the target entries
    (the paper's ``λ·E[L0]`` with ``λ = l0_weight / n``, so it does not depend on model size).
    The hard-concrete gate: stretch interval (``gate_lower``, ``gate_upper``),
    ``temperature`` β and initial ``init_log_alpha`` (positive: gates start open).
    ``fixed_mask_fraction``: the last fraction of the training steps is the paper's second
    phase: at its start the update is projected onto the budget and only the kept entries
    train on, with the mask fixed (0: one phase, projected at the end only).
    ``fixed_mask_lr_ratio``: how much faster the kept entries move in the second phase than
    w did in the first (the dense first phase needs full fine-tuning's small rate; a sparse
    update trains at a larger one, as PaFi's and SAM's do).
    ``gate_lr_ratio``: the gate logits' learning rate as a multiple of the run's (they move
    on a logit scale, the update ``w`` on the weights' scale); they get no weight decay.
    """

    name = "diff_pruning"
    l0_weight: float = 1.0
    gate_lower: float = -0.1
    gate_upper: float = 1.1
    temperature: float = 2.0 / 3.0
    init_log_alpha: float = 5.0
    fixed_mask_fraction: float = 0.3
    fixed_mask_lr_ratio: float = 1.0
    gate_lr_ratio: float = 1.0

    def validate(self) -> None:
        super().validate()
        n = self.name
        check(0 <= self.fixed_mask_fraction < 1, n, "fixed_mask_fraction", "a number in [0, 1)",
              self.fixed_mask_fraction)
        check(self.gate_lr_ratio > 0, n, "gate_lr_ratio", "a number > 0", self.gate_lr_ratio)
        check(self.fixed_mask_lr_ratio > 0, n, "fixed_mask_lr_ratio", "a number > 0",
              self.fixed_mask_lr_ratio)
        check(self.l0_weight >= 0, n, "l0_weight", "a number >= 0", self.l0_weight)
        check(self.gate_lower < 0, n, "gate_lower", "a number < 0", self.gate_lower)
        check(self.gate_upper > 1, n, "gate_upper", "a number > 1", self.gate_upper)
        check(self.temperature > 0, n, "temperature", "a number > 0", self.temperature)


# Gate logits that make the deterministic (and, in float32, every sampled) gate exactly 1 or 0.
_OPEN, _CLOSED = 30.0, -30.0


class DiffPruningLayer(MergeableLayer):
    """``W0 + z ⊙ w`` on a frozen linear-like ``base``; ``w`` and the gate logits are dense
    (out, in) parameters during training."""

    def __init__(self, base: nn.Module, config: DiffPruningConfig):
        super().__init__()
        self.base = base
        self.d_in, self.d_out = targets.linear_dims(base)
        w = base.weight
        # w = 0: the model starts as the base model; the gates still get the L0 gradient.
        self.dp_weight = nn.Parameter(
            torch.zeros(self.d_out, self.d_in, dtype=w.dtype, device=w.device)
        )
        self.dp_log_alpha = nn.Parameter(
            torch.full(
                (self.d_out, self.d_in), config.init_log_alpha, dtype=w.dtype, device=w.device
            )
        )
        self.lower, self.upper, self.beta = config.gate_lower, config.gate_upper, config.temperature
        self.merged = False
        self.pending_l0: torch.Tensor | None = None
        # The second phase's update is ``c + r·g ⊙ w``: g the projected ẑ at kept entries (0
        # elsewhere), r = fixed_mask_lr_ratio, c = (1 - r)·g ⊙ w_fix so that it starts at
        # exactly the projected update and moves r times as fast. g and c are frozen
        # parameters, not a rewrite of w or the logits: an optimizer holding master copies
        # of the trainable tensors (DeepSpeed) would overwrite such a rewrite at its next
        # step, and as parameters ZeRO-3 partitions them like w. They and the flag are in
        # the state dict, so a resumed run stays in its phase.
        self.lr_ratio = config.fixed_mask_lr_ratio
        self.dp_fixed_gate: nn.Parameter | None = None
        self.dp_fixed_offset: nn.Parameter | None = None
        if config.fixed_mask_fraction > 0:
            self.dp_fixed_gate, self.dp_fixed_offset = (
                nn.Parameter(
                    torch.zeros(self.d_out, self.d_in, dtype=w.dtype, device=w.device),
                    requires_grad=False,
                )
                for _ in range(2)
            )
        self.register_buffer("dp_mask_fixed", torch.zeros((), dtype=torch.bool, device=w.device))

    @property
    def numel(self) -> int:
        return self.d_in * self.d_out

    def gate(self, sample: bool | None = None) -> torch.Tensor:
        """Hard-concrete gate ``z ∈ [0, 1]``: sampled in training (reparameterised, so the
        logits get gradients), the deterministic test-time estimate otherwise."""
        sample = self.training if sample is None else sample
        la = self.dp_log_alpha
        if sample:
            eps = 1e-6
            u = torch.rand_like(la).clamp_(eps, 1 - eps)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / self.beta)
        else:
            s = torch.sigmoid(la)
        return (s * (self.upper - self.lower) + self.lower).clamp(0.0, 1.0)

    def expected_l0(self) -> torch.Tensor:
        """``Σ P(z ≠ 0)``, differentiable in the gate logits."""
        shift = self.beta * math.log(-self.lower / self.upper)
        return torch.sigmoid(self.dp_log_alpha - shift).sum()

    @property
    def fixed(self) -> bool:
        """In the second phase: the mask is fixed and only the kept entries of w train."""
        return bool(self.dp_mask_fixed)

    def delta_weight(self, sample: bool | None = None) -> torch.Tensor:
        if self.fixed:
            return self.dp_fixed_offset + self.lr_ratio * self.dp_fixed_gate * self.dp_weight
        return self.gate(sample) * self.dp_weight

    def fix_mask(self, idx: torch.Tensor) -> None:
        """Enter the second phase keeping the flat entries ``idx``: the update there stays
        what it is (ẑ ⊙ w, ẑ frozen), everywhere else it is zero; w keeps training."""
        with torch.no_grad(), partition.whole([self.dp_weight, self.dp_log_alpha]):
            gate = self.gate(sample=False).reshape(-1)
            w = self.dp_weight.detach().reshape(-1).clone()
        fixed = torch.zeros_like(gate)
        fixed[idx] = gate[idx]
        offset = (1.0 - self.lr_ratio) * fixed * w
        with torch.no_grad(), partition.whole(self.fixed_params(), modified=True):
            self.dp_fixed_gate.copy_(fixed.view(self.d_out, self.d_in))
            self.dp_fixed_offset.copy_(offset.view(self.d_out, self.d_in))
        self.dp_mask_fixed.fill_(True)

    def fixed_params(self) -> list[nn.Parameter]:
        """The second phase's frozen tensors (none when it is off)."""
        return [p for p in (self.dp_fixed_gate, self.dp_fixed_offset) if p is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.training and torch.is_grad_enabled():
            # Computed here, where ZeRO-3 has the gate logits gathered, and picked up by
            # DiffPruning.regularizer after the forward. In the second phase the logits no
            # longer act (the term is zero), but they stay in the graph with a zero
            # gradient: ZeRO's gradient reduction expects the same parameters every step.
            l0 = self.expected_l0()
            self.pending_l0 = l0 * 0.0 if self.fixed else l0
        delta = self.delta_weight()
        if targets.is_conv1d(self.base):
            delta = delta.T
        return targets.linear_forward(self.base, x, self.base.weight + delta, self.base.bias)

    def peft_external_params(self) -> list[nn.Parameter]:
        # This forward reads the base weight itself (see partition.external_params).
        return [p for p in (self.base.weight, self.base.bias) if p is not None]

    def take_l0(self) -> torch.Tensor:
        """The expected L0 of the last training forward (once), else computed now (zero in
        the second phase, where the gates no longer act)."""
        l0, self.pending_l0 = self.pending_l0, None
        if l0 is None:
            l0 = self.expected_l0()
            l0 = l0 * 0.0 if self.fixed else l0
        return l0

    def _fold(self, sign: float) -> None:
        with torch.no_grad():
            dense = targets.dense_weight(self.base)
            dense.add_(self.delta_weight(sample=False).to(dense.dtype), alpha=sign)


def _layer_params(layer: DiffPruningLayer) -> list[nn.Parameter]:
    return [layer.dp_weight, layer.dp_log_alpha, *layer.fixed_params()]


def diff_pruning_layers(model: nn.Module) -> list[tuple[str, DiffPruningLayer]]:
    return targets.modules_of_type(model, DiffPruningLayer)


@register
class DiffPruning(Method):
    """Training keeps a dense candidate update behind the gates; the saved file keeps only
    the entries whose deterministic update ``ẑ ⊙ w`` is non-zero, which after
    :meth:`finalize` are exactly the budget. Loading puts them back as ``w`` with gates
    fully open (and closed elsewhere), so the loaded model computes the same function.

    The paper's second phase (re-training the kept entries with the mask fixed) starts in
    :meth:`on_step` once ``1 - fixed_mask_fraction`` of the steps are done: the update is
    projected onto the budget exactly as in :meth:`finalize`, but by fixing each layer's
    mask (a frozen gate and a flag, see :class:`DiffPruningLayer`), not by rewriting the
    trainable tensors, which an optimizer's master copies would undo. A training loop that
    never calls ``on_step`` gets the one-phase method, projected in ``finalize``."""

    config_cls = DiffPruningConfig
    family = "selective"
    mergeable = True
    writes_base_weights = True

    def inject(self, model: nn.Module) -> None:
        for name, module in targets.linear_targets(model, self.config.target_modules):
            # A new module starts in training mode; follow the model's (gates sample only in
            # training).
            layer = DiffPruningLayer(module, self.config).train(module.training)
            targets.set_submodule(model, name, layer)

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        layers = [layer for _, layer in diff_pruning_layers(model)]
        if self.config.l0_weight == 0 or not layers:
            return None
        total = sum(layer.numel for layer in layers)
        return (
            self.config.l0_weight * torch.stack([layer.take_l0() for layer in layers]).sum() / total
        )

    def param_groups(
        self, named_params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        # Gate logits: their own rate and no decay (decay would pull every gate to half-open).
        gates = [p for n, p in named_params if n.endswith(".dp_log_alpha")]
        rest = [(n, p) for n, p in named_params if not n.endswith(".dp_log_alpha")]
        groups = super().param_groups(rest, lr, weight_decay)
        if gates:
            groups.append(
                {
                    "name": "gates",
                    "params": gates,
                    "lr": lr * self.config.gate_lr_ratio,
                    "weight_decay": 0.0,
                }
            )
        return groups

    def mask_fix_step(self, total_steps: int) -> int | None:
        """The first step of the second phase in a run of ``total_steps``, or None."""
        if self.config.fixed_mask_fraction == 0 or total_steps < 2:
            return None
        return min(total_steps - 1, round(total_steps * (1 - self.config.fixed_mask_fraction)))

    def on_step(self, peft_model: nn.Module, step: int, total_steps: int) -> None:
        start = self.mask_fix_step(total_steps)
        layers = [layer for _, layer in diff_pruning_layers(peft_model.base_model)]
        if start is None or step < start or not layers or all(layer.fixed for layer in layers):
            return
        keep = self._budget_indices(layers)
        for layer, idx in zip(layers, keep):
            layer.fix_mask(idx)

    def _budget_indices(self, layers: list[DiffPruningLayer]) -> list[torch.Tensor]:
        """The flat entries the projection keeps per layer (as :meth:`finalize` chooses
        them), with one layer's tensors gathered at a time under ZeRO-3 (the selection
        streams over them); for passes between training steps, where nothing is gathered."""
        k = budget_count(sum(layer.numel for layer in layers), self.config.budget)

        def deltas():
            for layer in layers:
                with torch.no_grad(), partition.whole(_layer_params(layer)):
                    yield layer.delta_weight(sample=False).abs().float().clone()

        nonzero = sum(int(torch.count_nonzero(d)) for d in deltas())
        if nonzero <= k:
            return [torch.nonzero(d.reshape(-1)).reshape(-1) for d in deltas()]
        return global_topk(deltas(), k, largest=True)

    def finalize(
        self, peft_model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
    ) -> None:
        """Project the update onto the budget: keep the ``k`` largest ``|ẑ ⊙ w|`` over all
        targets (fewer if fewer are non-zero), zero the rest, and pin the gates. After the
        second phase this keeps its mask and values and leaves the first-phase form (w at
        the kept entries, gates pinned open there and closed elsewhere) that files load as."""
        layers = [layer for _, layer in diff_pruning_layers(peft_model.base_model)]
        if any(layer.merged for layer in layers):
            raise PeftError("diff_pruning.finalize: unmerge the adapter before projecting it")
        # Under ZeRO-3 the training stage has gathered the trainable tensors around this
        # pass (a nested gather would release them early); the frozen fixed gate it has not.
        with torch.no_grad():
            deltas = []
            for layer in layers:
                with partition.whole(layer.fixed_params() if layer.fixed else []):
                    deltas.append(layer.delta_weight(sample=False))
            k = budget_count(sum(layer.numel for layer in layers), self.config.budget)
            nonzero = sum(int(torch.count_nonzero(d)) for d in deltas)
            if nonzero <= k:
                keep = [torch.nonzero(d.reshape(-1)).reshape(-1) for d in deltas]
            else:
                keep = global_topk([d.abs() for d in deltas], k, largest=True)
            for layer, delta, idx in zip(layers, deltas, keep):
                flat = delta.reshape(-1)
                w = torch.zeros_like(flat)
                w[idx] = flat[idx]
                la = torch.full_like(flat, _CLOSED)
                la[idx] = _OPEN
                layer.dp_weight.copy_(w.view_as(layer.dp_weight))
                layer.dp_log_alpha.copy_(la.view_as(layer.dp_log_alpha))
                layer.dp_mask_fixed.fill_(False)

    def density(self, model: nn.Module) -> float:
        """Fraction of target entries whose deterministic update is non-zero."""
        layers = [layer for _, layer in diff_pruning_layers(model)]
        nnz = 0
        with torch.no_grad():
            for layer in layers:
                with partition.whole(_layer_params(layer)):
                    nnz += int(torch.count_nonzero(layer.delta_weight(sample=False)))
        return nnz / sum(layer.numel for layer in layers)

    def encode_state(
        self, model: nn.Module, state: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        out = dict(state)
        for name, layer in diff_pruning_layers(model):
            w = out.pop(f"{name}.dp_weight")
            la = out.pop(f"{name}.dp_log_alpha")
            if layer.fixed:  # a checkpoint saved during the second phase
                with torch.no_grad(), partition.whole(layer.fixed_params()):
                    g, c = (p.detach().clone().to(w.device, w.dtype) for p in layer.fixed_params())
                delta = (c + layer.lr_ratio * g * w).reshape(-1)
            else:
                gate = (torch.sigmoid(la) * (layer.upper - layer.lower) + layer.lower).clamp(
                    0.0, 1.0
                )
                delta = (gate * w).reshape(-1)
            idx = torch.nonzero(delta).reshape(-1)
            out[f"{name}{IDX_SUFFIX}"] = encode_sparse(idx, layer.numel)
            out[f"{name}{DELTA_SUFFIX}"] = delta[idx].contiguous()
        return out

    def decode_state(
        self, model: nn.Module, state: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        out = dict(state)
        for name, layer in diff_pruning_layers(model):
            ikey, dkey = f"{name}{IDX_SUFFIX}", f"{name}{DELTA_SUFFIX}"
            if ikey not in out or dkey not in out:
                continue  # load_adapter_state_dict names the missing keys
            idx, values = out.pop(ikey).long(), out.pop(dkey)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= layer.numel):
                raise PeftError(
                    f"{ikey}: index out of range for a {layer.d_out}x{layer.d_in} weight"
                )
            w = torch.zeros(layer.numel, dtype=values.dtype)
            w[idx] = values
            la = torch.full((layer.numel,), _CLOSED, dtype=values.dtype)
            la[idx] = _OPEN
            out[f"{name}.dp_weight"] = w.view(layer.d_out, layer.d_in)
            out[f"{name}.dp_log_alpha"] = la.view(layer.d_out, layer.d_in)
        return out
