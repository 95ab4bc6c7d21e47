"""Properties every registered method must have, on tiny Llama, GPT-2 and BERT models.

Parametrised over ``peft_core.available()``, so a newly registered method is tested here
without new code.
"""

from __future__ import annotations

import pytest
import torch

import peft_core
from tests import tiny

METHODS = peft_core.available()


def _applied(method: str, arch: str, seed: int = 0) -> peft_core.PeftModel:
    pm = peft_core.apply(tiny.model(arch, seed), {"name": method})
    pm.prepare([tiny.batch(arch, seed=7)])
    return pm


def _perturb(pm: peft_core.PeftModel, seed: int = 3) -> None:
    """Move every adapter tensor away from its (often zero) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method: str, arch: str) -> None:
    if not peft_core.get(method).identity_at_init:
        pytest.skip(f"{method} changes the output at initialisation by design")
    b = tiny.batch(arch)
    expected = tiny.logits(tiny.model(arch), b)
    got = tiny.logits(_applied(method, arch), b)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_only_method_params_get_gradients(method: str, arch: str) -> None:
    pm = _applied(method, arch)
    pm.train()
    trainable = {n for n, _ in pm.trainable_parameters()}
    assert trainable, "a method must train something"
    loss = pm(**tiny.batch(arch)).loss
    reg = pm.regularizer()
    (loss if reg is None else loss + reg).backward()
    with_grad = {n for n, p in pm.base_model.named_parameters() if p.grad is not None}
    assert with_grad <= trainable, (
        f"frozen params got gradients: {sorted(with_grad - trainable)[:5]}"
    )
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for _, p in pm.trainable_parameters()
    ), "no trainable parameter received a non-zero gradient"
    frac = pm.summary()["trainable_fraction"]
    assert 0 < frac <= 1


@pytest.mark.parametrize("method", METHODS)
def test_save_load_roundtrip(method: str, arch: str, tmp_path) -> None:
    pm = _applied(method, arch)
    _perturb(pm)
    b = tiny.batch(arch)
    expected = tiny.logits(pm, b)
    pm.save(tmp_path / "adapter")
    loaded = peft_core.load_adapter(tiny.model(arch), tmp_path / "adapter")
    torch.testing.assert_close(tiny.logits(loaded, b), expected, atol=1e-6, rtol=0)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter.safetensors",
        "adapter_config.json",
    ]


@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge(method: str, arch: str) -> None:
    pm = _applied(method, arch)
    _perturb(pm)
    if not peft_core.get(method).mergeable:
        with pytest.raises(peft_core.NotMergeableError, match="cannot be merged"):
            pm.merge()
        return
    b = tiny.batch(arch)
    before = {k: v.clone() for k, v in pm.base_model.state_dict().items()}
    unmerged_out = tiny.logits(pm, b)
    pm.merge()
    torch.testing.assert_close(tiny.logits(pm, b), unmerged_out, atol=1e-5, rtol=1e-5)
    pm.unmerge()
    for k, v in pm.base_model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("method", METHODS)
def test_loss_goes_down(method: str, arch: str) -> None:
    torch.manual_seed(0)
    pm = _applied(method, arch)
    pm.train()
    opt = torch.optim.AdamW(pm.param_groups(lr=3e-3))
    b = tiny.batch(arch)
    losses = []
    for _ in range(10):
        out = pm(**b)
        reg = pm.regularizer()
        loss = out.loss if reg is None else out.loss + reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    pm.finalize([b])
    pm.eval()
    final = pm(**b).loss.item()
    assert final < losses[0] - 1e-3, f"{method}: loss {losses[0]:.4f} -> {final:.4f} ({losses})"
