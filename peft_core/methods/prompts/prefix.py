"""Prefix-level soft prompts (prefix tuning, P-tuning v2): learned keys and values that every
attention layer sees before the real tokens, passed in as a pre-filled KV cache.

No positions are added to the sequence, so labels, logits and classification pooling are the
base model's own. The attention mask gains ``N`` leading ones; position ids count them (as a
cache of length N implies), so the real tokens start at position N.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ...errors import PeftError
from .calls import (
    adjust_lengths,
    batch_inputs,
    cache_length,
    generation_inputs,
    insert,
    placeholder_id,
    pop_cache,
    positions,
    strip_sequences,
)
from .layout import Layout

PrefixFn = Callable[[], torch.Tensor]


def build_cache(model: nn.Module, lay: Layout, flat: torch.Tensor, batch: int) -> Any:
    """A transformers ``DynamicCache`` holding the prefix for ``batch`` rows.

    ``flat`` is ``(N, num_layers * 2 * kv_heads * head_dim)``: per virtual token, layer by
    layer, the key then the value, each head after head (Hugging Face peft's layout too).
    """
    from transformers import DynamicCache

    n = flat.shape[0]
    kv = flat.view(n, lay.num_layers * 2, lay.kv_heads, lay.head_dim).permute(1, 2, 0, 3)
    pairs = [
        (kv[2 * i].unsqueeze(0).expand(batch, -1, -1, -1),
         kv[2 * i + 1].unsqueeze(0).expand(batch, -1, -1, -1))
        for i in range(lay.num_layers)
    ]
    return DynamicCache(pairs, config=model.config)


def _prefix(model: nn.Module, prefix: PrefixFn, dropout: float) -> torch.Tensor:
    flat = prefix()
    dtype = getattr(model, "dtype", flat.dtype)
    return F.dropout(flat, dropout, training=model.training).to(dtype)


def _checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def forward(model: nn.Module, lay: Layout, prefix: PrefixFn, n: int, dropout: float,
            args: tuple, kwargs: dict) -> Any:
    """Run ``model`` with the prefix from ``prefix()`` (a fresh cache per call)."""
    if model.training and torch.is_grad_enabled() and _checkpointing(model):
        # transformers drops the cache inside checkpointed layers (it would be written twice
        # on the backward replay), which would silently train without the prefix.
        raise PeftError(
            "prefix methods pass their prefixes as a KV cache, which gradient checkpointing "
            "drops; disable gradient_checkpointing for prefix_tuning / p_tuning_v2"
        )
    kwargs = dict(kwargs)
    ids, embeds, mask = batch_inputs(args, kwargs)
    ref = ids if ids is not None else embeds
    b, length = ref.shape[:2]
    cache = pop_cache(kwargs)
    # A filled cache comes from an earlier call and already starts with the prefix.
    if not cache_length(cache):
        cache = build_cache(model, lay, _prefix(model, prefix, dropout), b)
    mask = insert(mask, torch.ones(b, n, dtype=mask.dtype), 0)
    pos = kwargs.pop("position_ids", None)
    if pos is not None:
        kwargs["position_ids"] = pos + n
    elif lay.causal and lay.position_ids:
        kwargs["position_ids"] = positions(mask)[:, -length:]
    inputs = {"input_ids": ids} if ids is not None else {"inputs_embeds": embeds}
    return model(**inputs, attention_mask=mask, **{lay.cache_kwarg: cache}, **kwargs)


@torch.no_grad()
def generate(model: nn.Module, lay: Layout, prefix: PrefixFn, n: int, args: tuple,
             kwargs: dict) -> Any:
    """``model.generate`` starting from a cache that holds the prefix.

    Generation takes ``input_ids`` to cover the cached positions too, so ``n`` placeholder ids
    stand for the prefix; they are never embedded (the cache already holds those positions)
    and are cut from the result.
    """
    if not lay.causal:
        raise PeftError("generate needs a causal language model; this one is an encoder")
    kwargs = dict(kwargs)
    ids, mask = generation_inputs(args, kwargs)
    if cache_length(pop_cache(kwargs)):
        raise PeftError("generate with a prefix method builds its own cache; pass none")
    adjust_lengths(kwargs, n)
    gen = kwargs.get("generation_config") or model.generation_config
    # generate() repeats each row per beam / returned sequence but not a cache we pass in.
    beams = kwargs.get("num_beams") or getattr(gen, "num_beams", 1) or 1
    returns = kwargs.get("num_return_sequences") or getattr(gen, "num_return_sequences", 1) or 1
    b = ids.shape[0]
    cache = build_cache(model, lay, _prefix(model, prefix, 0.0), b * max(beams, returns))
    out = model.generate(
        input_ids=insert(ids, torch.full((b, n), placeholder_id(model), dtype=ids.dtype), 0),
        attention_mask=insert(mask, torch.ones(b, n, dtype=mask.dtype), 0),
        **{lay.cache_kwarg: cache},
        **kwargs,
    )
    return strip_sequences(out, n)
