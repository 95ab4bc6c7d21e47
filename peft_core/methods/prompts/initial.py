"""Where the prompts start: random vectors at the embeddings' scale, the embeddings of
vocabulary or text tokens, or the keys and values the model computes for tokens."""

from __future__ import annotations

import math

import torch
from torch import nn

from ... import partition
from ...errors import PeftError
from .configs import PromptTuningConfig
from .layout import Layout


def prompt_tuning_table(model: nn.Module, lay: Layout, cfg: PromptTuningConfig) -> torch.Tensor:
    """The ``(N, dim)`` starting prompts of ``prompt_tuning`` for its ``init``."""
    n = cfg.num_virtual_tokens
    emb = model.get_input_embeddings()
    vocab = emb.num_embeddings
    device = next(emb.parameters()).device
    if cfg.init == "text":
        ids = list(cfg.init_token_ids) if cfg.init_token_ids is not None else tokenize(cfg)
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise PeftError(f"{cfg.name}.init_token_ids: ids {bad[:5]} are outside the "
                            f"vocabulary of {vocab} tokens")
        ids = (ids * math.ceil(n / len(ids)))[:n]
        tokens = torch.tensor(ids, device=device)
    else:
        tokens = torch.randint(0, vocab, (n if cfg.init == "vocab" else min(vocab, 1024),),
                               device=device)
    vectors = embed(emb, tokens)
    if cfg.init == "random":
        return torch.randn(n, lay.dim, device=device) * vectors.std()
    return vectors


def vocab_embeddings(model: nn.Module, n: int) -> torch.Tensor:
    """The ``(n, dim)`` input embeddings of ``n`` random vocabulary tokens."""
    emb = model.get_input_embeddings()
    device = next(emb.parameters()).device
    return embed(emb, torch.randint(0, emb.num_embeddings, (n,), device=device))


def embed(emb: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``emb(tokens)`` in float32, by a module call rather than a read of ``.weight``: ZeRO-3
    gathers the matrix for this call only."""
    with partition.gathered_forward(emb):
        return emb(tokens).float()


def tokenize(cfg: PromptTuningConfig) -> list[int]:
    """The token ids of ``init_text`` under the config's ``tokenizer``."""
    # transformers' tokenizer machinery loads only for this rarely used initialisation
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    except Exception as e:  # any loading failure means the same to the user
        raise PeftError(f"{cfg.name}.tokenizer: cannot load {cfg.tokenizer!r}: {e}") from e
    ids = tok(cfg.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PeftError(f"{cfg.name}.init_text: {cfg.init_text!r} tokenises to nothing")
    return list(ids)


def token_activations(model: nn.Module, lay: Layout, ids: torch.Tensor) -> torch.Tensor:
    """Every layer's keys and values for the ``(1, n)`` tokens ``ids``, flattened like a
    prefix."""
    from transformers import DynamicCache

    n = ids.shape[1]
    cache = DynamicCache(config=model.config)
    was = model.training
    model.eval()
    try:
        with partition.gathered_forward(model):
            model(input_ids=ids, **{lay.cache_kwarg: cache})
    finally:
        model.train(was)
    layers = [t for layer in cache.layers[: lay.num_layers]
              for t in (layer.keys[0], layer.values[0])]
    if len(layers) != 2 * lay.num_layers:
        raise PeftError("p_tuning_v2.init: the model did not fill a KV cache; use init 'random'")
    # (2L, heads, N, head_dim) -> (N, 2L * heads * head_dim), the layout build_cache reads
    return torch.stack(layers).permute(2, 0, 1, 3).reshape(n, -1)
