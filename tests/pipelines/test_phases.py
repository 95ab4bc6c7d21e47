"""Where a trial's time goes: a real short Ray Tune search (two tiny trials side by side on
the module's Ray), whose workers report ``phase_<name>_s`` timings that add up to Tune's
own wall time of each trial, are logged to MLflow, kept in trials.json and split by phase
in report.md."""

from __future__ import annotations

import pytest

from pipelines import tracking
from pipelines.report import phase_split, write_report
from pipelines.train import ModelConfig, TrainConfig
from pipelines.train.metrics import PHASES, phase_key
from pipelines.tune import TuneConfig
from pipelines.tune.result import SearchResult
from tests.pipelines import train_helpers

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def searched(ray_cluster, tmp_path_factory):
    from pipelines.tune.stage import search

    tmp = tmp_path_factory.mktemp("phases")
    data = train_helpers.write_dataset(tmp / "data", "classification", rows=32, eval_rows=16)
    model = train_helpers.save_tiny("bert", tmp / "bert")
    train = TrainConfig(model=ModelConfig(name=str(model)), num_workers=1, batch_size=8,
                        micro_batch_size=8, max_steps=4, eval_every=2, lr=1e-2,
                        eval_before_training=True, storage_path=str(tmp / "unused"))
    tune_cfg = TuneConfig.model_validate({
        "space": {"methods": {"lora": {"rank": 4}, "linear_probe": {}}, "lr": [1e-2]},
        "searcher": "grid", "scheduler": "fifo", "max_concurrent_trials": 2,
        "objective": {"metric": "eval_accuracy", "mode": "max"},
    })
    track = tracking.TrackingConfig(experiment="phases")
    res = search(train, tune_cfg, manifest=data, run_dir=tmp / "run", tracking=track,
                 verbose=False)
    return {"result": res, "tracking": track, "run_dir": tmp / "run", "tmp": tmp}


def test_phases_add_up_to_each_trials_wall_time(searched) -> None:
    res = searched["result"]
    assert len(res.trials) == 2 and all(t["status"] == "completed" for t in res.trials)
    for t in res.trials:
        m = t["metrics"]
        phases = {p: m[phase_key(p)] for p in PHASES}
        assert all(v >= 0 for v in phases.values()), phases
        # what every trial does takes time (an unmeasured phase would read 0)
        for p in ("controller", "worker_start", "imports", "data", "load", "method", "engine",
                  "steps", "eval", "checkpoint"):
            assert phases[p] > 0, (p, phases)
        wall = t["time_s"]  # Tune's time_total_s: measured by Tune, not by the worker
        assert wall and abs(sum(phases.values()) - wall) <= 0.05 * wall, (wall, phases)


def test_phases_in_mlflow_trials_json_and_report(searched) -> None:
    res, tmp = searched["result"], searched["tmp"]
    client = tracking.client(searched["tracking"], searched["run_dir"])
    for t in res.trials:
        logged = client.get_run(t["mlflow_run_id"]).data.metrics
        for p in PHASES:  # the last report's cumulative value
            assert logged[phase_key(p)] == pytest.approx(t["metrics"][phase_key(p)]), p
        steps = [x.step for x in client.get_metric_history(t["mlflow_run_id"],
                                                           phase_key("steps"))]
        assert steps == [0, 2, 4]  # every report, the step-0 evaluation included

    back = SearchResult.load(res.save(tmp / "trials.json"))
    assert {t["trial_id"]: t["metrics"][phase_key("load")] for t in back.trials} == {
        t["trial_id"]: t["metrics"][phase_key("load")] for t in res.trials}

    text = write_report(back.trials, res.objective, tmp / "report").read_text()
    assert "## Where the time went" in text and "| phase | seconds | share |" in text
    rows = phase_split(back.trials)
    assert [r["phase"] for r in rows][:len(PHASES)] == list(PHASES)
    for r in rows:
        assert f"| {r['phase']} | " in text
    shares = sum(float(r["share"].rstrip("%")) for r in rows)
    assert shares == pytest.approx(100, abs=0.5)
