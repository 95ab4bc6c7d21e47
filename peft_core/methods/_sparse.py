"""Shared machinery of the selective methods: a trainable subset of existing weights.

A target weight ``W0`` (out × in) gets a fixed set of ``k`` positions ``idx`` (flat indices
into the row-major (out, in) matrix, whatever layout the module stores, so GPT-2's ``Conv1D``
and ``nn.Linear`` share one file format) and a trainable vector ``δ`` of ``k`` values. The
layer computes with ``W0 + scatter(idx, δ)``, a reparameterisation: only the ``k`` values are
parameters, so the optimizer keeps state for them alone, and no other entry can move.
Merging adds ``δ`` into ``W0`` at ``idx`` with the very same operation the forward uses.
The saved adapter holds, per target, ``<module>.sparse_idx`` (int32 when it fits) and
``<module>.sparse_delta``: a file size proportional to the budget.

The budget is a fraction of the base parameters of the targets (their weight matrices,
biases excluded); ``k = round(budget · n)`` is split across targets by a global selection, so
the fraction is met to within one entry however the sizes of the targets differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .. import targets
from ..config import MethodConfig, check
from ..errors import PeftError
from ..layers import MergeableLayer
from ..method import Method

IDX_SUFFIX = ".sparse_idx"
DELTA_SUFFIX = ".sparse_delta"


@dataclasses.dataclass
class SelectiveConfig(MethodConfig):
    """``budget``: the fraction of the targets' base weights that may change (0.005 = 0.5%)."""

    budget: float = 0.005

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.budget, float) and 0.0 < self.budget <= 1.0,
              self.name, "budget", "a fraction in (0, 1] of the target weights", self.budget)


def budget_count(total: int, budget: float) -> int:
    """How many entries a ``budget`` fraction of ``total`` weights allows (at least one)."""
    return max(1, min(total, round(budget * total)))


