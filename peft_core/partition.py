"""Whole values of parameters that a sharding runtime keeps partitioned (DeepSpeed ZeRO-3).

Under ZeRO-3 a base model can be built already partitioned: each rank holds a slice of
every weight and ``p.data`` reads as an empty tensor outside the forward of the module that
owns it. The few places of peft_core that read or rewrite base weights outside such a
forward (the fingerprint, PaFi's |W|, an initialisation from the vocabulary, untying a head)
go through :func:`whole`, which gathers only the parameters named, for as long as needed.

peft_core imports no DeepSpeed: the gathering itself is supplied by whoever partitioned the
model, once per process, with :func:`use_gatherer` (the training stage passes
``deepspeed.zero.GatheredParameters``). A partitioned parameter met without a gatherer is a
clear error, never a silent read of an empty tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .errors import PeftError

#: ``gatherer(params, modifier_rank) -> context manager``: DeepSpeed's GatheredParameters
#: signature. Process-wide, like a logging handler: it names the runtime, not a run's state.
Gatherer = Callable[..., contextlib.AbstractContextManager]
_gatherer: Gatherer | None = None


def use_gatherer(gatherer: Gatherer | None) -> None:
    """Set how partitioned parameters are gathered (``None`` removes it)."""
    global _gatherer
    _gatherer = gatherer


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (it carries its full shape as ``ds_shape``)."""
    return hasattr(p, "ds_id") and hasattr(p, "ds_shape")


def any_partitioned(module: nn.Module) -> bool:
    return any(is_partitioned(p) for p in module.parameters())


@contextlib.contextmanager
def whole(params: Iterable[torch.Tensor], *, modified: bool = False) -> Iterator[None]:
    """Inside the block every parameter in ``params`` holds its whole value.

    ``modified``: the block writes to them; every rank must compute the same values, and
    rank 0's are the ones kept (broadcast on exit). A no-op for unpartitioned parameters.
    """
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    if _gatherer is None:
        raise PeftError(
            "the base model's weights are partitioned (ZeRO-3) and this method needs them "
            "whole; call peft_core.partition.use_gatherer(deepspeed.zero.GatheredParameters) "
            "first (the training stage does)"
        )
    with _gatherer(params, modifier_rank=0 if modified else None):
        yield


@contextlib.contextmanager
def gathered_forward(model: nn.Module) -> Iterator[None]:
    """Forward passes through ``model`` (no gradients) work on partitioned weights: each
    module's own parameters are gathered for its forward only, as ZeRO-3's engine does.

    For injection-time passes (e.g. an initialisation from token activations), which run
    before any training engine exists. Memory: one module's weights at a time.
    """
    if not any_partitioned(model):
        yield
        return
    open_: dict[int, contextlib.ExitStack] = {}

    def pre(module: nn.Module, args: Any) -> None:
        own = [p for p in module.parameters(recurse=False) if is_partitioned(p)]
        if own:
            stack = contextlib.ExitStack()
            stack.enter_context(whole(own))
            open_[id(module)] = stack

    def post(module: nn.Module, args: Any, output: Any) -> None:
        stack = open_.pop(id(module), None)
        if stack is not None:
            stack.close()

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        with torch.no_grad():
            yield
    finally:
        for h in handles:
            h.remove()
        for stack in open_.values():
            stack.close()


def external_params(module: nn.Module) -> list[nn.Parameter]:
    """Parameters that ``module``'s own forward reads although another module owns them.

    Layers that compute with a wrapped base weight directly (selective methods) declare
    them with a ``peft_external_params()`` method, so that a ZeRO-3 runtime gathers them
    for that forward (DeepSpeed: ``deepspeed.zero.register_external_parameter``).
    """
    fn = getattr(module, "peft_external_params", None)
    return list(fn()) if callable(fn) else []
