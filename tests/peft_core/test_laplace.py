"""``laplace_lora``: curvature, prior tuning and the linearised predictive against dense
brute-force computations on a tiny BERT; the posterior saved with the adapter; metrics."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import peft_core
from peft_core.methods import laplace
from peft_core.methods.laplace.fit import pseudo_residuals
from tests import tiny

TARGETS = ["query", "value"]  # small enough for dense posteriors


def _model(hessian: str = "kfac", seed: int = 3, targets=TARGETS, **cfg) -> peft_core.PeftModel:
    pm = peft_core.apply(tiny.model("bert"), {
        "name": "laplace_lora", "rank": 2, "alpha": 4.0, "target_modules": targets,
        "hessian": hessian, "fisher": "ggn", **cfg,
    })
    # B = 0 at init would make every Jacobian w.r.t. A vanish: move off the init.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return pm.eval()


def _blocks(pm):
    return [
        (lin, post)
        for _, layer in laplace.laplace_layers(pm.base_model)
        for lin, post in layer.blocks()
    ]


def _jacobian(pm, batch, out_fn) -> list[torch.Tensor]:
    """Per block, the (B, K, P_block) Jacobian of ``out_fn(logits)`` (B, K) by autograd."""
    params = [lin.weight for lin, _ in _blocks(pm)]
    out = out_fn(pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    rows = []
    for b in range(out.shape[0]):
        per_k = []
        for k in range(out.shape[1]):
            grads = torch.autograd.grad(out[b, k], params, retain_graph=True)
            per_k.append([g.reshape(-1) for g in grads])
        rows.append(per_k)
    return [
        torch.stack(
            [torch.stack([rows[b][k][i] for k in range(out.shape[1])]) for b in range(out.shape[0])]
        )
        for i in range(len(params))
    ]


def _softmax_hessian(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(-1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def _kron_precision(post) -> torch.Tensor:
    g = post.out_vecs @ torch.diag(post.out_vals) @ post.out_vecs.T
    a = post.in_vecs @ torch.diag(post.in_vals) @ post.in_vecs.T
    return torch.kron(g, a)  # row-major vec of an (out, in) weight


def _dense_curvature(post) -> torch.Tensor:
    return (
        _kron_precision(post)
        if isinstance(post, laplace.KronPosterior)
        else torch.diag(post.hess.reshape(-1))
    )


def _ggn(pm, batch) -> list[torch.Tensor]:
    with torch.no_grad():
        logits = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lam = _softmax_hessian(logits)
    return [torch.einsum("bkp,bkl,blq->pq", j, lam, j) for j in _jacobian(pm, batch, lambda x: x)]


def test_kfac_is_the_exact_ggn_for_one_single_token_sequence() -> None:
    # One key means attention weights of exactly 1: a query adapter would get no gradient,
    # so adapt the value and the feed-forward input instead.
    pm = _model("kfac", kfac_rank=0, targets=["value", "intermediate.dense"])
    batch = {"input_ids": torch.tensor([[5]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    laplace.fit_posterior(pm, [batch])
    ggns = _ggn(pm, batch)
    scale = max(float(g.abs().max()) for g in ggns)
    assert scale > 1e-6
    for (_, post), ggn in zip(_blocks(pm), ggns):
        torch.testing.assert_close(_kron_precision(post), ggn, rtol=1e-3, atol=1e-5 * scale)


def test_diag_is_the_exact_ggn_diagonal() -> None:
    pm = _model("diag")
    batch = tiny.batch("bert", size=3)
    batch["attention_mask"][0, 8:] = 0  # padding must not matter beyond what the model does
    laplace.fit_posterior(pm, [batch])
    ggns = _ggn(pm, batch)
    scale = max(float(g.abs().max()) for g in ggns)
    for (_, post), ggn in zip(_blocks(pm), ggns):
        torch.testing.assert_close(
            post.hess.reshape(-1), torch.diagonal(ggn), rtol=1e-3, atol=1e-6 * scale
        )


def test_dataset_size_scales_the_curvature() -> None:
    batch = tiny.batch("bert", size=3)
    plain, scaled = _model("kfac"), _model("kfac", dataset_size=30)
    laplace.fit_posterior(plain, [batch])
    laplace.fit_posterior(scaled, [batch])
    for (_, p), (_, s) in zip(_blocks(plain), _blocks(scaled)):
        torch.testing.assert_close(
            _kron_precision(s), 10 * _kron_precision(p), rtol=1e-4, atol=1e-7
        )


@pytest.mark.parametrize("hessian", ["kfac", "diag"])
def test_linearised_covariance_matches_the_dense_posterior(hessian: str) -> None:
    # kfac_rank=8 truncates the 32-dim factors, so the prior-only remainder is exercised too.
    pm = _model(hessian, kfac_rank=8)
    batch = tiny.batch("bert", size=4)
    pm.finalize([tiny.batch("bert", seed=5, size=4)])
    tau = laplace.prior_precision(pm)
    assert tau > 0
    mean, cov = laplace.linearised_moments(pm, batch)
    jac = _jacobian(pm, batch, lambda x: (x[:, 1] - x[:, 0])[:, None])  # binary: the margin
    var = 0.0
    for (_, post), j in zip(_blocks(pm), jac):
        curv = _dense_curvature(post).double()
        sigma = torch.linalg.inv(curv + tau * torch.eye(curv.shape[0], dtype=torch.float64))
        var = var + torch.einsum("bp,pq,bq->b", j[:, 0].double(), sigma, j[:, 0].double())
    with torch.no_grad():
        logits = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(mean[:, 1], logits[:, 1] - logits[:, 0])
    torch.testing.assert_close(cov[0, :, 1, 1].double(), var, rtol=1e-3, atol=1e-8)
    assert torch.all(cov[0, :, 0, :] == 0)  # the reference logit is a constant


def test_marglik_prior_maximises_the_dense_evidence() -> None:
    pm = _model("kfac", kfac_rank=0)
    laplace.fit_posterior(pm, [tiny.batch("bert", size=4)])
    tau = laplace.tune_prior_marglik(pm)
    blocks = _blocks(pm)
    theta2 = sum(float(lin.weight.detach().double().square().sum()) for lin, _ in blocks)

    def evidence(t: float) -> float:  # -½τ‖θ‖² + P/2 log τ - ½ log det(H + τI), densely
        total = -0.5 * t * theta2
        for _, post in blocks:
            h = _dense_curvature(post).double()
            total += 0.5 * h.shape[0] * math.log(t) - 0.5 * float(
                torch.logdet(h + t * torch.eye(h.shape[0], dtype=h.dtype))
            )
        return total

    best = evidence(tau)
    assert best >= evidence(tau * 1.05) and best >= evidence(tau / 1.05)
    for t in (tau / 10, tau * 10):
        got = float(laplace.log_marglik(pm, tau) - laplace.log_marglik(pm, t))
        assert math.isclose(got, best - evidence(t), rel_tol=1e-4, abs_tol=1e-6)


def test_posterior_travels_with_the_adapter(tmp_path) -> None:
    pm = _model("kfac")
    pm.finalize([tiny.batch("bert", seed=5)])
    batch = tiny.batch("bert")
    expected = laplace.predictive_probs(pm, batch)
    pm.save(tmp_path / "a")
    keys = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    assert any(k.endswith(".laplace_A.in_vecs") for k in keys)
    assert any(k.endswith(".laplace_prior_precision") for k in keys)
    loaded = peft_core.load_adapter(tiny.model("bert"), tmp_path / "a")
    torch.testing.assert_close(laplace.predictive_probs(loaded, batch), expected, atol=1e-6, rtol=0)
    assert laplace.prior_precision(loaded) == laplace.prior_precision(pm)


def test_predictive_errors_are_clear() -> None:
    pm = _model("diag")
    with pytest.raises(peft_core.PeftError, match="finalize"):
        laplace.predictive_probs(pm, tiny.batch("bert"))
    pm.finalize([tiny.batch("bert")])
    pm.merge()
    with pytest.raises(peft_core.PeftError, match="unmerge"):
        laplace.predictive_probs(pm, tiny.batch("bert"))
    lm = peft_core.apply(tiny.model("gpt2"), {"name": "laplace_lora"})
    lm.finalize([tiny.batch("gpt2")])  # per-token curvature (Monte-Carlo Fisher) works
    assert laplace.prior_precision(lm) > 0
    with pytest.raises(peft_core.PeftError, match="classification logits"):
        laplace.predictive_probs(lm, tiny.batch("gpt2"))


def test_ggn_residuals_rebuild_the_softmax_hessian() -> None:
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    vs = list(pseudo_residuals(logits, torch.ones(6), "ggn", torch.Generator()))
    assert len(vs) == 4  # C - 1 passes
    rebuilt = sum(v[:, :, None] * v[:, None, :] for v in vs)
    torch.testing.assert_close(rebuilt, _softmax_hessian(logits), atol=1e-6, rtol=1e-5)


def test_probs_from_moments() -> None:
    mean = torch.tensor([[0.0, 2.0], [0.0, -1.0]])
    zero = torch.zeros(2, 2, 2)
    for link in ("probit", "mc"):
        torch.testing.assert_close(
            laplace.probs_from_moments(mean, zero, link), mean.softmax(-1), atol=1e-5, rtol=0
        )
    cov = torch.zeros(2, 2, 2)
    cov[:, 1, 1] = 4.0
    probit = laplace.probs_from_moments(mean, cov, "probit")
    mc = laplace.probs_from_moments(mean, cov, "mc", n_samples=20000)
    assert torch.all(probit.max(-1).values < mean.softmax(-1).max(-1).values)  # less confident
    torch.testing.assert_close(probit, mc, atol=0.02, rtol=0)  # the probit approximation is close


def test_calibration_metrics_by_hand() -> None:
    probs = torch.tensor(
        [[0.95, 0.05], [0.85, 0.15], [0.25, 0.75], [0.35, 0.65], [0.08, 0.92]], dtype=torch.float64
    )
    labels = torch.tensor([0, 1, 1, 1, 1])
    m = laplace.calibration_metrics(probs, labels, n_bins=10)
    assert m["accuracy"] == 0.8
    # Bins (.9, 1]: {.95 right, .92 right}; (.8, .9]: .85 wrong; (.7, .8]: .75 right;
    # (.6, .7]: .65 right.
    want = (2 * abs(1 - 0.935) + abs(0 - 0.85) + abs(1 - 0.75) + abs(1 - 0.65)) / 5
    assert math.isclose(m["ece"], want, abs_tol=1e-12)
    nll = -(math.log(0.95) + math.log(0.15) + math.log(0.75) + math.log(0.65) + math.log(0.92)) / 5
    assert math.isclose(m["nll"], nll, rel_tol=1e-12)
    with pytest.raises(peft_core.PeftError, match="labels"):
        laplace.calibration_metrics(probs, labels[:3])


def test_bad_config_names_the_field() -> None:
    with pytest.raises(peft_core.ConfigError, match=r"laplace_lora\.hessian"):
        peft_core.MethodConfig.from_dict({"name": "laplace_lora", "hessian": "full"})


def test_fit_and_predict_leave_every_module_in_its_own_mode() -> None:
    pm = _model("kfac").train()
    pm.base_model.bert.encoder.eval()
    modes = {n: m.training for n, m in pm.named_modules()}
    pm.finalize([tiny.batch("bert")])
    laplace.predictive_probs(pm, tiny.batch("bert"))
    assert {n: m.training for n, m in pm.named_modules()} == modes
