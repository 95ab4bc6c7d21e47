"""Bottleneck adapters: ``adapter_houlsby``, ``adapter_pfeiffer`` and ``adapter_parallel``.

A bottleneck ``A(h) = W_up σ(W_down h + b_down) + b_up`` with ``W_up = 0`` and ``b_up = 0``
at initialisation, so every adapted model starts as exactly the base model.

- Serial (Houlsby et al. 2019; Pfeiffer et al. 2020): the sublayer output ``h`` (before the
  block's residual add) becomes ``h + A(h)``. Houlsby adapts the attention and the
  feed-forward (FFN) sublayer of every block, Pfeiffer only the FFN.
- Parallel (He et al. 2021): the sublayer's output gets ``s · A(x)`` added, where ``x`` is the
  sublayer's *input*; beside the FFN, and with ``attention: true`` beside attention too.

Where the sublayers start and end comes from :data:`peft_core.targets.ARCHITECTURES`
(``attn``/``ffn``: the module whose input is the sublayer input; ``attn_out``/``ffn_out``:
the module whose output is the sublayer output), so Llama-style, GPT-2 and BERT blocks all
work from one table. Serial adapters wrap the ``*_out`` module. Parallel adapters also wrap
it, and a forward pre-hook on the ``attn``/``ffn`` module hands it the sublayer input
(in BERT the two are not nested, so no single module sees both).

Adapters live outside the base weights, so ``merge()`` raises ``NotMergeableError`` (the
:class:`~peft_core.method.Method` default). Sizes come from ``model.config.hidden_size``,
never from weight shapes, so injection works on ZeRO-3-partitioned models too.

Trainable parameters (:meth:`BottleneckMethod.expected_trainable_params`), with ``L`` adapted
blocks, hidden size ``d`` and bottleneck ``r`` (``bottleneck``, or ``d // reduction_factor``)::

    per adapter  P = 2·d·r + r + d            (W_down, b_down, W_up, b_up)
    houlsby      2·L·P
    pfeiffer     L·P
    parallel     L·P, or 2·L·P with attention: true
    coda         L·(P + d)                    (the router is a d-vector, see coda.py)
    + the parameters of the norms inside the adapted blocks if train_layer_norms
    + the new task head (classifier) if train_head
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .. import targets
from ..config import MethodConfig, check
from ..errors import PeftError, TargetError
from ..method import Method
from ..registry import register

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


# -- configs -----------------------------------------------------------------------------------
@dataclasses.dataclass
class BottleneckConfig(MethodConfig):
    """Shared by every bottleneck adapter.

    ``bottleneck``: the size r (0 means ``hidden_size // reduction_factor``);
    ``activation``: one of :data:`ACTIVATIONS`; ``train_layer_norms``: also train the norms
    of the adapted blocks (as Houlsby et al. do). ``target_modules``, if given, selects the
    adapted *blocks* by name (suffixes or a regex, e.g. ``"model\\.layers\\.(10|11)"``);
    ``None`` adapts every block.
    """

    bottleneck: int = 0
    reduction_factor: float = 16.0
    activation: str = "relu"
    train_layer_norms: bool = False

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.bottleneck, int) and self.bottleneck >= 0, self.name, "bottleneck",
              "an integer >= 0 (0: use reduction_factor)", self.bottleneck)
        check(self.reduction_factor > 0, self.name, "reduction_factor", "a number > 0",
              self.reduction_factor)
        check(self.activation in ACTIVATIONS, self.name, "activation",
              f"one of {sorted(ACTIVATIONS)}", self.activation)

    def size(self, hidden: int) -> int:
        """The bottleneck size r for a model of width ``hidden``."""
        return self.bottleneck or max(1, int(hidden // self.reduction_factor))


@dataclasses.dataclass
class HoulsbyConfig(BottleneckConfig):
    """Serial adapters after the attention and after the FFN of every block; the paper also
    trains the layer norms, so ``train_layer_norms`` defaults to true here."""

    name = "adapter_houlsby"
    train_layer_norms: bool = True


@dataclasses.dataclass
class PfeifferConfig(BottleneckConfig):
    """One serial adapter after the FFN of every block."""

    name = "adapter_pfeiffer"


@dataclasses.dataclass
class ParallelConfig(BottleneckConfig):
    """A bottleneck beside the FFN (and beside attention with ``attention``), its output
    scaled by ``scaling``.

    He et al. use 4, at their learning rate; ``s`` multiplies the adapter's effective rate
    (Adam moves ``W_up`` by about lr per step whatever ``s`` is), so at the rates the serial
    adapters train at the default is 1. Measured on MiniLM at lr 3e-3 (one AdamW step, the
    relative change of the final [CLS] state): serial Houlsby 0.12, parallel s=4 0.32-0.34,
    s=1 0.08-0.09; with s=4 one benchmark seed of three collapsed to chance (eval loss ln 2).
    """

    name = "adapter_parallel"
    scaling: float = 1.0
    attention: bool = False

    def validate(self) -> None:
        super().validate()
        check(self.scaling > 0, self.name, "scaling", "a number > 0", self.scaling)


# -- modules -----------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """``W_up σ(W_down x + b_down) + b_up``, zero at initialisation (``W_up = b_up = 0``)."""

    def __init__(self, hidden: int, size: int, activation: str, like: torch.Tensor | None = None):
        super().__init__()
        kw: dict[str, Any] = {} if like is None else {"device": like.device, "dtype": like.dtype}
        self.down = nn.Linear(hidden, size, **kw)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, hidden, **kw)
        # W_down keeps nn.Linear's kaiming-uniform init so gradients reach W_up from step one;
        # W_up = 0 makes the adapter an exact no-op at the start.
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class SerialAdapter(nn.Module):
    """``h = base(...)`` followed by ``h + A(h)``: a serial adapter on a sublayer's output."""

    def __init__(self, base: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base(*args, **kwargs)
        return h + self.adapter(h)


class ParallelAdapter(nn.Module):
    """``base(...) + s · A(x)`` where ``x`` is the sublayer input, handed over by
    :meth:`capture` (a forward pre-hook on the module that receives the sublayer input)."""

    def __init__(self, base: nn.Module, adapter: Bottleneck, scaling: float, where: str):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.scaling = scaling
        self.where = where
        self._sublayer_input: torch.Tensor | None = None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._sublayer_input = sublayer_input(args, kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = self._sublayer_input
        if x is None:
            raise PeftError(
                f"parallel adapter at {self.where}: its sublayer's input was not seen; call the "
                "whole block (the adapter reads the sublayer input from its first module)"
            )
        # Consumed once: a stale input must never be reused by a later, unrelated call.
        self._sublayer_input = None
        return self.base(*args, **kwargs) + self.scaling * self.adapter(x)


def sublayer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a sublayer module was called with (first positional argument or the
    ``hidden_states`` keyword, which is how Llama calls its attention)."""
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
    if not isinstance(x, torch.Tensor):
        raise PeftError(
            f"adapter: expected the sublayer to get hidden states, got {type(x).__name__}"
        )
    return x


# -- placement ---------------------------------------------------------------------------------
def hidden_size(model: nn.Module) -> int:
    """The model width, from its config (weights may be partitioned under ZeRO-3)."""
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(d, int) or d <= 0:
        raise TargetError(
            f"{type(model).__name__}: config.hidden_size is missing; adapters need it"
        )
    return d


def adapted_blocks(model: nn.Module, config: MethodConfig) -> list[tuple[str, nn.Module]]:
    """The transformer blocks to adapt: all of them, or those ``target_modules`` names."""
    found = targets.blocks(model)
    if config.target_modules is None:
        return found
    ids = {id(m) for _, m in found}
    chosen = targets.match_modules(
        model, config.target_modules, kind="transformer block", predicate=lambda m: id(m) in ids
    )
    return chosen


def like_param(module: nn.Module) -> torch.Tensor | None:
    """A parameter of ``module`` whose device and dtype new adapter weights should copy
    (a floating one: a quantized base's packed weights are uint8)."""
    return next((p for p in module.parameters() if p.is_floating_point()), None)


def norm_modules(block: nn.Module) -> list[nn.Module]:
    """LayerNorm / RMSNorm modules inside ``block`` (by type name: RMSNorm classes vary)."""
    return [m for m in block.modules() if "norm" in type(m).__name__.lower()]


def unfreeze_norms(blocks: list[tuple[str, nn.Module]]) -> None:
    for _, block in blocks:
        for norm in norm_modules(block):
            norm.requires_grad_(True)


def adapter_params(hidden: int, size: int) -> int:
    """Parameters of one :class:`Bottleneck`: ``2·d·r + r + d``."""
    return 2 * hidden * size + size + hidden


class BottleneckMethod(Method):
    """Common ground of the bottleneck adapters: placement, layer norms, parameter count."""

    family = "additive"

    def sites(self) -> int:
        """Bottleneck adapters per adapted block."""
        raise NotImplementedError

    def extra_per_block(self, hidden: int) -> int:
        """Trainable parameters per block beyond the adapters (CoDA's router)."""
        return 0

    def inject(self, model: nn.Module) -> None:
        blocks = adapted_blocks(model, self.config)
        d = hidden_size(model)
        r = self.config.size(d)
        for name, block in blocks:
            self.adapt_block(model, name, block, d, r)
        if self.config.train_layer_norms:
            unfreeze_norms(blocks)

    def adapt_block(self, model: nn.Module, name: str, block: nn.Module, d: int, r: int) -> None:
        raise NotImplementedError

    def expected_trainable_params(self, model: nn.Module) -> int:
        """The trainable-parameter count :func:`peft_core.apply` will report for ``model``,
        from the formula in this module's docstring (works on the base model or the adapted
        one, and under ZeRO-3)."""
        blocks = adapted_blocks(model, self.config)
        d = hidden_size(model)
        per_block = self.sites() * adapter_params(d, self.config.size(d)) + self.extra_per_block(d)
        total = len(blocks) * per_block
        if self.config.train_layer_norms:
            total += sum(
                targets.numel(p) for _, b in blocks for n in norm_modules(b) for p in n.parameters()
            )
        total += self.head_params(model)
        return total


def _sublayer(block: nn.Module, block_name: str, path: str) -> nn.Module:
    try:
        return block.get_submodule(path)
    except AttributeError:
        raise TargetError(
            f"block {block_name!r} ({type(block).__name__}) has no sub-module {path!r}; "
            "the architecture table in peft_core/targets.py does not fit this model"
        ) from None


def add_serial(
    block_name: str, block: nn.Module, out_path: str, d: int, r: int, activation: str
) -> None:
    base = _sublayer(block, block_name, out_path)
    wrapper = SerialAdapter(base, Bottleneck(d, r, activation, like_param(base)))
    targets.set_submodule(block, out_path, wrapper.train(base.training))


def add_parallel(
    block_name: str,
    block: nn.Module,
    in_path: str,
    out_path: str,
    d: int,
    r: int,
    activation: str,
    scaling: float,
) -> None:
    first = _sublayer(block, block_name, in_path)
    base = _sublayer(block, block_name, out_path)
    wrapper = ParallelAdapter(
        base, Bottleneck(d, r, activation, like_param(base)), scaling, f"{block_name}.{out_path}"
    )
    targets.set_submodule(block, out_path, wrapper.train(base.training))
    first.register_forward_pre_hook(wrapper.capture, with_kwargs=True)


# -- methods -----------------------------------------------------------------------------------
@register
class AdapterHoulsby(BottleneckMethod):
    config_cls = HoulsbyConfig

    def sites(self) -> int:
        return 2

    def adapt_block(self, model: nn.Module, name: str, block: nn.Module, d: int, r: int) -> None:
        arch = targets.architecture(model)
        for out_path in (arch.attn_out, arch.ffn_out):
            add_serial(name, block, out_path, d, r, self.config.activation)


@register
class AdapterPfeiffer(BottleneckMethod):
    config_cls = PfeifferConfig

    def sites(self) -> int:
        return 1

    def adapt_block(self, model: nn.Module, name: str, block: nn.Module, d: int, r: int) -> None:
        add_serial(name, block, targets.architecture(model).ffn_out, d, r, self.config.activation)


@register
class AdapterParallel(BottleneckMethod):
    config_cls = ParallelConfig

    def sites(self) -> int:
        return 2 if self.config.attention else 1

    def adapt_block(self, model: nn.Module, name: str, block: nn.Module, d: int, r: int) -> None:
        arch = targets.architecture(model)
        spans = [(arch.ffn, arch.ffn_out)] + (
            [(arch.attn, arch.attn_out)] if self.config.attention else []
        )
        for in_path, out_path in spans:
            add_parallel(
                name, block, in_path, out_path, d, r, self.config.activation, self.config.scaling
            )
