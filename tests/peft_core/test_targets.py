"""Default targets per architecture, GPT-2 Conv1D handling, task heads."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

import peft_core
from peft_core import targets
from peft_core.methods.lora import LoraLayer, lora_layers
from tests import tiny

EXPECTED_LEAVES = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
    "bert": {"query", "key", "value", "dense"},
}


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_default_targets(arch: str) -> None:
    pm = peft_core.apply(tiny.model(arch), {"name": "lora", "rank": 2})
    wrapped = [n for n, _ in lora_layers(pm.base_model)]
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == EXPECTED_LEAVES[arch]
    per_block = {"llama": 7, "gpt2": 4, "bert": 6}[arch]
    assert len(wrapped) == 2 * per_block
    assert not any("pooler" in n or "classifier" in n or "lm_head" in n for n in wrapped)


def test_gpt2_conv1d_is_wrapped_with_right_dims() -> None:
    pm = peft_core.apply(tiny.model("gpt2"), {"name": "lora", "rank": 2})
    layer = pm.base_model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLayer) and targets.is_conv1d(layer.base)
    assert layer.lora_A.weight.shape == (2, 32) and layer.lora_B.weight.shape == (96, 2)


def test_regex_and_suffix_patterns() -> None:
    pm = peft_core.apply(
        tiny.model("llama"), {"name": "lora", "target_modules": r".*\.0\.self_attn\.(q|v)_proj"}
    )
    assert [n for n, _ in lora_layers(pm.base_model)] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    pm = peft_core.apply(tiny.model("llama"), {"name": "lora", "target_modules": ["down_proj"]})
    assert len(lora_layers(pm.base_model)) == 2


@pytest.mark.parametrize(
    "build",
    [
        lambda: LlamaForSequenceClassification(
            LlamaConfig(
                vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0,
            )
        ),
        lambda: GPT2ForSequenceClassification(
            GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, num_labels=3, pad_token_id=0)
        ),
    ],
)
def test_classification_head_trains_with_the_adapter(build) -> None:
    torch.manual_seed(0)
    pm = peft_core.apply(build(), {"name": "lora", "rank": 2})
    names = {n for n, _ in pm.trainable_parameters()}
    assert "score.weight" in names
    assert any("lora_A" in n for n in names)
    no_head = peft_core.apply(build(), {"name": "lora", "rank": 2, "train_head": False})
    assert "score.weight" not in {n for n, _ in no_head.trainable_parameters()}


def test_linear_probe_unties_lm_head() -> None:
    m = tiny.model("gpt2")
    emb = m.get_input_embeddings().weight.detach().clone()
    pm = peft_core.apply(m, {"name": "linear_probe"})
    assert [n for n, _ in pm.trainable_parameters()] == ["lm_head.weight"]
    pm.train()
    opt = torch.optim.SGD(pm.param_groups(lr=0.1))
    pm(**tiny.batch("gpt2")).loss.backward()
    opt.step()
    torch.testing.assert_close(pm.get_input_embeddings().weight, emb)
