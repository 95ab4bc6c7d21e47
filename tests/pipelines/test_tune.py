"""A real Ray Tune search over several methods with ASHA, tracked in real MLflow (embedded
SQLite and a real ``mlflow server``), then promotion, a refused worse candidate, rollback,
and the registered adapter predicting as at the end of its trial."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import peft_core
from cluster.mlflow_server import mlflow_server
from pipelines import registry, tracking
from pipelines.promote import promote
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


def small_search(tmp_path, **tune_overrides):
    data = train_helpers.write_dataset(tmp_path / "data", "classification", rows=64, eval_rows=32)
    model = train_helpers.save_tiny("bert", tmp_path / "bert")
    train = TrainConfig(model=ModelConfig(name=str(model)), num_workers=1, batch_size=8,
                        micro_batch_size=8, max_steps=6, eval_every=2, lr=1e-2,
                        storage_path=str(tmp_path / "unused"))
    tune_cfg = TuneConfig.model_validate({
        "space": {"methods": {"lora": {"rank": 4}, "lora_plus": {"rank": 4},
                              "linear_probe": {}, "full": {}},
                  "lr": [1e-2]},
        "searcher": "grid", "scheduler": "asha", "max_concurrent_trials": 2,
        "grace_period": 1, "reduction_factor": 2,
        "objective": {"metric": "eval_accuracy", "mode": "max"},
        **tune_overrides,
    })
    return data, train, tune_cfg


@pytest.fixture(scope="module", params=["sqlite", "server"])
def searched(request, ray_with_dashboard, tmp_path_factory):
    from pipelines.tune.stage import search

    tmp = tmp_path_factory.mktemp(f"search-{request.param}")
    data, train, tune_cfg = small_search(tmp)
    if request.param == "server":
        # The same flow through a real server, on a smaller grid to keep the suite short.
        tune_cfg = tune_cfg.model_copy(update={"space": tune_cfg.space.model_copy(
            update={"methods": {"lora": {"rank": 4}, "linear_probe": {}}})})

    def run(track):
        res = search(train, tune_cfg, manifest=data, run_dir=tmp / "run", tracking=track,
                     verbose=False)
        return {"result": res, "data": data, "tracking": track, "run_dir": tmp / "run", "tmp": tmp}

    if request.param == "sqlite":
        yield run(tracking.TrackingConfig(experiment="search"))
    else:
        with mlflow_server(tmp / "mlflow") as uri:
            yield run(tracking.TrackingConfig(tracking_uri=uri, experiment="search"))


def test_search_trials_runs_and_early_stopping(searched) -> None:
    res = searched["result"]
    names = {t["method"]["name"] for t in res.trials}
    assert len(res.trials) == len(names) and names >= {"lora", "linear_probe"}
    assert all(t["status"] in ("completed", "stopped early") for t in res.trials), res.trials
    if len(res.trials) >= 4:
        assert any(t["status"] == "stopped early" for t in res.trials), "ASHA stopped nothing"
    assert res.best is not None and res.best["status"] == "completed" and res.best["adapter_dir"]
    for t in res.trials:
        assert t["metrics"]["trainable_fraction"] > 0 and "eval_accuracy" in t["metrics"]
    assert res.pareto

    client = tracking.client(searched["tracking"], searched["run_dir"])
    exp = client.get_run(res.parent_run_id).info.experiment_id
    children = client.search_runs(
        [exp], filter_string=f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert len(children) == len(res.trials) and all(r.info.status == "FINISHED" for r in children)
    best = client.get_run(res.best["mlflow_run_id"])
    assert best.data.params["method.name"] == res.best["method"]["name"]
    assert best.data.tags["dataset_id"] == "tiny-classification-0"
    assert {"git_sha", "recipe_hash", "base_model"} <= set(best.data.tags)
    assert "eval_accuracy" in best.data.metrics
    assert any(f.path == "adapter" for f in client.list_artifacts(best.info.run_id))
    steps = [m.step for m in client.get_metric_history(best.info.run_id, "train_loss")]
    assert steps == sorted(set(steps)) and steps, "a step was logged twice"
    stopped = [c for c in children if c.data.tags.get("peftpipe.stopped_early") == "True"]
    assert len(stopped) == sum(t["status"] == "stopped early" for t in res.trials)


def test_promote_reject_rollback_and_serve(searched) -> None:
    res, tmp = searched["result"], searched["tmp"]
    rcfg = registry.RegistryConfig(model_name="tiny-cls", metric="eval_loss", mode="min")
    kw = {"manifest": searched["data"], "config": rcfg, "tracking_config": searched["tracking"],
          "run_dir": searched["run_dir"]}
    ranked = sorted((t for t in res.trials if t["adapter_dir"]),
                    key=lambda t: t["metrics"]["eval_loss"])
    first = promote(run_id=ranked[-1]["mlflow_run_id"], **kw)  # the worst trial: first champion
    assert first.promoted and first.reason == "no champion yet"
    better = promote(run_id=ranked[0]["mlflow_run_id"], **kw)
    assert better.promoted, better.reason
    worse = promote(run_id=ranked[-1]["mlflow_run_id"], **kw)
    assert not worse.promoted and "does not beat" in worse.reason
    client = tracking.client(searched["tracking"], searched["run_dir"])
    assert registry.alias_version(client, "tiny-cls", registry.CHAMPION) == better.version
    back = registry.rollback(client, "tiny-cls")
    assert back.version == first.version
    assert registry.alias_version(client, "tiny-cls", registry.CHAMPION) == first.version
    registry.set_alias(client, "tiny-cls", registry.CHAMPION, better.version)

    # The registered champion predicts exactly as the adapter at the end of its trial.
    _, folder = registry.download(client, "models:/tiny-cls@champion", tmp / "champion")
    data = train_helpers.write_dataset(tmp / "data2", "classification", rows=8, eval_rows=8, seed=5)
    from pipelines.train.data import Collator, read_manifest, read_split

    info = read_manifest(data)
    batch = Collator(info)(read_split(info, "eval"))
    batch.pop("labels")
    model_dir = str(tmp / "bert")
    outs = []
    for adapter in (folder, ranked[0]["adapter_dir"]):
        from pipelines import models

        base = models.load_model(model_dir, "classification", num_labels=2)
        pm = peft_core.load_adapter(base, adapter)
        with torch.no_grad():
            outs.append(pm.eval()(**batch).logits)
    torch.testing.assert_close(outs[0], outs[1])


RESUME = {"scheduler": "fifo", "max_concurrent_trials": 1,
          "space": {"methods": {"lora": {"rank": 4}, "linear_probe": {}},
                    "lr": [1e-2]}}

DRIVER = """
import sys, ray
from pathlib import Path
from pipelines import tracking
from pipelines.tune.stage import search
from tests.pipelines.test_tune import RESUME, small_search
tmp = Path(sys.argv[1])
ray.init(num_cpus=2, include_dashboard=True, logging_level="ERROR", _temp_dir=sys.argv[2])
data, train, cfg = small_search(tmp, **RESUME)
search(train, cfg, manifest=data, run_dir=tmp / "run", tracking=tracking.TrackingConfig(),
       verbose=False)
