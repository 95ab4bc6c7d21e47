"""A real Ray Tune search over several methods with ASHA, tracked in real MLflow, then a
promotion through the registry."""

from __future__ import annotations

import pytest

from pipelines import tracking
from pipelines.train import ModelConfig, TrainConfig
from pipelines.tune import TuneConfig
from tests.pipelines import train_helpers

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def ray_with_dashboard():
    import ray

    started = False
    if not ray.is_initialized():
        # The dashboard (State API) is what releases an ASHA-stopped trial's placement group.
        ray.init(num_cpus=2, include_dashboard=True, logging_level="ERROR")
        started = True
    yield
    if started:
        ray.shutdown()


def test_search_over_methods_with_asha(ray_with_dashboard, tmp_path) -> None:
    from pipelines.tune.stage import search

    data = train_helpers.write_dataset(tmp_path / "data", "classification", rows=64, eval_rows=16)
    model = train_helpers.save_tiny("bert", tmp_path / "bert")
    train = TrainConfig(model=ModelConfig(name=str(model)), num_workers=1, batch_size=8,
                        micro_batch_size=8, max_steps=8, eval_every=2, lr=1e-2,
                        storage_path=str(tmp_path / "unused"))
    tune_cfg = TuneConfig.model_validate({
        "space": {"methods": {"lora": {"rank": [2, 4]}, "lora_plus": {"rank": 4},
                              "linear_probe": {}, "full": {}},
                  "lr": [1e-2]},
        "searcher": "grid", "scheduler": "asha", "max_concurrent_trials": 2,
        "grace_period": 1, "reduction_factor": 2,
        "objective": {"metric": "eval_accuracy", "mode": "max"},
    })
    res = search(train, tune_cfg, manifest=data, run_dir=tmp_path / "run", verbose=False)

    assert len(res.trials) == 5
    assert {t["method"]["name"] for t in res.trials} == {"lora", "lora_plus", "linear_probe", "full"}
    assert all(t["status"] in ("completed", "stopped early") for t in res.trials), res.trials
    assert any(t["status"] == "stopped early" for t in res.trials), "ASHA stopped nothing"
    assert res.best is not None and res.best["adapter_dir"]
    for t in res.trials:
        assert t["metrics"]["trainable_fraction"] > 0 and "eval_accuracy" in t["metrics"]

    client = tracking.client(tracking.TrackingConfig(), tmp_path / "run")
    children = client.search_runs([client.get_run(res.parent_run_id).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert len(children) == 5
    assert all(r.info.status == "FINISHED" for r in children)
    best = client.get_run(res.best["mlflow_run_id"])
    assert best.data.params["method.name"] == res.best["method"]["name"]
    assert best.data.tags["dataset_id"] == "tiny-classification-0"
    assert {"git_sha", "recipe_hash", "base_model"} <= set(best.data.tags)
    assert "eval_accuracy" in best.data.metrics
    assert any(f.path == "adapter" for f in client.list_artifacts(best.info.run_id))
    steps = [m.step for m in client.get_metric_history(best.info.run_id, "train_loss")]
    assert steps == sorted(set(steps)), "a step was logged twice"
