"""Methods on a quantized (bitsandbytes 4-bit / 8-bit) frozen base: QLoRA, QDoRA, IA3, VeRA.

Real bitsandbytes layers (its CPU backend), loaded through transformers' own
``BitsAndBytesConfig``; Hugging Face ``peft`` on the same quantized base is the oracle.
"""

from __future__ import annotations

import pytest
import torch

import peft_core
from tests import tiny
from tests.peft_core import test_new_methods_parity as parity

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ARCHS = ["llama", "gpt2", "bert"]
# New task heads stay in full precision (they train), as pipelines.quantize does.
HEADS = ["lm_head", "score", "classifier"]
Q4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
      "bnb_4bit_compute_dtype": torch.float32, "llm_int8_skip_modules": HEADS}


def _small(arch: str, seed: int = 0) -> torch.nn.Module:
    """tests.tiny's models at width 64: bitsandbytes' CPU inference kernel (eval mode, no
    grad) needs every layer's input to span at least one 64-value quantization block."""
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=tiny.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0,
        )
        return transformers.LlamaForCausalLM(cfg).eval()
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=tiny.VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
        )
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.BertConfig(
        vocab_size=tiny.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """Each small base saved once, so quantized and full-precision copies load from it."""
    out = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(arch)
        _small(arch).save_pretrained(path)
        out[arch] = str(path)
    return out


def _load(folder: str, arch: str, quant: dict | None = Q4) -> torch.nn.Module:
    cls = (
        transformers.AutoModelForSequenceClassification
        if arch == "bert"
        else transformers.AutoModelForCausalLM
    )
    kw = (
        {"quantization_config": transformers.BitsAndBytesConfig(**quant), "device_map": "cpu"}
        if quant
        else {}
    )
    return cls.from_pretrained(folder, dtype=torch.float32, **kw).eval()


def _quantized_pair(method: str, arch: str, folder: str, **kw):
    cfg = {"name": method, **kw}
    if method in ("lora", "dora"):
        cfg.update(rank=parity.RANK, alpha=parity.ALPHA)
    if method == "vera":
        cfg.update(rank=parity.RANK)
    ours = peft_core.apply(_load(folder, arch), cfg)
    parity._perturb(ours)
    ref = peft.get_peft_model(_load(folder, arch), parity._ref_config(method, ours, arch))
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in parity._adapter_params(ours):
            dst = ref_params[parity._ref_name(method, n)]
            dst.copy_(p.reshape(dst.shape))
    return ours, ref


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "vera"])
def test_matches_peft_on_the_same_4bit_base(method: str, arch: str, folders) -> None:
    ours, ref = _quantized_pair(method, arch, folders[arch])
    wrapped = [m.base for m in ours.base_model.modules() if hasattr(m, "base")]
    assert wrapped and all(isinstance(m, bnb.nn.Linear4bit) for m in wrapped)
    # Training mode, as in training: bitsandbytes' CPU inference path (eval, no grad) would
    # repack the weights in place, which peft's DoRA then dequantizes wrongly.
    ours.train()
    ref.train()
    b = tiny.batch(arch)
    out_ours, out_ref = ours(**b), ref(**b)
    torch.testing.assert_close(out_ours.logits, out_ref.logits, atol=parity.TOL, rtol=0)
    out_ours.loss.backward()
    out_ref.loss.backward()
    parity._compare_grads(method, ours, ref)


def test_lora_on_8bit_base_matches_peft(folders) -> None:
    q8 = {"load_in_8bit": True, "llm_int8_skip_modules": HEADS}
    ours = peft_core.apply(
        _load(folders["llama"], "llama", q8), {"name": "lora", "rank": 4, "alpha": 8.0}
    )
    parity._perturb(ours)
    ref = peft.get_peft_model(
        _load(folders["llama"], "llama", q8), parity._ref_config("lora", ours, "llama")
    )
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in parity._adapter_params(ours):
            ref_params[parity._ref_name("lora", n)].copy_(p)
    b = tiny.batch("llama")
    torch.testing.assert_close(tiny.logits(ours, b), tiny.logits(ref, b), atol=parity.TOL, rtol=0)


def test_qdora_in_inference_mode(folders) -> None:
    """Eval mode without grad: bitsandbytes' CPU kernel may repack the 4-bit weight in place
    (AVX512-BF16 CPUs); DoRA's norm then reads the weight the layer applies."""
    pm = peft_core.apply(_load(folders["llama"], "llama"), {"name": "dora", "rank": 4})
    parity._perturb(pm)
    b = tiny.batch("llama")
    pm.train()
    with torch.no_grad():
        train_mode = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    pm.eval()
    first, second = tiny.logits(pm, b), tiny.logits(pm, b)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    # The repacked kernel keeps block scales in bf16: close to the training-mode output.
    torch.testing.assert_close(first, train_mode, atol=2e-2, rtol=0)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_from_a_4bit_base_loads_onto_both_bases(method: str, folders, tmp_path) -> None:
    ours = peft_core.apply(_load(folders["llama"], "llama"), {"name": method, "rank": 4})
    parity._perturb(ours)
    b = tiny.batch("llama")
    expected = tiny.logits(ours, b)
    ours.save(tmp_path / "a")
    again = peft_core.load_adapter(_load(folders["llama"], "llama"), tmp_path / "a")
    torch.testing.assert_close(tiny.logits(again, b), expected, atol=0, rtol=0)
    full = peft_core.load_adapter(_load(folders["llama"], "llama", None), tmp_path / "a")
    for (n, p), (m, q) in zip(ours.trainable_parameters(), full.trainable_parameters()):
        assert n == m
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    # The full-precision base differs from the 4-bit one only by the quantization error.
    q_err = (
        (
            tiny.logits(_load(folders["llama"], "llama"), b)
            - tiny.logits(_load(folders["llama"], "llama", None), b)
        )
        .abs()
        .max()
    )
    assert (tiny.logits(full, b) - expected).abs().max() < 3 * q_err + 1e-4
    # ... and another base is still refused.
    with pytest.raises(peft_core.FingerprintMismatchError, match="weights_sha256"):
        peft_core.load_adapter(_small("llama", seed=1), tmp_path / "a")


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "vera"])
def test_merging_into_a_quantized_base_refuses(method: str, folders) -> None:
    pm = peft_core.apply(_load(folders["llama"], "llama"), {"name": method})
    with pytest.raises(peft_core.PeftError, match="quantized"):
        pm.merge()


