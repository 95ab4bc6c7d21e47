"""Where methods attach: module lookup by name pattern, and per-architecture defaults.

Every architecture-specific fact peft_core relies on lives in :data:`ARCHITECTURES`, so a
new model family is supported by adding one row.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TypeVar

import torch
from torch import nn

from .errors import PeftError, TargetError


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Module-name facts of one model family.

    ``linear_targets``: default projection modules (suffixes) for reparameterisation methods.
    ``heads``: suffixes of task heads (the LM head or a classification head).
    ``blocks``: regex matching the name of each transformer block.
    The hook points of the additive adapters (``peft_core/methods/adapters.py``, ``coda.py``),
    all relative to a block:
    ``attn`` / ``ffn``: the sub-module whose input (first argument or ``hidden_states``) is
    the attention / feed-forward sublayer input;
    ``attn_out`` / ``ffn_out``: the sub-module whose output is that sublayer's output before
    the residual add. When ``ffn_out`` lies inside ``ffn`` (Llama, GPT-2) ``ffn`` is the
    whole FFN; otherwise (BERT: ``intermediate`` then ``output.dense``) the FFN sublayer is
    ``ffn_out(ffn(x))``.
    ``attn_kv``: the projections producing the attention keys and values, relative to a block
    (IA3 rescales their outputs); GPT-2 fuses q, k, v into one ``c_attn``.
    """

    linear_targets: tuple[str, ...]
    heads: tuple[str, ...]
    blocks: str
    attn_out: str
    ffn_out: str
    ffn: str
    attn: str
    attn_kv: tuple[str, ...] = ()


_LLAMA = Architecture(
    linear_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    heads=("lm_head", "score"),
    blocks=r"(.*\.)?layers\.\d+",
    attn_out="self_attn.o_proj",
    ffn_out="mlp.down_proj",
    ffn="mlp",
    attn="self_attn",
    attn_kv=("self_attn.k_proj", "self_attn.v_proj"),
)
_GPT2 = Architecture(
    linear_targets=("c_attn", "c_proj", "c_fc"),
    heads=("lm_head", "score"),
    blocks=r"(.*\.)?h\.\d+",
    attn_out="attn.c_proj",
    ffn_out="mlp.c_proj",
    ffn="mlp",
    attn="attn",
    attn_kv=("attn.c_attn",),
)
_BERT = Architecture(
    # A regex rather than suffixes: "dense" alone would also catch the pooler and the head.
    linear_targets=(
        r"re:.*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)"
        r"|attention\.output\.dense|intermediate\.dense|output\.dense)",
    ),
    heads=("classifier", "cls.predictions.decoder", "qa_outputs"),
    blocks=r"(.*\.)?encoder\.layer\.\d+",
    attn_out="attention.output.dense",
    ffn_out="output.dense",
    ffn="intermediate",
    attn="attention",
    attn_kv=("attention.self.key", "attention.self.value"),
)

ARCHITECTURES: dict[str, Architecture] = {
    **dict.fromkeys(
        ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "smollm3"],
        _LLAMA,
    ),
    "gpt2": _GPT2,
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra"], _BERT),
}


def architecture(model: nn.Module) -> Architecture:
    """The architecture row for ``model``'s ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise TargetError(
            f"model_type {model_type!r} has no default targets; pass target_modules "
            f"explicitly (known architectures: {sorted(ARCHITECTURES)})"
        ) from None


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        # ds_shape: the full shape of a ZeRO-3 partitioned weight (its .shape reads (0,))
        return getattr(module.weight, "ds_shape", module.weight.shape)[0], module.nf
    raise TargetError(f"{type(module).__name__} is not nn.Linear or Conv1D")


#: bitsandbytes parameter classes of quantized linear layers (matched by name: peft_core
#: does not import bitsandbytes unless a method must dequantize)
_QUANTIZED_PARAMS = {"Params4bit": "4-bit", "Int8Params": "8-bit"}


def quantization_of(module: nn.Module) -> str | None:
    """``"4-bit"`` / ``"8-bit"`` when ``module``'s own weight is bitsandbytes-quantized."""
    # Through named_parameters, not attribute access: reading ``module.weight`` counts as
    # a use of the weight for wrappers that watch it (ZeRO-3 hooks, the prompt tests).
    w = dict(module.named_parameters(recurse=False)).get("weight")
    return _QUANTIZED_PARAMS.get(type(w).__name__) if w is not None else None


def has_quantized_layers(model: nn.Module) -> bool:
    return any(quantization_of(m) for m in model.modules())


