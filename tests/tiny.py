"""Tiny random models and batches, deterministic by seed, for fast tests of every method."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

ARCHS = ("llama", "gpt2", "bert")
VOCAB = 96
SEQ = 12


def model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny model; the same ``seed`` gives the same weights (a "fresh base model")."""
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0, **overrides,
        )
        m = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, **overrides,
        )
        m = GPT2LMHeadModel(cfg)
    elif arch == "bert":
        cfg = BertConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, num_labels=2,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **overrides,
        )
        m = BertForSequenceClassification(cfg)
    else:
        raise ValueError(arch)
    return m.eval()


def batch(arch: str, seed: int = 1, size: int = 4) -> dict[str, torch.Tensor]:
    """A fixed batch with labels: next-token labels for LMs, class ids for BERT."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (size, SEQ), generator=g)
    mask = torch.ones_like(ids)
    if arch == "bert":
        labels = torch.randint(0, 2, (size,), generator=g)
    else:
        labels = ids.clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def logits(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
