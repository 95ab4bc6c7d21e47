"""Soft prompts: parity with Hugging Face ``peft``, export, generation with a KV cache,
padding, labels, folding, initialisation and ZeRO-3-safe access to the base model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertForTokenClassification, LlamaForSequenceClassification

import peft_core
from peft_core.methods import prompts
from peft_core.methods.prompts.initial import token_activations
from tests import tiny

peft = pytest.importorskip("peft")

N = 4  # virtual tokens
METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2")
CAUSAL = ("llama", "gpt2")

# our config -> (peft config class, its kwargs): the same method on both sides
PARITY = {
    "prompt_tuning": ({"name": "prompt_tuning"}, "PromptTuningConfig", {}),
    "p_tuning_mlp": (
        {"name": "p_tuning", "encoder_hidden_size": 16},
        "PromptEncoderConfig",
        {"encoder_reparameterization_type": "MLP", "encoder_hidden_size": 16},
    ),
    "p_tuning_lstm": (
        {"name": "p_tuning", "encoder": "lstm", "encoder_hidden_size": 16},
        "PromptEncoderConfig",
        {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 16},
    ),
    "prefix_projection": (
        {"name": "prefix_tuning", "encoder_hidden_size": 16},
        "PrefixTuningConfig",
        {"prefix_projection": True, "encoder_hidden_size": 16},
    ),
    "prefix_plain": (
        {"name": "prefix_tuning", "projection": False},
        "PrefixTuningConfig",
        {"prefix_projection": False},
    ),
    "p_tuning_v2": ({"name": "p_tuning_v2"}, "PrefixTuningConfig", {"prefix_projection": False}),
}


def _apply(method: str | dict, model: nn.Module, seed: int = 3, scale: float = 0.3, **hp):
    cfg = dict(method) if isinstance(method, dict) else {"name": method}
    pm = peft_core.apply(model, {"num_virtual_tokens": N, **cfg, **hp})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # away from the initialisation, so a wrong wiring shows
        for _, p in pm.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return pm.eval()


def _module(pm) -> nn.Module:
    return getattr(pm.base_model, prompts.MODULE)


def _padded(arch: str, side: str, lengths=(12, 7, 9)):
    """Rows of different lengths padded on ``side``, plus each row alone."""
    b = tiny.batch(arch, size=len(lengths))
    ids, mask = b["input_ids"].clone(), torch.zeros_like(b["input_ids"])
    rows = []
    for i, n in enumerate(lengths):
        real = b["input_ids"][i, :n]
        sl = slice(0, n) if side == "right" else slice(tiny.SEQ - n, tiny.SEQ)
        ids[i] = 0
        ids[i, sl] = real
        mask[i, sl] = 1
        rows.append((real.unsqueeze(0), sl))
    return ids, mask, rows


def _with_head(cls: type, arch: str, **config) -> nn.Module:
    """The tiny ``arch`` model's shape with another head (``cls``), in eval mode."""
    torch.manual_seed(0)
    return cls(
        tiny.model(arch).config.__class__(
            vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, **config,
        )
    ).eval()


def _llama_classifier() -> nn.Module:
    return _with_head(
        LlamaForSequenceClassification, "llama", num_key_value_heads=2, pad_token_id=0, num_labels=3
    )


