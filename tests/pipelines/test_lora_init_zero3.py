"""LoRA's base-rewriting initialisations (PiSSA, OLoRA) under ZeRO-3 with the base built
partitioned: the init gathers each weight whole, factorises it, and writes the residual
back (rank 0's copy kept); the saved adapter then reloads onto an untouched, unpartitioned
base and reproduces the reported eval loss."""

from __future__ import annotations

import pytest

from pipelines.train import train
from tests.pipelines.test_train_ray import ZERO, lm, lm_config, reloaded_eval_loss  # noqa: F401

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rewriting_init_trains_under_zero3(ray_cluster, lm, tmp_path, init) -> None:  # noqa: F811
    model, data = lm
    method = {"name": "lora", "rank": 4, "alpha": 8, "init": init}
    res = train(lm_config(model, method=method, zero=ZERO["zero3"], max_steps=4, eval_every=4,
                          checkpoint_every=4, lr=5e-3),
                manifest=data, run_dir=tmp_path / "run")
    h = res.history
    assert h[-1]["eval_loss"] < h[0]["eval_loss"], [r["eval_loss"] for r in h]
    assert reloaded_eval_loss(res.adapter_dir, model, data) == pytest.approx(
        h[-1]["eval_loss"], abs=1e-4)
