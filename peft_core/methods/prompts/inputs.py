"""Input-level soft prompts (prompt tuning, P-tuning): virtual token embeddings joined to the
input embeddings, with masks, positions and labels made to match.

Conventions (what callers see): attention masks, labels and logits cover the real tokens
only. Virtual tokens are inserted at :attr:`Layout.offset` (before the text for decoders,
after [CLS] for encoders), their labels are -100 so they never count in the loss, and their
positions are cut out of token-level logits again, so the logits line up with the inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...errors import PeftError
from .calls import (
    adjust_lengths,
    batch_inputs,
    cache_length,
    generation_inputs,
    insert,
    left_align,
    placeholder_id,
    pop_cache,
    positions,
    strip_sequences,
)
from .layout import Layout

PromptFn = Callable[[], torch.Tensor]


def forward(model: nn.Module, lay: Layout, prompt: PromptFn, args: tuple, kwargs: dict) -> Any:
    """Run ``model`` with the ``(N, dim)`` virtual tokens from ``prompt()`` joined to the inputs."""
    kwargs = dict(kwargs)
    ids, embeds, mask = batch_inputs(args, kwargs)
    if cache_length(pop_cache(kwargs)):
        raise PeftError(
            "prompt methods put their virtual tokens in the first forward pass; continuing "
            "from a filled cache is done by generate()"
        )
    token_types = kwargs.pop("token_type_ids", None)
    pos = kwargs.pop("position_ids", None)
    labels = kwargs.pop("labels", None)
    if lay.causal and lay.pooled:
        mask, ids, embeds, token_types, pos = left_align(mask, ids, embeds, token_types, pos)
    if embeds is None:
        # Through the module (never its .weight): ZeRO-3 gathers the matrix for this call only.
        embeds = model.get_input_embeddings()(ids)
    virtual = prompt().to(embeds.dtype)
    n, (b, length) = virtual.shape[0], embeds.shape[:2]
    at = min(lay.offset, length)

    call: dict[str, Any] = {
        "inputs_embeds": insert(embeds, virtual.unsqueeze(0).expand(b, -1, -1), at),
        "attention_mask": insert(mask, torch.ones(b, n, dtype=mask.dtype), at),
    }
    if token_types is not None:
        call["token_type_ids"] = insert(token_types, torch.zeros(b, n, dtype=token_types.dtype), at)
    if pos is not None:
        call["position_ids"] = _shift_positions(pos, n, at)
    elif lay.causal and lay.position_ids:
        # Decoders number positions from the mask so that left padding changes nothing;
        # encoders keep their own numbering (RoBERTa's starts past its padding index).
        call["position_ids"] = positions(call["attention_mask"])
    if labels is not None:
        if not lay.pooled and labels.dim() >= 2:
            labels = insert(labels, torch.full((b, n), -100, dtype=labels.dtype), at)
        call["labels"] = labels
    out = model(**call, **kwargs)
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[1] == n + length:
        out["logits"] = torch.cat([logits[:, :at], logits[:, at + n:]], dim=1)
    return out


def _shift_positions(pos: torch.Tensor, n: int, at: int) -> torch.Tensor:
    """Caller's positions with the virtual tokens numbered in between and later ones moved up."""
    start = pos[:, at - 1:at] + 1 if at > 0 else torch.zeros_like(pos[:, :1])
    later = torch.arange(pos.shape[1], device=pos.device) >= at
    return insert(pos + n * later, start + torch.arange(n, device=pos.device), at)


@torch.no_grad()
def generate(model: nn.Module, lay: Layout, prompt: PromptFn, args: tuple, kwargs: dict) -> Any:
    """``model.generate`` with the virtual tokens before each (left-aligned) prompt.

    The first step is fed embeddings (virtual + real); ``input_ids`` carries placeholder ids
    in the virtual columns so generation's bookkeeping (lengths, positions from the mask,
    the KV cache) sees the full sequence. The placeholders are cut from the result.
    """
    if not lay.causal:
        raise PeftError("generate needs a causal language model; this one is an encoder")
    kwargs = dict(kwargs)
    ids, mask = generation_inputs(args, kwargs)
    embeds = model.get_input_embeddings()(ids)
    virtual = prompt().to(embeds.dtype)
    n, b = virtual.shape[0], ids.shape[0]
    adjust_lengths(kwargs, n)
    out = model.generate(
        input_ids=insert(ids, torch.full((b, n), placeholder_id(model), dtype=ids.dtype), 0),
        inputs_embeds=insert(embeds, virtual.unsqueeze(0).expand(b, -1, -1), 0),
        attention_mask=insert(mask, torch.ones(b, n, dtype=mask.dtype), 0),
        **kwargs,
    )
    return strip_sequences(out, n)
