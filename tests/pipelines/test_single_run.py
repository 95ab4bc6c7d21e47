"""A single training run (``peftpipe train``, ``run`` without a tune section) is one Ray
Train run driven by this process, recorded as a search's trial is: an MLflow parent run
with one child run (params, metrics at every report, the adapter artifact, status), a
one-trial SearchResult (trials.json), the console's status lines; the same call again
resumes it from its checkpoint, and SIGINT stops it with every run ended KILLED."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import tracking
from pipelines.train import ModelConfig, TrainConfig
from pipelines.tune import Objective, SearchResult
from tests.pipelines import train_helpers

pytestmark = pytest.mark.timeout(600)

OBJECTIVE = Objective(metric="eval_accuracy", mode="max")


def small_run(tmp_path: Path, **train_overrides) -> tuple[Path, TrainConfig]:
    data = train_helpers.write_dataset(tmp_path / "data", "classification", rows=64, eval_rows=32)
    model = train_helpers.save_tiny("bert", tmp_path / "bert")
    train = TrainConfig(model=ModelConfig(name=str(model)), **{
        "num_workers": 1, "batch_size": 8, "micro_batch_size": 8, "max_steps": 4,
        "eval_every": 2, "lr": 1e-2, "storage_path": str(tmp_path / "unused"),
        **train_overrides})
    return data, train


def _runs(client, res: SearchResult) -> tuple:
    parent = client.get_run(res.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    return parent, children


def test_a_run_is_tracked_as_a_trial_and_the_same_call_resumes_it(
        ray_cluster, tmp_path, capsys) -> None:
    from pipelines.single_run import run_one

    data, train = small_run(tmp_path)
    track = tracking.TrackingConfig(experiment="single")
    run_dir = tmp_path / "run"
    res = run_one(train, manifest=data, run_dir=run_dir, objective=OBJECTIVE, tracking=track)
    out = capsys.readouterr().out
    [trial] = res.trials
    assert res.best is trial and res.pareto == [trial]
    assert re.fullmatch(r"[0-9a-f]{5}_00000", trial["trial_id"])
    assert trial["status"] == "completed" and trial["error"] is None
    assert trial["method"]["name"] == "lora" and trial["lr"] == 1e-2
    assert trial["metrics"]["step"] == 4 and "eval_accuracy" in trial["metrics"]
    assert [s for s, _ in trial["history"]["eval_loss"]] == [2, 4]
    assert Path(trial["adapter_dir"], "adapter_config.json").is_file()
    assert Path(trial["adapter_dir"]).parents[1] == run_dir / "trials" / trial["trial_id"]
    # the console: as a search's trial prints it
    tid = trial["trial_id"]
    assert re.search(rf"\[\s+\d+s\] {tid} lora +started", out), out
    assert re.search(rf"{tid} lora +step +2/4  eval_accuracy=[0-9.]+  train_loss=", out), out
    assert re.search(rf"{tid} lora +done", out), out
    # trials.json round trip: what promote and report read
    again = SearchResult.from_json(res.to_json())
    assert again.best["mlflow_run_id"] == trial["mlflow_run_id"]

    client = tracking.client(track, run_dir)
    parent, children = _runs(client, res)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["peftpipe.best_trial"] == tid
    assert parent.data.tags["peftpipe.best_run_id"] == trial["mlflow_run_id"]
    assert parent.data.params["num_trials"] == "1"
    [child] = children
    assert child.info.run_id == trial["mlflow_run_id"] and child.info.status == "FINISHED"
    assert child.info.run_name == f"lora-{tid}"
    assert child.data.params["method.name"] == "lora" and child.data.params["lr"] == "0.01"
    assert child.data.tags["peftpipe.stopped_early"] == "False"
    assert [m.step for m in client.get_metric_history(child.info.run_id, "eval_loss")] == [2, 4]
    assert [f.path for f in client.list_artifacts(child.info.run_id)] == ["adapter"]
    checkpoints = sorted(p.name for p in (run_dir / "trials" / tid).glob("checkpoint_*"))

    # the same call again: the finished run is found (folder, MLflow runs), nothing trained
    # or logged twice
    res2 = run_one(train, manifest=data, run_dir=run_dir, objective=OBJECTIVE, tracking=track,
                   verbose=False)
    [trial2] = res2.trials
    assert (trial2["trial_id"], trial2["mlflow_run_id"]) == (tid, trial["mlflow_run_id"])
    assert trial2["status"] == "completed" and trial2["metrics"]["step"] == 4
    assert trial2["history"]["eval_loss"] == trial["history"]["eval_loss"]
    assert sorted(p.name for p in (run_dir / "trials" / tid).glob("checkpoint_*")) == checkpoints
    parent, children = _runs(client, res2)
    assert parent.info.run_id == res.parent_run_id and parent.info.status == "FINISHED"
    assert [c.info.status for c in children] == ["FINISHED"]
    assert [m.step for m in client.get_metric_history(child.info.run_id, "eval_loss")] == [2, 4]
    assert [f.path for f in client.list_artifacts(child.info.run_id)] == ["adapter"]


DRIVER = """
import sys
from pathlib import Path

import ray

from pipelines.single_run import run_one
from tests.pipelines.test_single_run import OBJECTIVE, small_run

tmp = Path(sys.argv[1])
ray.init(num_cpus=2, include_dashboard=True, logging_level="ERROR", log_to_driver=False,
         _temp_dir=sys.argv[2])
data, train = small_run(tmp, max_steps=60)
try:
    run_one(train, manifest=data, run_dir=tmp / "run", objective=OBJECTIVE)
except KeyboardInterrupt as e:
    print(f"interrupted: {type(e).__name__}: {e}", flush=True)
    sys.exit(130)
"""


def test_sigint_stops_a_run_with_its_runs_killed_and_it_resumes(ray_cluster, tmp_path) -> None:
    from pipelines.single_run import run_one

    ray_tmp = Path("/tmp") / f"rs-{os.getpid()}-{tmp_path.name[-12:]}"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), str(ray_tmp)],
                            cwd=Path(__file__).resolve().parents[2], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "run"
    try:
        deadline = time.time() + 300
        while not list(run_dir.glob("trials/*/checkpoint_*")):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # the driver's Ray processes live under its own temp dir: stop exactly those
        subprocess.run(["pkill", "-9", "-f", str(ray_tmp)], check=False)
    assert proc.returncode == 130, out[-3000:]
    assert "SIGINT: stopping the run (its checkpoints are saved; again to stop at once)" in out
    assert re.search(r"interrupted: SearchInterrupted: run search-\w+ stopped by SIGINT", out), out
    assert "Traceback" not in out, out[-3000:]
    client = tracking.client(tracking.TrackingConfig(), run_dir)
    exp = client.get_experiment_by_name("peft-pipelines").experiment_id
    runs = client.search_runs([exp])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}, [
        (r.info.run_name, r.info.status) for r in runs]

    data, train = small_run(tmp_path, max_steps=60)
    res = run_one(train, manifest=data, run_dir=run_dir, objective=OBJECTIVE, verbose=False)
    [trial] = res.trials
    assert trial["status"] == "completed" and trial["metrics"]["step"] == 60
    assert trial["metrics"]["resumed_from"] > 0  # from the stopped run's checkpoint
    parent, [child] = _runs(client, res)
    assert parent.info.status == child.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "eval_loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # nothing logged twice
