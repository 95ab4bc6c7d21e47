"""The training stage's final evaluation on a real local Ray (Ray Train + DeepSpeed ZeRO-0 on
CPU, 2 workers): a ``laplace_lora`` classifier's final metrics are its posterior
predictive's (MAP kept apart), with ECE and NLL, and they are the numbers promotion's
``evaluate_adapter`` gets for the saved adapter on the same split."""

from __future__ import annotations

import pytest

from pipelines.evaluate import evaluate_adapter
from pipelines.train import TrainConfig, train
from pipelines.train import metrics as M
from tests.pipelines import train_helpers

pytestmark = pytest.mark.timeout(600)


def test_laplace_final_metrics_are_the_predictive_with_ece_and_nll(ray_cluster,
                                                                   tmp_path) -> None:
    model = train_helpers.save_tiny("bert", tmp_path / "bert")
    data = train_helpers.write_dataset(tmp_path / "data", "classification", rows=48,
                                       eval_rows=24)
    cfg = TrainConfig.model_validate(dict(
        model={"name": str(model)}, method={"name": "laplace_lora", "rank": 4},
        num_workers=2, batch_size=8, micro_batch_size=4, max_steps=4, lr=5e-2,
        schedule="constant", eval_every=2, checkpoint_every=4, zero={"stage": 0}))
    res = train(cfg, manifest=data, run_dir=tmp_path / "run")
    h = res.history
    first, last = h[0], h[-1]
    # before finalize: the MAP point, no calibration scores (they come with the final eval)
    assert M.LAPLACE_PREDICTIVE not in first and M.EVAL_ECE not in first
    assert last[M.LAPLACE_PREDICTIVE] == 1.0
    assert last["eval_loss"] == last[M.EVAL_NLL]
    assert 0.0 <= last[M.EVAL_ECE] <= 1.0 and 0.0 <= last["eval_map_ece"] <= 1.0
    assert abs(last["eval_map_loss"] - last["eval_loss"]) > 1e-6
    # promotion scores the saved adapter with the same code on the same rows: same numbers
    # (the eval split sharded over 2 ranks and summed there, whole here)
    got = evaluate_adapter(res.adapter_dir, data, split="eval")
    for k in ("eval_loss", M.EVAL_NLL, M.EVAL_ECE, "eval_accuracy", "eval_map_loss"):
        assert got[k] == pytest.approx(last[k], abs=1e-4), k
