"""Selective methods (``pafi``, ``sam``, ``diff_pruning``): which entries train, the budget,
what merging changes and what the adapter file holds."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

import peft_core
from peft_core import targets
from peft_core.methods._sparse import budget_count, sparse_layers
from peft_core.methods.selective import DiffPruningLayer, diff_pruning_layers, sam_scores
from tests import tiny

SELECTIVE = ("pafi", "sam", "diff_pruning")


def _wrapped(pm: peft_core.PeftModel) -> list[tuple[str, torch.nn.Module]]:
    model = pm.base_model
    return sparse_layers(model) or diff_pruning_layers(model)


def _train(pm: peft_core.PeftModel, arch: str, steps: int = 6, lr: float = 1e-2) -> None:
    pm.prepare([tiny.batch(arch, seed=7)])
    pm.train()
    opt = torch.optim.AdamW(pm.param_groups(lr=lr))
    b = tiny.batch(arch)
    for _ in range(steps):
        loss = pm(**b).loss
        reg = pm.regularizer()
        opt.zero_grad()
        (loss if reg is None else loss + reg).backward()
        opt.step()
    pm.finalize([b])
    pm.eval()


def _mask(layer: torch.nn.Module) -> torch.Tensor:
    if isinstance(layer, DiffPruningLayer):
        return layer.delta_weight(sample=False) != 0
    return layer.mask()


@pytest.mark.parametrize("method", SELECTIVE)
def test_only_masked_entries_move_and_the_file_holds_only_them(
    method: str, arch: str, tmp_path
) -> None:
    torch.manual_seed(0)
    reference = dict(tiny.model(arch).named_modules())
    pm = peft_core.apply(tiny.model(arch), {"name": method, "budget": 0.01})
    _train(pm, arch)
    layers = _wrapped(pm)
    total = sum(layer.numel for _, layer in layers)
    k = budget_count(total, 0.01)
    masks = {name: _mask(layer) for name, layer in layers}
    assert sum(int(m.sum()) for m in masks.values()) == k

    pm.save(tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    heads = targets.new_task_heads(pm.base_model)
    for key in saved:
        assert key.endswith((".sparse_idx", ".sparse_delta")) or any(
            key.startswith(h + ".") for h in heads
        ), key
    assert sum(saved[f"{n}.sparse_idx"].numel() for n, _ in layers) == k
    assert sum(saved[f"{n}.sparse_delta"].numel() for n, _ in layers) == k

    b = tiny.batch(arch)
    unmerged = tiny.logits(pm, b)
    pm.merge()
    torch.testing.assert_close(tiny.logits(pm, b), unmerged, atol=1e-5, rtol=1e-5)
    moved = 0
    for name, layer in layers:
        w0 = targets.dense_weight(reference[name])
        diff = targets.dense_weight(layer.base) - w0
        assert not diff[~masks[name]].any(), f"{name}: an entry outside the mask changed"
        idx = saved[f"{name}.sparse_idx"].long()
        # The merge adds exactly the saved values at the saved positions.
        torch.testing.assert_close(
            diff.reshape(-1)[idx], saved[f"{name}.sparse_delta"], atol=1e-6, rtol=1e-6
        )
        assert torch.equal(
            torch.sort(idx).values, torch.nonzero(masks[name].reshape(-1)).reshape(-1)
        )
        moved += int(diff.ne(0).sum())
    assert moved > k // 2, "training moved almost nothing"
    # Nothing else in the model changed (bar a new classification head, which trains).
    wrapped = {n for n, _ in layers}
    for name, p in pm.base_model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if (
            any(name.startswith(h + ".") for h in heads)
            or owner.rsplit(".", 1)[0] in wrapped
            or owner in wrapped
        ):
            continue
        torch.testing.assert_close(
            p, reference[owner].get_parameter(name.rsplit(".", 1)[1]), atol=0, rtol=0
        )

    loaded = peft_core.load_adapter(tiny.model(arch), tmp_path / "adapter")
    torch.testing.assert_close(tiny.logits(loaded, b), unmerged, atol=1e-6, rtol=0)


@pytest.mark.parametrize("budget", [0.005, 0.02])
@pytest.mark.parametrize("method", ("pafi", "sam"))
def test_budget_is_met(method: str, budget: float, arch: str) -> None:
    pm = peft_core.apply(tiny.model(arch), {"name": method, "budget": budget})
    pm.prepare([tiny.batch(arch, seed=7)])
    layers = _wrapped(pm)
    total = sum(layer.numel for _, layer in layers)
    chosen = sum(layer.sparse_idx.numel() for _, layer in layers)
    assert abs(chosen / total - budget) / budget < 0.01
    assert (
        sum(p.numel() for n, p in pm.trainable_parameters() if n.endswith(".sparse_delta"))
        == chosen
    )
    # the count `peftpipe methods` prints, from the base model alone
    assert pm.method.expected_trainable_params(tiny.model(arch)) == pm.summary()["trainable_params"]


@pytest.mark.parametrize("budget", [0.005, 0.02])
def test_diff_pruning_reaches_its_sparsity_target(budget: float, arch: str) -> None:
    torch.manual_seed(0)
    pm = peft_core.apply(tiny.model(arch), {"name": "diff_pruning", "budget": budget})
    _train(pm, arch, steps=8)
    density = pm.method.density(pm.base_model)
    assert abs(density - budget) / budget < 0.01, density
    # After the projection the gates are pinned: the L0 term reports the kept fraction.
    torch.testing.assert_close(float(pm.regularizer().detach()), density, atol=1e-6, rtol=0)


def test_pafi_mask_is_the_brute_force_smallest_magnitudes(arch: str) -> None:
    base = tiny.model(arch)
    pm = peft_core.apply(tiny.model(arch), {"name": "pafi", "budget": 0.01})
    layers = sparse_layers(pm.base_model)
    modules = dict(base.named_modules())
    # Brute force: every (module, row, col) entry of the original weights, sorted by |w|.
    entries = []
    for name, _ in layers:
        w = targets.dense_weight(modules[name]).detach()
        for r in range(w.shape[0]):
            for c in range(w.shape[1]):
                entries.append((abs(float(w[r, c])), name, r * w.shape[1] + c))
    entries.sort()
    k = budget_count(len(entries), 0.01)
    expected = {(name, i) for _, name, i in entries[:k]}
    got = {(name, int(i)) for name, layer in layers for i in layer.sparse_idx}
    assert got == expected


def _brute_force_sam(arch: str, batches: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    """Σ_b (∂L_b/∂W)² on the plain model (no peft_core involved), in (out, in) layout."""
    model = tiny.model(arch)
    modules = dict(model.named_modules())
    for n in names:
        modules[n].weight.requires_grad_(True)
    scores = {n: 0.0 for n in names}
    for b in batches:
        model.zero_grad()
        model(**b).loss.backward()
        for n in names:
            g = modules[n].weight.grad
            scores[n] = scores[n] + (g.T if targets.is_conv1d(modules[n]) else g).square()
    return scores


def test_sam_scores_and_mask_match_brute_force(arch: str) -> None:
    batches = [tiny.batch(arch, seed=s) for s in (7, 8, 9)]
    pm = peft_core.apply(tiny.model(arch), {"name": "sam", "budget": 0.01})
    names = [n for n, _ in sparse_layers(pm.base_model)]
    got = sam_scores(pm, batches)
    expected = _brute_force_sam(arch, batches, names)
    for n in names:
        torch.testing.assert_close(got[n], expected[n].float(), rtol=1e-4, atol=1e-12)

    pm.prepare(batches)
    ranked = sorted(
        (
            (float(expected[n].reshape(-1)[i]), n, i)
            for n in names
            for i in range(expected[n].numel())
        ),
        reverse=True,
    )
    k = budget_count(len(ranked), 0.01)
    want = {(n, i) for _, n, i in ranked[:k]}
    assert {
        (n, int(i)) for n, layer in sparse_layers(pm.base_model) for i in layer.sparse_idx
    } == want


def test_sam_gradient_matches_finite_differences() -> None:
    # The gradient behind the score, against central differences in float64, a few entries.
    arch = "bert"
    b = tiny.batch(arch, seed=7)
    pm = peft_core.apply(tiny.model(arch).double(), {"name": "sam", "budget": 0.01})
    name, layer = sparse_layers(pm.base_model)[0]
    score = sam_scores(pm, [b])[name]
    w = targets.dense_weight(layer.base)
    h = 1e-6
    for r, c in [(0, 0), (3, 5), (7, 2)]:
        with torch.no_grad():
            w[r, c] += h
            up = float(pm(**b).loss)
            w[r, c] -= 2 * h
            down = float(pm(**b).loss)
            w[r, c] += h
        g = (up - down) / (2 * h)
        assert math.isclose(float(score[r, c]), g * g, rel_tol=1e-4, abs_tol=1e-14)


def test_sam_before_prepare_is_the_base_model_and_refuses_an_optimizer(arch: str) -> None:
    b = tiny.batch(arch)
    pm = peft_core.apply(tiny.model(arch), {"name": "sam"})
    assert all(layer.sparse_idx.numel() == 0 for _, layer in sparse_layers(pm.base_model))
    torch.testing.assert_close(tiny.logits(pm, b), tiny.logits(tiny.model(arch), b), atol=0, rtol=0)
    with pytest.raises(peft_core.PeftError, match="prepare"):
        pm.param_groups(lr=1e-3)


def test_sam_mask_survives_save_and_load(tmp_path) -> None:
    arch = "gpt2"
    pm = peft_core.apply(tiny.model(arch), {"name": "sam", "budget": 0.02})
    pm.prepare([tiny.batch(arch, seed=7)])
    pm.save(tmp_path / "a")
    loaded = peft_core.load_adapter(tiny.model(arch), tmp_path / "a")
    for (n1, l1), (n2, l2) in zip(sparse_layers(pm.base_model), sparse_layers(loaded.base_model)):
        assert n1 == n2 and torch.equal(l1.sparse_idx, l2.sparse_idx)


def test_hard_concrete_gate_matches_its_expected_l0() -> None:
    torch.manual_seed(0)
    # 20000 rows of the same four gate logits: one sample of the layer is 20000 draws each.
    base = torch.nn.Linear(4, 20000)
    cfg = peft_core.MethodConfig.from_dict({"name": "diff_pruning"})
    layer = DiffPruningLayer(base, cfg)
    logits = torch.tensor([-3.0, -0.5, 0.5, 3.0])
    with torch.no_grad():
        layer.dp_log_alpha.copy_(logits.expand(20000, 4))
    z = layer.gate(sample=True).detach()
    assert z.min() >= 0 and z.max() <= 1
    p_nonzero = (z > 0).double().mean(0)
    shift = cfg.temperature * math.log(-cfg.gate_lower / cfg.gate_upper)
    analytic = torch.sigmoid(logits.double() - shift)
    torch.testing.assert_close(p_nonzero, analytic, atol=0.015, rtol=0)
    torch.testing.assert_close(
        layer.expected_l0().detach().double(), 20000 * analytic.sum(), rtol=1e-5, atol=0
    )
    # Both ends of the stretched interval are reached with positive probability (hard zeros).
    assert (z == 0).any() and (z == 1).any()
    # The deterministic gate: clamp(sigmoid(log α)(r - l) + l, 0, 1).
    det = (
        torch.sigmoid(layer.dp_log_alpha) * (cfg.gate_upper - cfg.gate_lower) + cfg.gate_lower
    ).clamp(0, 1)
    torch.testing.assert_close(layer.gate(sample=False), det)


def test_l0_penalty_closes_gates() -> None:
    torch.manual_seed(0)
    pm = peft_core.apply(tiny.model("llama"), {"name": "diff_pruning", "l0_weight": 1.0})
    before = float(pm.regularizer().detach())
    pm.regularizer().backward()
    grads = [layer.dp_log_alpha.grad for _, layer in diff_pruning_layers(pm.base_model)]
    assert all(bool((g > 0).all()) for g in grads)  # descent lowers every gate logit
    assert 0.99 < before <= 1.0  # gates start open: expected density near 1


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"name": "pafi", "budget": 0.0}, "pafi.budget"),
        ({"name": "sam", "budget": 1.5}, "sam.budget"),
        ({"name": "diff_pruning", "gate_lower": 0.1}, "diff_pruning.gate_lower"),
    ],
)
def test_bad_config_names_the_field(cfg: dict, field: str) -> None:
    with pytest.raises(peft_core.ConfigError, match=field.replace(".", r"\.")):
        peft_core.MethodConfig.from_dict(cfg)


def test_sam_prepare_leaves_every_module_in_its_own_mode() -> None:
    pm = peft_core.apply(tiny.model("bert"), {"name": "sam"})  # wrapper trains, base is eval
    modes = {n: m.training for n, m in pm.named_modules()}
    assert len(set(modes.values())) == 2
    pm.prepare([tiny.batch("bert")])
    assert {n: m.training for n, m in pm.named_modules()} == modes
    assert not any(layer.base.weight.requires_grad for _, layer in sparse_layers(pm.base_model))


def test_diff_pruning_second_phase_trains_only_the_kept_entries(arch: str, tmp_path) -> None:
    # The paper's second phase, driven as the training loop drives it (on_step before each
    # optimizer step): gated steps, then the projection to the budget, then fixed-mask steps.
    torch.manual_seed(0)
    budget, steps = 0.01, 10
    pm = peft_core.apply(
        tiny.model(arch),
        {
            "name": "diff_pruning",
            "budget": budget,
            "fixed_mask_fraction": 0.5,
            "gate_lr_ratio": 10.0,
            "fixed_mask_lr_ratio": 5.0,
        },
    )
    assert pm.method.mask_fix_step(steps) == 5
    groups = {g["name"]: g for g in pm.param_groups(lr=1e-2, weight_decay=0.1)}
    assert groups["gates"]["lr"] == pytest.approx(0.1) and groups["gates"]["weight_decay"] == 0.0
    opt = torch.optim.AdamW(pm.param_groups(lr=1e-2, weight_decay=0.1))
    layers = [layer for _, layer in diff_pruning_layers(pm.base_model)]
    b, probe = tiny.batch(arch), tiny.batch(arch, seed=3)
    at_fix = None
    pm.train()
    for step in range(steps):
        if step == 5:
            projected = copy.deepcopy(pm)
            projected.finalize([b])
        pm.method.on_step(pm, step, steps)
        if step == 5:
            assert all(layer.fixed for layer in layers)
            at_fix = [layer.delta_weight(sample=False).detach().clone() for layer in layers]
            masks = [d != 0 for d in at_fix]
            kept = sum(int(m.sum()) for m in masks)
            assert abs(kept / sum(layer.numel for layer in layers) - budget) / budget < 0.01
            # fixing the mask is the projection: the same function as finalize() gives
            pm.eval()
            fixed_logits = tiny.logits(pm, probe)
            torch.testing.assert_close(
                fixed_logits, tiny.logits(projected.eval(), probe), atol=1e-6, rtol=1e-6
            )
            pm.train()
        assert all(layer.fixed for layer in layers) == (step >= 5)
        loss = pm(**b).loss
        reg = pm.regularizer()
        if step >= 5:  # the gates no longer act: no L0 term, no gradient on their logits
            assert float(reg.detach()) == 0.0
        opt.zero_grad()
        (loss + reg).backward()
        if step >= 5:
            assert all(not layer.dp_log_alpha.grad.any() for layer in layers)
            assert all(not layer.dp_weight.grad[~m].any() for layer, m in zip(layers, masks))
        opt.step()
    after = [layer.delta_weight(sample=False).detach() for layer in layers]
    moved = 0
    for a, d, m in zip(after, at_fix, masks):
        assert not a[~m].any(), "an entry outside the fixed mask became non-zero"
        moved += int((a[m] != d[m]).sum())
    assert moved > 0.9 * kept  # the kept entries did train on

    pm.eval()
    before_finalize = tiny.logits(pm, probe)
    pm.finalize([b])
    assert not any(layer.fixed for layer in layers)
    torch.testing.assert_close(tiny.logits(pm, probe), before_finalize, atol=1e-6, rtol=1e-6)
    assert abs(pm.method.density(pm.base_model) - budget) / budget < 0.01
    assert not torch.allclose(before_finalize, fixed_logits)
    pm.save(tmp_path / "a")
    loaded = peft_core.load_adapter(tiny.model(arch), tmp_path / "a")
    torch.testing.assert_close(tiny.logits(loaded, probe), before_finalize, atol=1e-6, rtol=1e-6)


def test_diff_pruning_checkpoint_in_the_second_phase_holds_its_function(tmp_path) -> None:
    # An adapter saved mid-second-phase (a periodic checkpoint) encodes ẑ_fixed ⊙ w.
    arch = "llama"
    torch.manual_seed(0)
    pm = peft_core.apply(tiny.model(arch), {"name": "diff_pruning", "budget": 0.02})
    opt = torch.optim.AdamW(pm.param_groups(lr=1e-2, weight_decay=0.0))
    b = tiny.batch(arch)
    pm.train()
    for step in range(4):
        pm.method.on_step(pm, step, 4)
        loss = pm(**b).loss + pm.regularizer()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(layer.fixed for _, layer in diff_pruning_layers(pm.base_model))
    pm.eval()
    pm.save(tmp_path / "a")
    loaded = peft_core.load_adapter(tiny.model(arch), tmp_path / "a")
    torch.testing.assert_close(tiny.logits(loaded, b), tiny.logits(pm, b), atol=1e-6, rtol=1e-6)