def _bert_tagger() -> nn.Module:
    return _with_head(
        BertForTokenClassification, "bert", num_labels=5, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


# -- parity with Hugging Face peft ----------------------------------------------------------------
def _peft_pair(case: str, arch: str):
    ours_cfg, ref_cls, ref_kw = PARITY[case]
    ref = peft.get_peft_model(
        tiny.model(arch),
        getattr(peft, ref_cls)(task_type="CAUSAL_LM", num_virtual_tokens=N, **ref_kw),
    )
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in ref.prompt_encoder["default"].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ours = peft_core.apply(tiny.model(arch), {"num_virtual_tokens": N, **ours_cfg})
    # Same module structure, so the same state dict copies in.
    _module(ours).load_state_dict(ref.prompt_encoder["default"].state_dict())
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("case", sorted(PARITY))
def test_logits_and_loss_match_peft(case: str, arch: str) -> None:
    ours, ref = _peft_pair(case, arch)
    b = tiny.batch(arch)
    with torch.no_grad():
        got, want = ours(**b), ref(**b)
    if want.logits.shape[1] == b["input_ids"].shape[1] + N:  # peft keeps virtual positions
        want_logits = want.logits[:, N:]
    else:
        want_logits = want.logits
    torch.testing.assert_close(got.logits, want_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("case", sorted(PARITY))
def test_export_loads_in_peft(case: str, arch: str, tmp_path) -> None:
    ours = _apply(PARITY[case][0], tiny.model(arch))
    ours.export_hf(tmp_path / "hf")
    ref = peft.PeftModel.from_pretrained(tiny.model(arch), tmp_path / "hf").eval()
    b = tiny.batch(arch)
    want = tiny.logits(ref, b)
    torch.testing.assert_close(tiny.logits(ours, b), want[:, -tiny.SEQ :], atol=1e-5, rtol=0)


# (peft 0.21 cannot run prefix tuning on classifiers under transformers 5: it looks for a
# `past_key_values` argument, now called `cache`; the head export code is shared)
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_export_with_classification_head_loads_in_peft(method: str, tmp_path) -> None:
    ours = _apply(method, _llama_classifier())
    ours.export_hf(tmp_path / "hf")
    ref = peft.PeftModel.from_pretrained(_llama_classifier(), tmp_path / "hf").eval()
    b = tiny.batch("llama")
    torch.testing.assert_close(tiny.logits(ours, b), tiny.logits(ref, b), atol=1e-5, rtol=0)


def test_input_prompts_on_encoders_refuse_export(tmp_path) -> None:
    pm = _apply("prompt_tuning", tiny.model("bert"))
    with pytest.raises(peft_core.PeftError, match="CLS"):
        pm.export_hf(tmp_path / "hf")


# -- generation -----------------------------------------------------------------------------------
def _greedy_by_full_forward(pm, ids: torch.Tensor, steps: int) -> torch.Tensor:
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = pm(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq


def _no_eos(pm) -> None:
    # tiny random models emit their EOS id early; generation must not stop on it here
    pm.base_model.generation_config.eos_token_id = None


@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("method", METHODS)
def test_generate_with_cache_equals_full_forward_greedy(method: str, arch: str) -> None:
    pm = _apply(method, tiny.model(arch))
    _no_eos(pm)
    ids = tiny.batch(arch, size=2)["input_ids"][:, :6]
    out = pm.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=True)
    assert out.shape == (2, 12) and torch.equal(out[:, :6], ids)
    torch.testing.assert_close(out, _greedy_by_full_forward(pm, ids, 6), atol=0, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", METHODS)
def test_batched_generate_matches_unbatched(method: str, side: str) -> None:
    pm = _apply(method, tiny.model("llama"))
    _no_eos(pm)
    ids, mask, rows = _padded("llama", side)
    out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    for i, (row, _) in enumerate(rows):
        alone = pm.generate(input_ids=row, max_new_tokens=4, do_sample=False)
        torch.testing.assert_close(out[i, -4:], alone[0, -4:], atol=0, rtol=0)
        # padding moved left; the prompt itself is unchanged
        assert torch.equal(out[i, tiny.SEQ - row.shape[1] : tiny.SEQ], row[0])


@pytest.mark.parametrize("method", METHODS)
def test_generate_with_beams_and_several_returns(method: str) -> None:
    """generate() repeats each row per beam; the prefix cache must be built that wide."""
    pm = _apply(method, tiny.model("gpt2"))
    _no_eos(pm)
    ids = tiny.batch("gpt2", size=2)["input_ids"][:, :5]
    out = pm.generate(
        input_ids=ids, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False
    )
    assert out.shape == (4, 8)
    assert torch.equal(out[:, :5], ids.repeat_interleave(2, dim=0))
    sampled = pm.generate(input_ids=ids, max_new_tokens=3, do_sample=True, num_return_sequences=3)
    assert sampled.shape == (6, 8)


def test_generate_on_an_encoder_is_refused() -> None:
    pm = _apply("prefix_tuning", tiny.model("bert"))
    with pytest.raises(peft_core.PeftError, match="causal"):
        pm.generate(input_ids=tiny.batch("bert")["input_ids"])


# -- padding ---------------------------------------------------------------------------------------
def _models():
    return {
        "llama": lambda: tiny.model("llama"),
        "gpt2": lambda: tiny.model("gpt2"),
        "llama_cls": _llama_classifier,
        "bert": lambda: tiny.model("bert"),
    }


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("model_name", ["llama", "gpt2", "llama_cls", "bert"])
@pytest.mark.parametrize("method", METHODS)
def test_padded_batch_matches_unbatched(method: str, model_name: str, side: str) -> None:
    if model_name == "bert" and side == "left":
        pytest.skip("BERT numbers positions from the left edge; its tokenizers pad right")
    pm = _apply(method, _models()[model_name]())
    arch = "bert" if model_name == "bert" else "llama" if model_name == "llama_cls" else model_name
    ids, mask, rows = _padded(arch, side)
    with torch.no_grad():
        batched = pm(input_ids=ids, attention_mask=mask).logits
        for i, (row, sl) in enumerate(rows):
            alone = pm(input_ids=row).logits[0]
            got = batched[i] if batched.dim() == 2 else batched[i, sl]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


# -- labels ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("method", METHODS)
def test_virtual_tokens_never_count_in_the_causal_loss(method: str, arch: str) -> None:
    pm = _apply(method, tiny.model(arch))
    b = tiny.batch(arch)
    labels = b["labels"].clone()
    labels[:, 0] = -100  # the first token is context, as in any real example
    labels[1, 7:] = -100
    with torch.no_grad():
        out = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels)
    assert out.logits.shape[:2] == labels.shape, "logits cover the real tokens only"
    want = nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, tiny.VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_token_labels_line_up_for_sequence_labelling(method: str) -> None:
    pm = _apply(method, _bert_tagger())
    ids, mask, _ = _padded("bert", "right")
    labels = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(2))
    labels[mask == 0] = -100
    with torch.no_grad():
        out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (*ids.shape, 5)
    want = nn.functional.cross_entropy(
        out.logits.reshape(-1, 5), labels.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_encoder_classifier_still_pools_cls(method: str) -> None:
    """The pooled [CLS] output changes with the prompt, and the loss is over sequence labels."""
    pm = _apply(method, tiny.model("bert"))
    b = tiny.batch("bert")
    with torch.no_grad():
        out = pm(**b)
        base = tiny.model("bert")(**b)
    assert out.logits.shape == base.logits.shape
    assert not torch.allclose(out.logits, base.logits)
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, b["labels"]))