@pytest.mark.parametrize("method", ["full", "pafi", "sam", "diff_pruning"])
def test_methods_writing_base_weights_refuse(method: str, folders) -> None:
    with pytest.raises(peft_core.PeftError, match=f"method '{method}' trains the base weights"):
        peft_core.apply(_load(folders["llama"], "llama"), {"name": method})


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rewriting_inits_refuse_a_quantized_base(init: str, folders) -> None:
    with pytest.raises(peft_core.PeftError, match="quantized"):
        peft_core.apply(_load(folders["llama"], "llama"), {"name": "lora", "init": init})


FROZEN_BASE_METHODS = [m for m in peft_core.available() if not peft_core.get(m).writes_base_weights]


@pytest.mark.parametrize("method", FROZEN_BASE_METHODS)
def test_every_frozen_base_method_trains_on_a_4bit_base(method: str, folders) -> None:
    """The registry-wide check: each method that keeps the base frozen trains on top of it."""
    torch.manual_seed(0)
    pm = peft_core.apply(_load(folders["llama"], "llama"), {"name": method})
    b = tiny.batch("llama")
    pm.prepare([b])
    pm.train()
    opt = torch.optim.AdamW(pm.param_groups(lr=3e-3))
    losses = []
    for _ in range(6):
        out = pm(**b)
        reg = pm.regularizer()
        opt.zero_grad()
        (out.loss if reg is None else out.loss + reg).backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0], f"{method}: {losses}"
    assert all(not isinstance(p, bnb.nn.Params4bit) for _, p in pm.trainable_parameters())


def _lora_grads(pm) -> dict[str, torch.Tensor]:
    pm.train()
    pm.zero_grad(set_to_none=True)
    pm(**tiny.batch("llama")).loss.backward()
    return {n: p.grad.clone() if p.grad is not None else None for n, p in pm.trainable_parameters()}


def test_evaluating_between_steps_keeps_the_base_in_the_gradient(folders) -> None:
    """An eval forward without grad must not switch a 4-bit layer to bitsandbytes' CPU
    inference kernel (no backward) for the steps after it: LoRA on q/v only, so every
    gradient passes through unwrapped 4-bit layers (o_proj, the MLP)."""
    pm = peft_core.apply(_load(folders["llama"], "llama"),
                         {"name": "lora", "rank": 4, "target_modules": ["q_proj", "v_proj"]})
    parity._perturb(pm)
    before = _lora_grads(pm)
    pm.eval()
    with torch.no_grad():
        pm(**tiny.batch("llama"))
    after = _lora_grads(pm)
    assert before.keys() == after.keys() and before
    for name, grad in before.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert after[name] is not None, f"{name}: no gradient after an eval forward"
        torch.testing.assert_close(after[name], grad, atol=1e-6, rtol=0)


def test_a_base_repacked_for_cpu_inference_is_refused(folders) -> None:
    base = _load(folders["llama"], "llama")
    layer = next(m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit))
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    with torch.no_grad():
        base(**tiny.batch("llama"))  # eval mode, no grad: bitsandbytes repacks in place
    with pytest.raises(peft_core.PeftError, match="freshly loaded base"):
        peft_core.apply(base, {"name": "lora"})


def test_dora_on_8bit_base_is_the_weight_decomposition(folders) -> None:
    """QDoRA on LLM.int8 layers against the formula on the dequantized weight (peft is no
    oracle here: on CPU its 8-bit DoRA re-wraps the int8 weight while dequantizing, and its
    outputs then drift from the formula by ~0.2)."""
    from peft_core.methods import _weights

    q8 = {"load_in_8bit": True, "llm_int8_skip_modules": HEADS}
    pm = peft_core.apply(_load(folders["llama"], "llama", q8), {"name": "dora", "rank": 4})
    parity._perturb(pm)
    pm.train()
    layer = pm.base_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base, bnb.nn.Linear8bitLt)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        w = _weights.read_weight(layer.base) + layer.delta_weight()
        k = layer.lora_magnitude / torch.linalg.norm(w, dim=1)
        torch.testing.assert_close(layer(x), x @ (k[:, None] * w).T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_4bit_base_counts_its_unpacked_parameters(arch: str, folders) -> None:
    """The trainable fraction of QLoRA is taken of the same total as LoRA's: bitsandbytes
    packs two 4-bit values a byte, but a weight still holds out x in parameters."""
    full = peft_core.apply(_load(folders[arch], arch, quant=None), {"name": "lora", "rank": 4})
    q4 = peft_core.apply(_load(folders[arch], arch), {"name": "lora", "rank": 4})
    assert any(type(p).__name__ == "Params4bit" for p in q4.base_model.parameters())
    packed = sum(p.numel() for p in q4.base_model.parameters())
    s_full, s_q4 = full.summary(), q4.summary()
    assert s_q4["total_params"] == s_full["total_params"] > packed
    assert s_q4["trainable_params"] == s_full["trainable_params"] > 0
    assert s_q4["trainable_fraction"] == pytest.approx(s_full["trainable_fraction"])
