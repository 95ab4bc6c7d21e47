"""Reading and rewriting the arguments of a ``forward`` / ``generate`` call: which inputs it
has, where virtual columns go, the cache, and the placeholder columns of generation."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import PeftError


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
        idx = order.view(*order.shape, *([1] * (t.dim() - 2)))
        idx = idx.expand(*order.shape, *t.shape[2:])
        out.append(t.gather(1, idx))
    return out


def batch_inputs(
    args: tuple, kwargs: dict
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
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
    """Pop the KV cache from a call, under either of transformers' names."""
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def cache_length(cache: object | None) -> int:
    """How many positions ``cache`` already holds (0 for none)."""
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