def keep_4bit_layers_differentiable(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking in ``model``'s 4-bit layers.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit``'s weight in place
    the first time the layer runs in eval mode on an input that needs no gradient, and from
    then on its matmul calls an inference kernel that has no backward, in training too. A
    run that evaluates between steps then trains with the base's share of every gradient
    missing: adapters below the layer get a wrong gradient, or none (DeepSpeed ZeRO-2 then
    fails in its gradient reduction; ZeRO-0 trains on silently). ``support_avx512bf16_for_cpu``
    is the layer's public switch for that path. A weight already repacked (the base was
    evaluated before the method was applied) is refused: undoing it needs bitsandbytes'
    private helpers.
    """
    for name, module in model.named_modules():
        if quantization_of(module) != "4-bit":
            continue
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            raise PeftError(
                f"{name}: this 4-bit layer ran in eval mode on the CPU before the method was "
                "applied, and bitsandbytes repacked its weight for an inference-only kernel "
                "(no gradients through it); apply the method to a freshly loaded base"
            )
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight as an (out, in) matrix view, whichever way the module stores it."""
    return module.weight.T if is_conv1d(module) else module.weight


def linear_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """What ``module`` (``nn.Linear`` or ``Conv1D``) computes, with ``weight`` (stored layout)
    and ``bias`` given: for wrappers that compute with a changed base weight without calling
    the base module (whose hooks, e.g. ZeRO-3's, would see the swapped tensor)."""
    if is_conv1d(module):
        x2 = x.reshape(-1, x.shape[-1])
        out = x2 @ weight if bias is None else torch.addmm(bias, x2, weight)  # as Conv1D does
        return out.view(*x.shape[:-1], weight.shape[-1])
    return torch.nn.functional.linear(x, weight, bias)


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def match_modules(
    model: nn.Module,
    patterns: list[str] | tuple[str, ...] | str,
    *,
    kind: str = "module",
    predicate=None,
) -> list[tuple[str, nn.Module]]:
    """Modules whose names match ``patterns`` (suffixes, ``re:`` regexes, or one regex string).

    An empty result is an error listing a sample of the module names that do exist, so a
    typo in a recipe is caught before training.
    """
    pats = [f"re:{patterns}"] if isinstance(patterns, str) else list(patterns)
    found = [
        (n, m)
        for n, m in model.named_modules()
        if n and any(_matches(n, p) for p in pats) and (predicate is None or predicate(m))
    ]
    if not found:
        names = [n for n, m in model.named_modules() if n and (predicate is None or predicate(m))]
        sample = names[:12] + (["..."] if len(names) > 12 else [])
        raise TargetError(
            f"target_modules {list(pats)} matched no {kind}; existing {kind} names include {sample}"
        )
    return found


def linear_targets(
    model: nn.Module, patterns: list[str] | str | None
) -> list[tuple[str, nn.Module]]:
    """Linear-like modules to wrap; ``None`` means the architecture's default projections."""
    if patterns is None:
        patterns = list(architecture(model).linear_targets)
    heads = set(head_names(model))
    found = match_modules(model, patterns, kind="linear module", predicate=is_linear_like)
    # Heads are handled by `train_head`, never wrapped by a default pattern.
    return [(n, m) for n, m in found if n not in heads]


def head_names(model: nn.Module) -> list[str]:
    """Names of the task heads present (LM head or classification head)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    suffixes = (
        ARCHITECTURES[model_type].heads
        if model_type in ARCHITECTURES
        else ("lm_head", "score", "classifier")
    )
    return [
        n
        for n, _ in model.named_modules()
        if n and any(n == s or n.endswith("." + s) for s in suffixes)
    ]


def new_task_heads(model: nn.Module) -> list[str]:
    """Heads that a fine-tune must learn from scratch: classification heads, not the LM head.

    A causal LM's head is pretrained (and usually tied to the embeddings), so methods leave
    it frozen; a sequence-classification head starts random and must train.
    """
    return [
        n for n in head_names(model) if not n.endswith("lm_head") and "cls.predictions" not in n
    ]


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks of ``model`` in order."""
    pattern = architecture(model).blocks
    found = [(n, m) for n, m in model.named_modules() if n and re.fullmatch(pattern, n)]
    if not found:
        raise TargetError(f"no transformer blocks matching {pattern!r} in {type(model).__name__}")
    return found


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the module at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def numel(p: torch.Tensor) -> int:
    """The weight's logical element count: right under DeepSpeed ZeRO-3, where ``numel()``
    reads 0, and for a 4-bit bitsandbytes weight, whose storage packs two values a byte
    (its ``quant_state`` keeps the unpacked shape), so a quantized base counts as many
    parameters as the same base in full precision."""
    if hasattr(p, "ds_numel"):
        return int(p.ds_numel)
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    if type(p).__name__ == "Params4bit" and shape is not None:
        return int(torch.Size(shape).numel())
    return int(p.numel())


_T = TypeVar("_T", bound=nn.Module)


def modules_of_type(model: nn.Module, cls: type[_T]) -> list[tuple[str, _T]]:
    """``(name, module)`` for every submodule of ``model`` that is a ``cls`` (a method's
    wrapper layers)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def new_task_head_params(model: nn.Module) -> int:
    """Parameters of :func:`new_task_heads` (what ``train_head`` adds to a method's count)."""
    return sum(numel(p) for h in new_task_heads(model) for p in model.get_submodule(h).parameters())
