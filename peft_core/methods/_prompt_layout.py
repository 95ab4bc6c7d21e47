"""Facts about a base model that soft prompts depend on, and tensor helpers they share.

Read once at injection time from module attributes and the config (never from weights, so
they stay right when ZeRO-3 has partitioned the model).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from ..errors import PeftError


@dataclasses.dataclass(frozen=True)
class Layout:
    """How inputs reach ``model``.

    ``causal``: a decoder (left-to-right attention, can generate, left padding is usual).
    ``offset``: where input-level virtual tokens are inserted: 0 for decoders; 1 for
    bidirectional encoders, whose [CLS] token at position 0 is what their classification
    heads pool, so it must stay first. ``pooled``: the model returns one output per sequence
    (sequence classification), so labels are per sequence and logits have no positions.
    ``cache_kwarg``: the forward argument taking a KV cache (renamed across transformers
    versions). ``position_ids``: whether forward accepts explicit positions.
    ``num_layers`` / ``kv_heads`` / ``head_dim``: the shape of each layer's keys and values.
    ``dim``: the width of the input embeddings.
    """

    causal: bool
    offset: int
    pooled: bool
    cache_kwarg: str
    position_ids: bool
    num_layers: int
    kv_heads: int
    head_dim: int
    dim: int

    @property
    def prefix_width(self) -> int:
        """Width of one virtual token's flattened keys and values over all layers."""
        return self.num_layers * 2 * self.kv_heads * self.head_dim


def layout(model: nn.Module) -> Layout:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise PeftError(f"{type(model).__name__} has no config; soft prompts need a transformers model")
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    params = inspect.signature(model.forward).parameters
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    layers = getattr(text, "num_hidden_layers", None)
    if not (heads and hidden and layers):
        raise PeftError(
            f"model_type {getattr(cfg, 'model_type', None)!r}: config lacks num_attention_heads, "
            "hidden_size or num_hidden_layers, which soft prompts need"
        )
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dim = getattr(emb, "embedding_dim", None) or hidden
    causal = _is_causal(model)
    name = type(model).__name__
    return Layout(
        causal=causal,
        offset=0 if causal else 1,
        pooled=name.endswith("ForSequenceClassification"),
        cache_kwarg=_cache_kwarg(model),
        position_ids="position_ids" in params,
        num_layers=int(layers),
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        dim=int(dim),
    )


def _cache_kwarg(model: nn.Module) -> str:
    # transformers 5 renamed past_key_values to cache; heads often take it only via **kwargs,
    # so the backbone's signature decides.
    for m in (model, getattr(model, "base_model", None)):
        params = inspect.signature(m.forward).parameters if m is not None else {}
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
    return "past_key_values"


def _is_causal(model: nn.Module) -> bool:
    # Attention modules say whether they mask the future (Llama/GPT-2 True, BERT False);
    # this holds for every family without a table of model types.
    flags = {m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)}
    if not flags:
        return not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return True in flags


def insert(x: torch.Tensor, new: torch.Tensor, at: int) -> torch.Tensor:
    """``x`` with ``new`` inserted before column ``at`` (dim 1)."""
    return torch.cat([x[:, :at], new.to(dtype=x.dtype, device=x.device), x[:, at:]], dim=1)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting only attended tokens, so left padding shifts nothing."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def left_align(mask: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Move each row's padding to its left, keeping token order (mask first, then ``tensors``).

    Decoder classifiers pool the last non-pad token, found from ``input_ids``; fed embeddings
    they take the last position instead, which is right only without right padding.
    """
    order = torch.argsort(mask.long(), dim=1, stable=True)  # zeros (padding) first
    out: list[torch.Tensor | None] = [mask.gather(1, order)]
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        idx = order.view(*order.shape, *([1] * (t.dim() - 2))).expand(*order.shape, *t.shape[2:])
        out.append(t.gather(1, idx))
    return out


def batch_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Pop ``input_ids`` / ``inputs_embeds`` (exactly one) and the attention mask from a call.

    The mask defaults to all ones; a user's mask never covers virtual tokens.
    """
    if len(args) > 1:
        raise PeftError("soft-prompt models take input_ids as the only positional argument; "
                        "pass the rest by keyword")
    ids = args[0] if args else kwargs.pop("input_ids", None)
    if args and "input_ids" in kwargs:
        raise PeftError("input_ids given both positionally and by keyword")
    embeds = kwargs.pop("inputs_embeds", None)
    if (ids is None) == (embeds is None):
        raise PeftError("pass exactly one of input_ids or inputs_embeds")
    ref = ids if ids is not None else embeds
    mask = kwargs.pop("attention_mask", None)
    if mask is None:
        mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
    elif tuple(mask.shape) != tuple(ref.shape[:2]):
        raise PeftError(
            f"attention_mask: shape {tuple(mask.shape)} != inputs' {tuple(ref.shape[:2])}; "
            "it must cover the real tokens only (virtual tokens are added by the method)"
        )
    return ids, embeds, mask


def pop_cache(kwargs: dict) -> object | None:
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def cache_length(cache: object | None) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    raise PeftError(f"cache: expected a transformers Cache, got {type(cache).__name__}")


def generation_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and attention mask of a ``generate`` call, with padding moved left."""
    if kwargs.get("inputs_embeds") is not None:
        raise PeftError("generate with soft prompts takes input_ids, not inputs_embeds")
    if "inputs" in kwargs:
        if args:
            raise PeftError("input_ids given both positionally and as `inputs`")
        args = (kwargs.pop("inputs"),)
    ids, _, mask = batch_inputs(args, kwargs)
    # Generation appends on the right, so right padding would put pads inside the sequence.
    mask, ids = left_align(mask, ids)
    return ids, mask


def adjust_lengths(kwargs: dict, n: int) -> None:
    """``max_length``/``min_length`` count the placeholder tokens standing in for the prompt."""
    for key in ("max_length", "min_length"):
        if kwargs.get(key) is not None:
            kwargs[key] = kwargs[key] + n


def strip_sequences(out: object, n: int) -> object:
    """Drop the ``n`` placeholder columns from ``generate``'s result."""
    if isinstance(out, torch.Tensor):
        return out[:, n:]
    if hasattr(out, "sequences"):
        out.sequences = out.sequences[:, n:]
        return out
    raise PeftError(f"generate returned {type(out).__name__}; expected a tensor or sequences")


def placeholder_id(model: nn.Module) -> int:
    """A token id for the placeholder columns (never embedded: the prompt replaces them)."""
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        pad = getattr(cfg, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    return 0
