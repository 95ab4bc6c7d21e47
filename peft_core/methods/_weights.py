"""Reading and rewriting a wrapped layer's whole base weight, whatever stores it.

Methods that need the base matrix itself (DoRA's column norm, PiSSA/OLoRA's factorisation,
merging) go through these few functions only, so that the ways a weight can be stored
(a plain tensor, GPT-2's transposed ``Conv1D``, a bitsandbytes 4-bit or 8-bit parameter,
a ZeRO-3 partition) are handled in one place. Outside a forward, callers hold the weight
whole with :func:`whole`; inside one, a layer declares it with ``peft_external_params`` so
the ZeRO-3 runtime gathers it (:mod:`peft_core.partition`).

bitsandbytes is only imported when a quantized layer is actually met, so peft_core keeps
working without it.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import partition, targets
from ..errors import PeftError

quantization_of = targets.quantization_of
has_quantized_layers = targets.has_quantized_layers


def whole(module: nn.Module, *, modified: bool = False):
    """Context in which ``module``'s weight is whole (gathered under ZeRO-3)."""
    return partition.whole([module.weight], modified=modified)


def adapter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype new adapter tensors beside ``module`` get.

    A float base weight gives its own dtype; a quantized one (stored as uint8/int8) gives
    float32, so that trained adapter parameters keep full precision (as QLoRA does) whatever
    the layer's compute dtype is.
    """
    w = module.weight
    return w.dtype if quantization_of(module) is None else torch.float32


def read_weight(module: nn.Module) -> torch.Tensor:
    """The whole weight as a float (out, in) matrix (dequantized where needed).

    For a plain layer this is a view of the parameter (GPT-2's ``Conv1D`` transposed), so
    callers must not write to it; :func:`write_weight` does that.
    """
    kind = quantization_of(module)
    w = module.weight
    if kind is None:
        if w.numel() == 0 and getattr(w, "ds_numel", 0):
            raise PeftError(
                "this method needs the whole base weight, which is partitioned (ZeRO-3); "
                "read it inside deepspeed.zero.GatheredParameters"
            )
        return targets.dense_weight(module)
    import bitsandbytes.functional as bnbf

    if kind == "4-bit":
        # never bitsandbytes' CPU inference layout: apply() turns that repacking off
        return bnbf.dequantize_4bit(w.data, w.quant_state).to(torch.float32)
    # LLM.int8: row-wise absmax int8 codes (CB) and their scales (SCB).
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = module.state.SCB
    return bnbf.int8_vectorwise_dequant(w.data, scb).to(torch.float32)


def write_weight(module: nn.Module, value: torch.Tensor, *, why: str) -> None:
    """Replace the base weight with ``value`` (out, in), in the weight's own dtype and layout.

    A quantized weight cannot be rewritten exactly, so this refuses with ``why`` (the
    operation asked for) rather than silently re-quantizing.
    """
    kind = quantization_of(module)
    if kind is not None:
        raise PeftError(
            f"{why}: the base layer ({type(module).__name__}) is {kind} quantized, and writing "
            "into a quantized weight would re-quantize it (not exact); load the base in full "
            "precision for this"
        )
    with torch.no_grad():
        dense = targets.dense_weight(module)
        dense.copy_(value.to(dense.dtype))


def add_to_weight(module: nn.Module, delta: torch.Tensor, sign: float, *, why: str) -> None:
    """``W += sign · delta`` in place (out, in); refuses on a quantized weight like
    :func:`write_weight`."""
    if quantization_of(module) is not None:
        write_weight(module, delta, why=why)  # raises with the explanation
    with torch.no_grad():
        dense = targets.dense_weight(module)
        dense.add_(delta.to(dense.dtype), alpha=sign)
