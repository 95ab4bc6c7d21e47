"""Parity of DoRA, IA3, VeRA and LoRA's initialisations with Hugging Face ``peft`` (the oracle).

For each method and tiny architecture: both libraries wrap the same base weights; our
adapter tensors (moved off their init) are copied into peft's; logits and every adapter
gradient must agree within 1e-5 (fp32), and our ``export_hf`` folder must load in peft and
give our outputs. PiSSA/OLoRA are compared without copying: both compute their factors and
residual base from the same weight.
"""

from __future__ import annotations

import re

import pytest
import torch

import peft_core
from peft_core.layers import MergeableLayer
from tests import tiny

peft = pytest.importorskip("peft")

ARCHS = ["llama", "gpt2", "bert"]
RANK, ALPHA = 4, 8.0
TOL = 1e-5


def _exact(names: list[str]) -> str:
    return "^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def _wrapped(pm: peft_core.PeftModel) -> list[str]:
    return sorted(n for n, m in pm.base_model.named_modules() if isinstance(m, MergeableLayer))


def _ref_config(method: str, ours: peft_core.PeftModel, arch: str, init: str = "kaiming"):
    layers = _wrapped(ours)
    tm = _exact(layers)
    fan = arch == "gpt2"
    if method in ("lora", "dora"):
        return peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=tm, fan_in_fan_out=fan,
            use_dora=(method == "dora"), init_lora_weights=True if init == "kaiming" else init,
        )
    if method == "ia3":
        ff = [n for n, m in ours.base_model.named_modules() if getattr(m, "feedforward", False)]
        return peft.IA3Config(target_modules=tm, feedforward_modules=_exact(ff) if ff else [],
                              fan_in_fan_out=fan)
    return peft.VeraConfig(r=RANK, target_modules=tm, fan_in_fan_out=fan, projection_prng_key=0,
                           save_projection=True, d_initial=0.1)


def _ours(method: str, arch: str, **kw) -> peft_core.PeftModel:
    cfg = {"name": method, **kw}
    if method in ("lora", "dora"):
        cfg.update(rank=RANK, alpha=ALPHA)
    if method == "vera":
        cfg.update(rank=RANK)
    return peft_core.apply(tiny.model(arch), cfg)


def _ref_name(method: str, ours_name: str) -> str:
    """Our adapter parameter name -> peft's (adapter "default")."""
    module, leaf = ours_name.rsplit(".", 1)
    if leaf == "lora_magnitude":
        return f"base_model.model.{module}.lora_magnitude_vector.default.weight"
    if leaf == "weight" and module.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
        layer, which = module.rsplit(".", 1)
        return f"base_model.model.{layer}.{which}.default.weight"
    return f"base_model.model.{module}.{leaf}.default"


def _adapter_params(pm: peft_core.PeftModel) -> list[tuple[str, torch.nn.Parameter]]:
    heads = tuple(h + "." for h in peft_core.targets.new_task_heads(pm.base_model))
    return [(n, p) for n, p in pm.trainable_parameters() if not n.startswith(heads)]


def _perturb(pm: peft_core.PeftModel, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in _adapter_params(pm):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _pair(method: str, arch: str):
    ours = _ours(method, arch)
    _perturb(ours)
    ref = peft.get_peft_model(tiny.model(arch), _ref_config(method, ours, arch))
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in _adapter_params(ours):
            dst = ref_params[_ref_name(method, n)]
            dst.copy_(p.reshape(dst.shape))
    return ours, ref


def _compare_grads(method: str, ours, ref) -> float:
    ref_params = dict(ref.named_parameters())
    worst = 0.0
    for n, p in _adapter_params(ours):
        want = ref_params[_ref_name(method, n)].grad
        assert p.grad is not None and want is not None, n
        torch.testing.assert_close(p.grad, want.reshape(p.shape), atol=TOL, rtol=0,
                                   msg=lambda m, n=n: f"{n}: {m}")
        worst = max(worst, (p.grad - want.reshape(p.shape)).abs().max().item())
    return worst


def _assert_training_step_matches(method: str, ours, ref, b: dict) -> None:
    """In training mode our logits and adapter gradients equal peft's."""
    ours.train()
    ref.train()
    out_ours, out_ref = ours(**b), ref(**b)
    torch.testing.assert_close(out_ours.logits, out_ref.logits, atol=TOL, rtol=0)
    out_ours.loss.backward()
    out_ref.loss.backward()
    _compare_grads(method, ours, ref)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["dora", "ia3", "vera"])