def test_input_prompts_follow_cls_on_encoders() -> None:
    """Virtual tokens sit after [CLS]: with [CLS] alone attended (the rest masked), an encoder's
    position-0 state must differ from the base (the prompt is seen) but stay at position 0."""
    pm = _apply("prompt_tuning", _bert_tagger())
    ids = tiny.batch("bert")["input_ids"][:1]
    with torch.no_grad():
        out = pm(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states[0]  # embeddings, virtual tokens included
    emb = pm.base_model.get_input_embeddings()(ids)
    table = _module(pm)()
    positions = pm.base_model.bert.embeddings.position_embeddings.weight
    ln = pm.base_model.bert.embeddings.LayerNorm
    tt = pm.base_model.bert.embeddings.token_type_embeddings.weight[0]
    with torch.no_grad():
        torch.testing.assert_close(hidden[0, 0], ln(emb[0, 0] + positions[0] + tt))
        torch.testing.assert_close(hidden[0, 1 : 1 + N], ln(table + positions[1 : 1 + N] + tt))


# -- folding (finalize) ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "p_tuning"},
        {"name": "p_tuning", "encoder": "lstm"},
        {"name": "prefix_tuning"},
    ],
)
def test_finalize_folds_the_encoder_and_round_trips(cfg: dict, tmp_path) -> None:
    pm = _apply(cfg, tiny.model("llama"))
    b = tiny.batch("llama")
    before = tiny.logits(pm, b)
    encoder_params = pm.summary()["trainable_params"]
    pm.finalize([b])
    assert pm.method.folded is True
    assert isinstance(_module(pm), prompts.PromptTable)
    assert pm.summary()["trainable_params"] < encoder_params
    assert set(pm.adapter_state_dict()) == {f"{prompts.MODULE}.embedding.weight"}
    torch.testing.assert_close(tiny.logits(pm, b), before, atol=1e-6, rtol=0)
    pm.save(tmp_path / "a")
    loaded = peft_core.load_adapter(tiny.model("llama"), tmp_path / "a")
    assert isinstance(_module(loaded), prompts.PromptTable)
    torch.testing.assert_close(tiny.logits(loaded, b), before, atol=1e-6, rtol=0)