"""


def _finished_trials(run: Path) -> set[str]:
    import json

    done = set()
    for state in run.glob("trials/*/checkpoint_*/train_state.json"):
        if json.loads(state.read_text()).get("finalized"):
            done.add(state.parent.parent.name)
    return done


def test_search_resumes_after_its_driver_is_killed(ray_with_dashboard, tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipelines.tune.stage import search

    ray_tmp = Path("/tmp") / f"rt-{os.getpid()}-{tmp_path.name[-12:]}"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), str(ray_tmp)],
                            cwd=Path(__file__).resolve().parents[2], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "run"
    try:
        deadline = time.time() + 400
        # Kill once one trial has finished and the next one has started training.
        while not (_finished_trials(run) and len(list(run.glob("trials/*"))) >= 2):
            assert proc.poll() is None, "the search driver ended before it could be killed"
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(1)
        time.sleep(3)  # let Tune record the finished trial in its experiment state
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # The killed driver's Ray processes live under its own temp dir: stop exactly those.
        subprocess.run(["pkill", "-9", "-f", str(ray_tmp)], check=False)
    finished = _finished_trials(run)
    before = {t: sorted(p.name for p in (run / "trials" / t).glob("checkpoint_*"))
              for t in finished}

    data, train, cfg = small_search(tmp_path, **RESUME)
    res = search(train, cfg, manifest=data, run_dir=run, verbose=False)
    assert len(res.trials) == 2 and all(t["status"] == "completed" for t in res.trials)
    for t, ckpts in before.items():  # finished trials were not run again
        assert sorted(p.name for p in (run / "trials" / t).glob("checkpoint_*")) == ckpts
    client = tracking.client(tracking.TrackingConfig(), run)
    exp = client.get_run(res.parent_run_id).info.experiment_id
    children = client.search_runs(
        [exp], filter_string=f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)


def test_progress_keeps_printing_while_a_trial_waits_for_resources(
        ray_with_dashboard, tmp_path, capsys) -> None:
    """Something else holds most of the CPUs: the trial starts but its worker cannot be
    placed; the console gets a line naming Ray's pending demand every few seconds (not
    silence), and the trial trains once the CPUs are free."""
    import threading
    import time

    from ray.util.placement_group import placement_group, remove_placement_group

    from pipelines.train.scheduling import pending_placement_groups
    from pipelines.tune.stage import search

    notice_s = 2.0
    data, train, cfg = small_search(
        tmp_path, space={"methods": {"lora": {"rank": 4}}, "lr": [1e-2]},
        scheduler="fifo", max_concurrent_trials=1, waiting_notice_s=notice_s)
    train = train.model_copy(update={"max_steps": 2})
    hold = placement_group([{"CPU": 1.5}])
    assert hold.wait(30)
    released: dict[str, float] = {}

    def release_after_the_worker_waited() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not pending_placement_groups():
            time.sleep(0.5)
        time.sleep(3 * notice_s + 1)
        remove_placement_group(hold)
        released["at"] = time.time()

    releaser = threading.Thread(target=release_after_the_worker_waited, daemon=True)
    releaser.start()
    try:
        res = search(train, cfg, manifest=data, run_dir=tmp_path / "run", verbose=True)
    finally:
        releaser.join(timeout=130)
        if "at" not in released:
            remove_placement_group(hold)
    out = capsys.readouterr().out
    print(out)
    assert released, "the trial's worker never waited"
    waiting = [ln for ln in out.splitlines() if "waiting for resources" in ln]
    assert len(waiting) >= 2, out
    assert all("1 trial(s) running, 0 pending; Ray's pending demand: 1 placement group(s)"
               in ln for ln in waiting), waiting
    assert re.search(r"\[\{CPU: [0-9.]+\} x 1\] \(\w+\); the cluster has 1 alive node",
                     waiting[0]), waiting[0]
    assert [t["status"] for t in res.trials] == ["completed"]
    assert re.search(r"lora +done", out), out


# -- runs always end, failed trials are not silent (no Ray) ------------------------------------

def _search_runs(tmp_path, driver: str) -> tuple:
    """A search's parent and two trial runs left RUNNING in a real MLflow store, as a
    driver ``driver`` (a ``host:pid:start`` identity) leaves them when it dies."""
    from pipelines.tune.runs import TAG_DRIVER

    cfg = tracking.TrackingConfig(experiment="reconcile")
    client = tracking.client(cfg, tmp_path)
    exp = tracking.experiment_id(client, cfg, tmp_path)
    tracker = tracking.SearchTracker(client, exp, "s1", tags={})
    client.set_tag(tracker.parent_id, TAG_DRIVER, driver)
    trials = [tracker.trial_run(t, {"lr": 0.1}) for t in ("t0", "t1")]
    tracker.finish(trials[1], "FINISHED")
    return client, exp, tracker.parent_id, trials


def _status(client, run_id: str) -> str:
    return client.get_run(run_id).info.status


def test_runs_of_a_dead_driver_are_reconciled_as_killed(tmp_path) -> None:
    import subprocess
    import sys

    from pipelines.tune.runs import driver_identity, reconcile, reconcile_experiment

    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    identity = driver_identity(gone.pid)  # while it runs: its pid and start time
    gone.kill()
    gone.wait()
    client, exp, parent, (open_trial, done_trial) = _search_runs(tmp_path, identity)
    assert reconcile_experiment(client, exp) == [open_trial, parent]  # the parent last
    assert [_status(client, r) for r in (parent, open_trial, done_trial)] == [
        "KILLED", "KILLED", "FINISHED"]
    assert "is gone" in client.get_run(parent).data.tags["peftpipe.ended_by"]
    assert reconcile(client, exp, "s1", opening=True) == []  # nothing left open


def test_runs_of_a_live_or_remote_driver_are_left_open(tmp_path) -> None:
    import subprocess
    import sys

    from pipelines.tune.runs import driver_identity, reconcile

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        client, exp, parent, (open_trial, _) = _search_runs(tmp_path, driver_identity(live.pid))
        assert reconcile(client, exp, "s1", opening=True) == []
        assert _status(client, parent) == _status(client, open_trial) == "RUNNING"
    finally:
        live.kill()
        live.wait()
    # a driver on another host: report/promote cannot tell, a resume takes the search over
    client.set_tag(parent, "peftpipe.driver", "elsewhere:1:1.00")
    assert reconcile(client, exp, "s1", opening=False) == []
    assert reconcile(client, exp, "s1", opening=True) == [open_trial, parent]


def test_a_torn_ray_snapshot_is_set_aside_for_the_newest_whole_checkpoint(tmp_path) -> None:
    import json

    from pipelines.tune.trial_folder import RAY_SNAPSHOT, set_aside_torn_snapshot

    def ckpt(name: str, step: int, ranks: int) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "train_state.json").write_text(json.dumps({"step": step, "world_size": 2}))
        for r in range(ranks):
            (folder / f"rng_rank{r}.pt").write_bytes(b"x")
        return folder

    ckpt("checkpoint_a", 20, 2)
    whole = ckpt("checkpoint_b", 40, 2)
    ckpt("checkpoint_c", 60, 1)  # rank 1's files never arrived: not a checkpoint to resume
    assert set_aside_torn_snapshot(tmp_path) is None  # no snapshot: Ray starts or resumes
    (tmp_path / RAY_SNAPSHOT).write_text('{"checkpoint_results": []}')
    assert set_aside_torn_snapshot(tmp_path) is None  # a whole one: Ray resumes by itself
    (tmp_path / RAY_SNAPSHOT).write_text("")  # the driver died while Ray rewrote it
    assert set_aside_torn_snapshot(tmp_path) == whole
    assert not (tmp_path / RAY_SNAPSHOT).exists()
    assert (tmp_path / (RAY_SNAPSHOT + ".torn")).is_file()


def test_a_trial_that_finally_failed_fails_the_job_unless_tolerated() -> None:
    from pipelines import pipeline
    from pipelines.tune import SearchResult

    cfg = TuneConfig.model_validate({"space": {"methods": {"lora": {}}}})
    assert (cfg.max_trial_failures, cfg.tolerate_failed_trials) == (2, False)
    trials = [{"trial_id": "a", "status": "completed"},
              {"trial_id": "b", "status": "error",
               "error": "Traceback ...\nRayActorError: The actor died because its node has died"}]
    res = SearchResult(search_id="s", trials=trials, best=None, pareto=[], parent_run_id="p",
                       tracking_uri="sqlite://")
    with pytest.raises(pipeline.TrialsFailedError, match=r"1 of 2 trial\(s\) failed .*\(b\): "
                       "RayActorError: The actor died because its node has died"):
        pipeline._check_failed(res, tolerated=False)
    assert pipeline._check_failed(res, tolerated=True) is res