def test_logits_and_gradients_match_peft(method: str, arch: str) -> None:
    ours, ref = _pair(method, arch)
    _assert_training_step_matches(method, ours, ref, tiny.batch(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_vera_projections_are_peft_s(arch: str) -> None:
    ours = _ours("vera", arch)
    ref = peft.get_peft_model(tiny.model(arch), _ref_config("vera", ours, arch))
    shared = ours.base_model.peft_vera
    torch.testing.assert_close(shared.vera_A, ref.base_model.vera_A["default"], atol=0, rtol=0)
    torch.testing.assert_close(shared.vera_B, ref.base_model.vera_B["default"], atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["dora", "ia3", "vera"])
def test_export_loads_in_peft(method: str, arch: str, tmp_path) -> None:
    ours = _ours(method, arch)
    _perturb(ours)
    with torch.no_grad():  # a trained head too, so modules_to_save is exercised on BERT
        for n, p in ours.trainable_parameters():
            if (n, p) not in _adapter_params(ours):
                p.add_(0.1)
    ours.export_hf(tmp_path / "hf")
    ref = peft.PeftModel.from_pretrained(tiny.model(arch), tmp_path / "hf")
    b = tiny.batch(arch)
    torch.testing.assert_close(tiny.logits(ref, b), tiny.logits(ours, b), atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["dora", "ia3", "vera"])
def test_merged_matches_peft_merged(method: str, arch: str) -> None:
    ours, ref = _pair(method, arch)
    ours.merge()
    merged = ref.merge_and_unload()
    b = tiny.batch(arch)
    torch.testing.assert_close(tiny.logits(ours, b), tiny.logits(merged, b), atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "vera"])
def test_expected_trainable_params(method: str, arch: str) -> None:
    ours = _ours(method, arch)
    assert (ours.method.expected_trainable_params(tiny.model(arch))
            == ours.summary()["trainable_params"])
    assert (
        ours.method.expected_trainable_params(ours.base_model) == ours.summary()["trainable_params"]
    )


# -- LoRA initialisations -------------------------------------------------------------------


def _peft_base_weight(ref, name: str) -> torch.Tensor:
    layer = ref.get_submodule(f"base_model.model.{name}").get_base_layer()
    return layer.weight


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_rewriting_inits_match_peft(method: str, init: str, arch: str) -> None:
    if init == "olora" and arch == "gpt2":
        pytest.skip(
            "peft's OLoRA factorises GPT-2's Conv1D weight in its stored (in, out) "
            "layout and fails on it; ours uses the (out, in) matrix"
        )
    ours = _ours(method, arch, init=init)
    ref = peft.get_peft_model(tiny.model(arch), _ref_config(method, ours, arch, init=init))
    ref_params = dict(ref.named_parameters())
    for name, layer in peft_core.methods.lora.lora_layers(ours.base_model):
        for which in ("lora_A", "lora_B"):
            torch.testing.assert_close(
                getattr(layer, which).weight,
                ref_params[f"base_model.model.{name}.{which}.default.weight"], atol=TOL, rtol=0,
            )
        torch.testing.assert_close(
            layer.base.weight, _peft_base_weight(ref, name), atol=TOL, rtol=0
        )
    b = tiny.batch(arch)
    # The rewrite keeps the output at init (up to the SVD/QR's rounding).
    torch.testing.assert_close(
        tiny.logits(ours, b), tiny.logits(tiny.model(arch), b), atol=1e-5, rtol=0
    )
    _assert_training_step_matches(method, ours, ref, b)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rewriting_inits_save_load_and_export(init: str, arch: str, tmp_path) -> None:
    """Our folder onto a fresh (unmodified) base reproduces the outputs; the peft export,
    converted to a rank-2r LoRA on the original weight, loads onto the untouched base."""
    ours = _ours("lora", arch, init=init)
    _perturb(ours)
    b = tiny.batch(arch)
    expected = tiny.logits(ours, b)
    ours.save(tmp_path / "ours")
    loaded = peft_core.load_adapter(tiny.model(arch), tmp_path / "ours")
    torch.testing.assert_close(tiny.logits(loaded, b), expected, atol=TOL, rtol=0)
    ours.export_hf(tmp_path / "hf")
    ref = peft.PeftModel.from_pretrained(tiny.model(arch), tmp_path / "hf")
    assert ref.peft_config["default"].r == 2 * RANK
    torch.testing.assert_close(tiny.logits(ref, b), expected, atol=TOL, rtol=0)
    # Merging gives the fine-tuned weights; unmerging the residual base again.
    ours.merge()
    torch.testing.assert_close(tiny.logits(ours, b), expected, atol=TOL, rtol=0)


def test_gaussian_init_is_peft_s() -> None:
    torch.manual_seed(0)
    ours = _ours("lora", "llama", init="gaussian")
    for _, layer in peft_core.methods.lora.lora_layers(ours.base_model):
        assert torch.count_nonzero(layer.lora_B.weight) == 0
        # peft: A ~ N(0, 1/r); a 4 x 32 sample's std is within 30% of 1/r.
        assert abs(layer.lora_A.weight.std().item() * RANK - 1) < 0.3


def test_default_init_is_unchanged() -> None:
    """``kaiming`` is the default and gives the draw LoRA always had from the same seed."""
    torch.manual_seed(0)
    a = _ours("lora", "llama")
    torch.manual_seed(0)
    b = _ours("lora", "llama", init="kaiming")
    assert a.method.config.init == "kaiming"
    for (_, x), (_, y) in zip(
        peft_core.methods.lora.lora_layers(a.base_model),
        peft_core.methods.lora.lora_layers(b.base_model),
    ):
        torch.testing.assert_close(x.lora_A.weight, y.lora_A.weight, atol=0, rtol=0)