def test_folding_is_run_state_and_old_adapters_with_a_folded_field_still_load(tmp_path) -> None:
    """``folded`` is the method's run-time state, saved as ``method_state``, not a config
    field; an adapter saved when it was a field (``"folded": true`` in ``method``) loads."""
    import json

    b = tiny.batch("llama")
    pm = _apply({"name": "p_tuning"}, tiny.model("llama"))
    pm.finalize([b])
    before = tiny.logits(pm, b)
    pm.save(tmp_path / "a")
    file = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(file.read_text())
    assert "folded" not in cfg["method"] and cfg["method_state"] == {"folded": True}
    with pytest.raises(peft_core.ConfigError, match="unknown field"):
        peft_core.MethodConfig.from_dict({"name": "p_tuning", "folded": True})
    del cfg["method_state"]
    cfg["method"]["folded"] = True  # the format before
    file.write_text(json.dumps(cfg))
    loaded = peft_core.load_adapter(tiny.model("llama"), tmp_path / "a")
    assert isinstance(_module(loaded), prompts.PromptTable) and loaded.method.folded
    torch.testing.assert_close(tiny.logits(loaded, b), before, atol=1e-6, rtol=0)


# -- initialisation --------------------------------------------------------------------------------
def test_prompt_tuning_init_from_token_ids_and_vocab() -> None:
    model = tiny.model("llama")
    emb = model.get_input_embeddings()
    pm = peft_core.apply(
        model,
        {
            "name": "prompt_tuning",
            "num_virtual_tokens": 5,
            "init": "text",
            "init_token_ids": [7, 9],
        },
    )
    with torch.no_grad():
        torch.testing.assert_close(_module(pm)(), emb(torch.tensor([7, 9, 7, 9, 7])))
        pm = peft_core.apply(tiny.model("llama"), {"name": "prompt_tuning", "init": "vocab"})
        table = _module(pm)()
        vocab = tiny.model("llama").get_input_embeddings().weight
        # every row is some token's embedding
        assert all((vocab - row).abs().amax(-1).min() < 1e-7 for row in table)


def test_p_tuning_encoder_inputs_start_as_vocabulary_embeddings_by_default() -> None:
    vocab = tiny.model("llama").get_input_embeddings().weight
    rows = _module(peft_core.apply(tiny.model("llama"), {"name": "p_tuning"})).embedding.weight
    assert all((vocab - row).abs().amax(-1).min() < 1e-7 for row in rows)
    # peft's start: standard normal inputs, far from every token's embedding
    torch.manual_seed(0)
    rand = _module(peft_core.apply(tiny.model("llama"),
                                   {"name": "p_tuning", "init": "random"})).embedding.weight
    assert all((vocab - row).abs().amax(-1).min() > 1e-3 for row in rand)
    assert 0.7 < rand.std().item() < 1.3


def test_prompt_tuning_init_from_text_uses_the_tokenizer(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "classify": 5, "the": 6, "review": 8}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(
        tmp_path / "tok"
    )
    model = tiny.model("gpt2")
    emb = model.get_input_embeddings()
    pm = peft_core.apply(
        model,
        {
            "name": "prompt_tuning",
            "num_virtual_tokens": 4,
            "init": "text",
            "init_text": "classify the review",
            "tokenizer": str(tmp_path / "tok"),
        },
    )
    with torch.no_grad():
        torch.testing.assert_close(_module(pm)(), emb(torch.tensor([5, 6, 8, 5])))


def test_random_init_has_the_scale_of_token_embeddings() -> None:
    pm = peft_core.apply(tiny.model("llama"), {"name": "prompt_tuning", "num_virtual_tokens": 64})
    vocab_std = tiny.model("llama").get_input_embeddings().weight.std().item()
    assert 0.7 * vocab_std < _module(pm)().std().item() < 1.3 * vocab_std