def _storage_index(module: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Flat (out, in) row-major indices -> flat indices into the weight as stored."""
    if not targets.is_conv1d(module):
        return idx
    d_in, d_out = targets.linear_dims(module)
    rows, cols = idx // d_in, idx % d_in
    return cols * d_out + rows  # Conv1D stores (in, out)


def weight_with(module: nn.Module, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``module.weight`` (in its stored layout) plus ``values`` at (out, in)-flat ``idx``.

    Differentiable in ``values`` (and in the weight if it requires grad); out of place.
    """
    w = module.weight
    flat = w.reshape(-1).index_add(0, _storage_index(module, idx), values.to(w.dtype))
    return flat.view_as(w)


def add_at(module: nn.Module, idx: torch.Tensor, values: torch.Tensor, sign: float) -> None:
    """In place ``W[idx] += sign · values`` (merge / unmerge)."""
    with torch.no_grad():
        w = module.weight
        w.view(-1).index_add_(0, _storage_index(module, idx), values.to(w.dtype), alpha=sign)


class SparseDeltaLayer(MergeableLayer):
    """A frozen linear-like ``base`` whose weight moves only at ``sparse_idx``.

    ``sparse_idx`` is a buffer of (out, in)-flat indices, sorted; ``sparse_delta`` the
    trainable values there. :meth:`set_indices` re-selects (and resets δ to zero).
    """

    def __init__(self, base: nn.Module, idx: torch.Tensor | None = None):
        super().__init__()
        self.base = base
        self.d_in, self.d_out = targets.linear_dims(base)
        w = base.weight
        self.register_buffer("sparse_idx", torch.zeros(0, dtype=torch.long, device=w.device))
        self._set_delta(torch.zeros(0, dtype=w.dtype, device=w.device))
        self.merged = False
        if idx is not None:
            self.set_indices(idx)

    @property
    def numel(self) -> int:
        return self.d_in * self.d_out

    def set_indices(self, idx: torch.Tensor) -> None:
        """Select the trainable entries (δ restarts at zero); the Parameter object is new,
        so call it before building the optimizer."""
        if self.merged:
            raise PeftError("cannot change the trainable entries of a merged layer; unmerge first")
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        idx = idx.unique(sorted=True).to(self.base.weight.device)  # unique() sorts too
        if idx.numel() and (idx[0] < 0 or idx[-1] >= self.numel):
            raise PeftError(
                f"sparse indices must lie in [0, {self.numel}) for a {self.d_out}x{self.d_in} "
                f"weight, got [{int(idx[0])}, {int(idx[-1])}]"
            )
        w = self.base.weight
        self.sparse_idx = idx
        self._set_delta(torch.zeros(idx.numel(), dtype=w.dtype, device=w.device))

    def _set_delta(self, values: torch.Tensor) -> None:
        if hasattr(self, "sparse_delta"):
            delattr(self, "sparse_delta")
        if values.numel():
            self.sparse_delta = nn.Parameter(values)
        else:
            # No entries, no parameter: a sharding runtime (ZeRO-3) cannot partition or
            # gather a 0-element parameter, and there is nothing to train or save.
            # It stays in the state dict (and the file), so every layer saves both keys.
            self.register_buffer("sparse_delta", values)

    def mask(self) -> torch.Tensor:
        """The binary mask as a dense (out, in) bool matrix."""
        m = torch.zeros(self.numel, dtype=torch.bool, device=self.sparse_idx.device)
        m[self.sparse_idx] = True
        return m.view(self.d_out, self.d_in)

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense (out, in) matrix."""
        d = torch.zeros(self.numel, dtype=self.sparse_delta.dtype, device=self.sparse_delta.device)
        return d.index_add(0, self.sparse_idx, self.sparse_delta).view(self.d_out, self.d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.sparse_idx.numel() == 0:
            return self.base(x)
        weight = weight_with(self.base, self.sparse_idx, self.sparse_delta)
        return targets.linear_forward(self.base, x, weight, self.base.bias)

    def peft_external_params(self) -> list[nn.Parameter]:
        # This forward reads the base weight itself (see partition.external_params).
        return [p for p in (self.base.weight, self.base.bias) if p is not None]

    def _fold(self, sign: float) -> None:
        add_at(self.base, self.sparse_idx, self.sparse_delta.detach(), sign)


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseDeltaLayer]]:
    return targets.modules_of_type(model, SparseDeltaLayer)


def target_weight_count(model: nn.Module, patterns) -> int:
    return sum(
        targets.linear_dims(m)[0] * targets.linear_dims(m)[1]
        for _, m in targets.linear_targets(model, patterns)
    )


def global_topk(scores: Iterable[torch.Tensor], k: int, *, largest: bool) -> list[torch.Tensor]:
    """The ``k`` best entries over all ``scores`` together, as sorted flat indices per tensor.

    One global selection (rather than ``k`` per matrix) is what makes the budget exact.
    ``scores`` may be a generator: the selection streams over it, keeping only the ``k``
    best candidates seen so far, so that scores can be computed one weight at a time
    (under ZeRO-3, a rank never needs more than one gathered weight).
    """
    best_v = torch.empty(0)
    best_t = torch.empty(0, dtype=torch.long)  # which tensor
    best_i = torch.empty(0, dtype=torch.long)  # flat index in it
    devices, total = [], 0
    for t, s in enumerate(scores):
        flat = s.detach().reshape(-1).float()
        devices.append(flat.device)
        total += flat.numel()
        m = min(k, flat.numel())
        if m <= 0:
            continue
        v, i = torch.topk(flat.cpu(), m, largest=largest, sorted=False)
        best_v = torch.cat([best_v, v])
        best_t = torch.cat([best_t, torch.full_like(i, t)])
        best_i = torch.cat([best_i, i])
        if best_v.numel() > k:
            keep = torch.topk(best_v, k, largest=largest, sorted=False).indices
            best_v, best_t, best_i = best_v[keep], best_t[keep], best_i[keep]
    if not 0 < k <= total:
        raise PeftError(f"cannot select {k} entries out of {total}")
    return [best_i[best_t == t].sort().values.to(dev) for t, dev in enumerate(devices)]


def encode_sparse(idx: torch.Tensor, numel: int) -> torch.Tensor:
    """Indices in the smallest integer type safetensors and torch both handle."""
    return idx.to(torch.int32) if numel < 2**31 else idx.to(torch.int64)


class SparseDeltaMethod(Method):
    """Base of the fixed-mask selective methods (``pafi``, ``sam``): wraps every target in a
    :class:`SparseDeltaLayer` and lets :meth:`select` choose the positions."""

    family = "selective"
    mergeable = True
    writes_base_weights = True

    def inject(self, model: nn.Module) -> None:
        found = targets.linear_targets(model, self.config.target_modules)
        for name, module in found:
            targets.set_submodule(model, name, SparseDeltaLayer(module).train(module.training))
        layers = [layer for _, layer in sparse_layers(model)]
        chosen = self.select(model, layers)
        if chosen is not None:
            for layer, idx in zip(layers, chosen):
                layer.set_indices(idx)

    def select(self, model: nn.Module, layers: list[SparseDeltaLayer]) -> list[torch.Tensor] | None:
        """Per-layer indices chosen at inject time, or None to leave the masks empty."""
        return None

    def budget_k(self, layers: Sequence[SparseDeltaLayer]) -> int:
        return budget_count(sum(layer.numel for layer in layers), self.config.budget)

    def expected_trainable_params(self, model: nn.Module) -> int:
        """What trains once the mask is chosen (at inject for PaFi, in ``prepare`` for SAM,
        whose count before ``prepare`` is the head alone): the budget over the target
        weights plus any new task head. Works on the base model or the adapted one."""
        layers = [layer for _, layer in sparse_layers(model)]
        n = (self.budget_k(layers) if layers else budget_count(
            target_weight_count(model, self.config.target_modules), self.config.budget))
        return n + self.head_params(model)

    def extra_state_keys(self, model: nn.Module) -> list[str]:
        # δ of a layer with no entries is an empty buffer, not a parameter (see _set_delta)
        return [f"{n}{IDX_SUFFIX}" for n, _ in sparse_layers(model)] + [
            f"{n}{DELTA_SUFFIX}"
            for n, layer in sparse_layers(model)
            if not isinstance(layer.sparse_delta, nn.Parameter)
        ]

    def encode_state(
        self, model: nn.Module, state: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        layers = dict(sparse_layers(model))
        out = dict(state)
        for name, layer in layers.items():
            key = f"{name}{IDX_SUFFIX}"
            out[key] = encode_sparse(state[key], layer.numel)
        return out

    def decode_state(
        self, model: nn.Module, state: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # A data-chosen mask (SAM) has per-layer sizes that a fresh inject cannot know:
        # take them, and the positions, from the file.
        out = dict(state)
        for name, layer in sparse_layers(model):
            key = f"{name}{IDX_SUFFIX}"
            if key not in state:
                continue  # load_adapter_state_dict reports the missing key
            idx = state[key].long().to(layer.sparse_idx.device)
            if not torch.equal(idx, layer.sparse_idx):
                layer.set_indices(idx)
                if not torch.equal(idx, layer.sparse_idx):
                    raise PeftError(f"{key}: indices must be sorted and unique")
            out[key] = idx
        return out
