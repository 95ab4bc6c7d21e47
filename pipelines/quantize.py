"""Quantized frozen bases (QLoRA): ``model.quantization`` in a recipe.

    model: {name: builtin:smollm2, quantization: {bits: 4, type: nf4, double_quant: true}}

The base model's linear layers load as bitsandbytes ``Linear4bit`` (NF4 or FP4, optionally
with the quantization constants quantized again: "double quant", Dettmers et al. 2023,
arXiv 2305.14314) or ``Linear8bitLt`` (LLM.int8), through transformers' own
``BitsAndBytesConfig`` (the path every peer uses); the output head stays in full precision
(transformers' default). Methods that keep the base frozen then train on top of it:
peft_core wraps the quantized layers (LoRA family incl. DoRA = QDoRA, IA3, VeRA, adapters,
soft prompts); methods that write base weights (``full``, selective ones) refuse, and so
does merging into a quantized weight.

ZeRO-3 is refused: it partitions parameters by flattening them into its own buffers;
bitsandbytes' packed uint8 weights, with their quantization state kept on the side, would
need a float storage dtype (``bnb_4bit_quant_storage``) and a ZeRO-3-aware load, a path this
project has not tested, so it is refused rather than trusted. ZeRO 0-2 keep every
parameter whole on each rank and work (the quantized base is small).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


class QuantizationConfig(BaseModel):
    """``bits`` 4 or 8; for 4 bits ``type`` (``nf4`` or ``fp4``) and ``double_quant``;
    ``compute_dtype``: the dtype 4-bit layers dequantize to for their matmuls."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 8]
    type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = False
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _four_bit_options(self) -> QuantizationConfig:
        if self.bits == 8:
            given = sorted({"type", "double_quant", "compute_dtype"} & self.model_fields_set)
            if given:
                raise ValueError(
                    f"quantization: {given} apply to 4-bit quantization only; 8-bit (LLM.int8) "
                    "has no quantization type, double quantization or compute dtype to choose"
                )
        return self


def bnb_config(q: QuantizationConfig | dict[str, Any]) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``q``."""
    import torch
    from transformers import BitsAndBytesConfig

    from peft_core import targets

    q = QuantizationConfig.model_validate(q)
    # Task heads stay in full precision: a new classification head must train, and the LM
    # head is left whole as transformers does by default (this list replaces its default).
    skip = sorted({h for arch in targets.ARCHITECTURES.values() for h in arch.heads} | {"lm_head"})
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        llm_int8_skip_modules=skip,
    )


def from_pretrained_kwargs(q: QuantizationConfig | dict[str, Any] | None) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments that load the base quantized (none for ``None``).

    bitsandbytes quantizes while weights are placed, so the target device is chosen here
    (``device_map``: this process's current CUDA device, else the CPU); a quantized model
    is not moved between devices afterwards.
    """
    if q is None:
        return {}
    import torch

    _require_bitsandbytes()
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": bnb_config(q), "device_map": device}


def check_zero_stage(q: QuantizationConfig | dict[str, Any] | None, stage: int) -> None:
    """Refuse ZeRO-3 with a quantized base (see the module docstring)."""
    if q is not None and stage == 3:
        raise ValueError(
            "model.quantization: a quantized base is not supported with ZeRO-3 here "
            "(bitsandbytes' packed weights are not partitioned by this stack); use "
            "zero.stage 0, 1 or 2, which keep the (small) quantized base whole on every rank"
        )


def check_method(q: QuantizationConfig | dict[str, Any] | None, method: dict[str, Any]) -> None:
    """Refuse, before anything starts, a method that writes base weights on a quantized base."""
    if q is None:
        return
    import peft_core

    name = method.get("name") if isinstance(method, dict) else None
    if name and peft_core.get(name).writes_base_weights:
        raise ValueError(
            f"model.quantization: method {name!r} trains the base weights themselves, which a "
            "quantized base cannot; drop the quantization or use a method that keeps the base "
            "frozen (lora, dora, ia3, vera, adapters, soft prompts)"
        )


def _require_bitsandbytes() -> None:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "model.quantization needs bitsandbytes; install it (pip install bitsandbytes)"
        )