@pytest.mark.parametrize("arch", CAUSAL)
def test_prefix_of_token_activations_equals_those_tokens_in_context(arch: str) -> None:
    """A prefix holding the model's own keys/values for tokens t makes it compute exactly what
    it computes on ``t + x``: checks the cache layout end to end (and the ``vocab`` init)."""
    t = torch.tensor([[5, 17, 33, 60]])
    pm = peft_core.apply(tiny.model(arch), {"name": "p_tuning_v2", "num_virtual_tokens": 4})
    with torch.no_grad():
        _module(pm).embedding.weight.copy_(token_activations(pm.base_model, pm.method._layout, t))
    x = tiny.batch(arch, size=1)["input_ids"]
    base = tiny.model(arch)
    with torch.no_grad():
        torch.testing.assert_close(
            pm(input_ids=x).logits, base(torch.cat([t, x], 1)).logits[:, 4:], atol=1e-5, rtol=0
        )
    pm2 = peft_core.apply(
        tiny.model(arch), {"name": "p_tuning_v2", "num_virtual_tokens": 4, "init": "vocab"}
    )
    assert _module(pm2)().abs().sum() > 0


# -- ZeRO-3 safety: the base model's weights are read only by their own modules --------------------
class _GuardedEmbedding(nn.Embedding):
    """Under ZeRO-3 a partitioned weight is whole only inside its module's forward."""

    inside = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _GuardedEmbedding.inside = True
        try:
            return super().forward(x)
        finally:
            _GuardedEmbedding.inside = False

    def __getattr__(self, name: str):
        if name == "weight" and not _GuardedEmbedding.inside:
            raise AssertionError("input embedding weight read outside its forward")
        return super().__getattr__(name)


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "prompt_tuning"},
        {"name": "prompt_tuning", "init": "vocab"},
        {"name": "prompt_tuning", "init": "text", "init_token_ids": [3, 4]},
        {"name": "p_tuning"},
        {"name": "prefix_tuning"},
        {"name": "p_tuning_v2", "init": "vocab"},
    ],
)
def test_embedding_matrix_is_only_used_through_its_module(cfg: dict) -> None:
    model = tiny.model("gpt2")
    model.get_input_embeddings().__class__ = _GuardedEmbedding
    pm = peft_core.apply(model, {"num_virtual_tokens": N, **cfg})
    _no_eos(pm)
    b = tiny.batch("gpt2")
    pm.train()
    pm(**b).loss.backward()
    pm.eval()
    pm.generate(input_ids=b["input_ids"], max_new_tokens=2, do_sample=False)


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg, field",
    [
        ({"name": "prompt_tuning", "num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"name": "prompt_tuning", "init": "text"}, "init"),
        ({"name": "prompt_tuning", "init": "words"}, "init"),
        ({"name": "p_tuning", "encoder": "gru"}, "encoder"),
        ({"name": "p_tuning", "init": "text"}, "init"),
        ({"name": "prefix_tuning", "target_modules": ["q_proj"]}, "target_modules"),
        ({"name": "p_tuning_v2", "dropout": 1.5}, "dropout"),
    ],
)
def test_bad_config_names_the_field(cfg: dict, field: str) -> None:
    with pytest.raises(peft_core.ConfigError, match=f"{cfg['name']}.{field}"):
        peft_core.apply(tiny.model("llama"), cfg)


def test_prefix_methods_refuse_gradient_checkpointing() -> None:
    pm = peft_core.apply(tiny.model("llama"), {"name": "prefix_tuning", "num_virtual_tokens": N})
    pm.enable_gradient_checkpointing()
    pm.train()
    with pytest.raises(peft_core.PeftError, match="gradient checkpointing"):
        pm(**tiny.batch("llama"))


def test_input_prompts_train_under_gradient_checkpointing() -> None:
    pm = peft_core.apply(tiny.model("llama"), {"name": "prompt_tuning", "num_virtual_tokens": N})
    pm.enable_gradient_checkpointing()
    pm.train()
    pm(**tiny.batch("llama")).loss.backward()
    assert _module(pm).embedding.weight.grad.abs().sum() > 0
