"""Facts about a base model that soft prompts depend on (:class:`Layout`).

Read once at injection time from module attributes and the config (never from weights, so
they stay right when ZeRO-3 has partitioned the model).
"""

from __future__ import annotations

import dataclasses
import inspect

from torch import nn

from ...errors import PeftError


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
    """The :class:`Layout` of a transformers ``model``."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise PeftError(f"{type(model).__name__} has no config; soft prompts need a "
                        "transformers model")
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
    flags = {m.is_causal for m in model.modules()
             if isinstance(getattr(m, "is_causal", None), bool)}
    if not flags:
        return not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return True in flags
