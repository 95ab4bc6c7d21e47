"""Numerical parity of our LoRA family with Hugging Face ``peft`` (the test oracle)."""

from __future__ import annotations

import pytest
import torch

import peft_core
from peft_core.methods.lora import lora_layers
from tests import tiny

peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 8.0


def _pair(arch: str, method: str = "lora"):
    ours = peft_core.apply(tiny.model(arch), {"name": method, "rank": RANK, "alpha": ALPHA})
    names = sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(ours.base_model)})
    ref_cfg = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=names,
        fan_in_fan_out=(arch == "gpt2"), init_lora_weights=True,
    )
    ref = peft.get_peft_model(tiny.model(arch), ref_cfg)
    g = torch.Generator().manual_seed(5)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(ours.base_model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
            for which in ("lora_A", "lora_B"):
                ref_params[f"base_model.model.{name}.{which}.default.weight"].copy_(
                    getattr(layer, which).weight
                )
    return ours, ref


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logits_and_gradients_match_peft(arch: str) -> None:
    ours, ref = _pair(arch)
    b = tiny.batch(arch)
    out_ours, out_ref = ours(**b), ref(**b)
    torch.testing.assert_close(out_ours.logits, out_ref.logits, atol=1e-5, rtol=0)
    out_ours.loss.backward()
    out_ref.loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, layer in lora_layers(ours.base_model):
        for which in ("lora_A", "lora_B"):
            got = getattr(layer, which).weight.grad
            want = ref_params[f"base_model.model.{name}.{which}.default.weight"].grad
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "lora_plus", "moslora"])
def test_export_loads_in_peft(arch: str, method: str, tmp_path) -> None:
    ours = peft_core.apply(tiny.model(arch), {"name": method, "rank": RANK, "alpha": ALPHA})
    with torch.no_grad():
        for _, p in ours.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours.export_hf(tmp_path / "hf")
    ref = peft.PeftModel.from_pretrained(tiny.model(arch), tmp_path / "hf")
    b = tiny.batch(arch)
    torch.testing.assert_close(tiny.logits(ref, b), tiny.logits(ours, b), atol=1e-5, rtol=0)


def test_export_with_classification_head_loads_in_peft(tmp_path) -> None:
    ours = peft_core.apply(tiny.model("bert"), {"name": "lora", "rank": RANK, "alpha": ALPHA})
    with torch.no_grad():
        for _, p in ours.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours.export_hf(tmp_path / "hf")
    ref = peft.PeftModel.from_pretrained(tiny.model("bert"), tmp_path / "hf")
    b = tiny.batch("bert")
    torch.testing.assert_close(tiny.logits(ref, b), tiny.logits(ours, b), atol=1e-5, rtol=0)


def test_lora_plus_groups_match_peft_optimizer() -> None:
    ours, ref = _pair("llama", "lora_plus")
    lr, ratio = 1e-3, 16.0
    from peft.optimizers import create_loraplus_optimizer

    ref_opt = create_loraplus_optimizer(
        ref, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio
    )
    ref_lr = {}
    names = {id(p): n for n, p in ref.named_parameters()}
    for group in ref_opt.param_groups:
        for p in group["params"]:
            ref_lr[names[id(p)].replace(".default", "").removeprefix("base_model.model.")] = group[
                "lr"
            ]
    our_lr = {}
    names = {id(p): n for n, p in ours.base_model.named_parameters()}
    for group in ours.param_groups(lr):
        assert group["params"], "no empty parameter group may reach the optimizer"
        for p in group["params"]:
            our_lr[names[id(p)]] = group["lr"]
    assert our_lr == pytest.approx(ref_lr)
    assert {v for v in our_lr.values()} == {lr, lr * ratio}


def test_moslora_with_identity_mixer_is_lora() -> None:
    lora = peft_core.apply(tiny.model("llama"), {"name": "lora", "rank": RANK})
    mos = peft_core.apply(
        tiny.model("llama"), {"name": "moslora", "rank": RANK, "mixer_init": "identity"}
    )
    with torch.no_grad():
        for (_, a), (_, m) in zip(lora_layers(lora.base_model), lora_layers(mos.base_model)):
            a.lora_B.weight.normal_()
            m.lora_A.weight.copy_(a.lora_A.weight)
            m.lora_B.weight.copy_(a.lora_B.weight)
    b = tiny.batch("llama")
    torch.testing.assert_close(tiny.logits(mos, b), tiny.logits(lora, b), atol=1e-6, rtol=0)
