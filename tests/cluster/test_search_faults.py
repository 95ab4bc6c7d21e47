"""A search survives a lost node, and a stopped search closes its runs: `peftpipe tune` run
as a user runs it (a subprocess on a recipe file) against a real local cluster.

The cluster: a head with no CPUs (it holds the GCS and the job's driver connects through
it; losing it is losing the cluster) and three 1-CPU worker nodes, so every part of a trial
(its Tune driver with its Train controller, its two SPREAD workers) runs on a node that can be
lost. The search: 2 trials at once on 2 workers each, checkpoints every 20 steps.

1. SIGINT (Ctrl-C to the driver's process group) mid-search of trials whose two workers are
   STRICT_SPREAD (each on its own node, checked from Ray's State API): exit 130, no MLflow
   run left RUNNING (parent and trials KILLED);
2. the raylet of a node that hosts a trial's worker, but not that trial's driver, SIGKILLed:
   Ray Train restarts the lost worker group (``train.max_failures``), the trial resumes from
   its checkpoint;
3. the raylet of a node that hosts a trial's driver SIGKILLed: Ray Tune restarts the trial
   (``tune.max_trial_failures``), which resumes from its checkpoint.

Each kill leaves a node fewer; the last search fits on one node (2 x 2 x 0.2 CPU + drivers).
Every search ends with exit 0, every trial completed, the hit trial resumed at step > 0.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster import local
from tests.pipelines import train_helpers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
CPUS_PER_WORKER = 0.2  # 2 trials x 2 workers (+ 2 drivers) fit on the one node left at the end
# Tiny steps take ~20 ms: enough of them that a fault lands mid-training, well after the
# first checkpoint (each retry resumes there and loads the model again, ~15 s).
STEPS = 300
EVERY = 20  # steps between checkpoints (and eval reports)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    t0 = time.time()
    state = local.up(root, workers=3, cpus=1, head_cpus=0, object_store_mb=128, mlflow=False)
    print(f"\ncluster up in {time.time() - t0:.1f}s")
    try:
        yield state
    finally:
        local.down(root)


@pytest.fixture(scope="module")
def inputs(cluster):
    """A sentiment corpus tokenized with MiniLM's tokenizer for a tiny BERT of its vocab."""
    storage = Path(cluster.storage)
    model = train_helpers.save_tiny("bert", storage / "bert",
                                    vocab_size=train_helpers.MINILM_VOCAB)
    rng = random.Random(0)
    rows = []
    for _ in range(96):
        label = rng.randrange(2)
        words = ["great", "good", "fun", "superb"] if label else ["bad", "dull", "poor", "weak"]
        rows.append({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 7))),
                     "label": ["negative", "positive"][label]})
    src = storage / "reviews.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, src


def recipe(cluster, inputs, name: str, max_steps: int, strategy: str = "SPREAD") -> Path:
    model, src = inputs
    storage = Path(cluster.storage)
    data = {
        "name": name, "model": str(model), "run_dir": str(storage / name),
        "data": {"sources": [str(src)], "task": "classification",
                 "tokenizer": "builtin:minilm", "max_length": 16,
                 "data_root": str(storage / "datasets"),
                 "split": {"train": 0.75, "eval": 0.25, "test": 0.0}},
        "train": {"batch_size": 8, "micro_batch_size": 4, "max_steps": max_steps,
                  "eval_every": EVERY, "checkpoint_every": EVERY, "max_eval_batches": 1,
                  "lr": 1e-2, "schedule": "constant", "warmup_steps": 0,
                  "placement_strategy": strategy, "max_failures": 2,
                  "num_workers": 2, "cpus_per_worker": CPUS_PER_WORKER},
        "tune": {"space": {"methods": {"lora": {"rank": 4}, "linear_probe": {}},
                           "lr": [1e-2]},
                 "searcher": "grid", "scheduler": "fifo", "max_concurrent_trials": 2,
                 "max_trial_failures": 2},
    }
    path = storage / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_tune(cluster, path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120"}
    env.pop("MLFLOW_TRACKING_URI", None)
    # its own session: SIGINT to its process group is a terminal's Ctrl-C
    return subprocess.Popen(
        [sys.executable, "-m", "peftpipe", "tune", str(path), "--address", cluster.gcs_address],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"peftpipe tune still running after {timeout}s:\n{out[-4000:]}")
    return proc.returncode, out


def committed(trial: Path) -> int:
    """The step of the trial's latest committed checkpoint (0: none yet)."""
    try:
        snap = json.loads((trial / "checkpoint_manager_snapshot.json").read_text())
        return max(int(c["metrics"]["step"]) for c in snap["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


def trial_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "trials").glob("*") if (p / "workers").is_dir())


def wait_checkpointed(proc: subprocess.Popen, run_dir: Path, timeout: float = 150) -> None:
    """Until both trials have committed a checkpoint (so a resume starts past step 0)."""
    deadline = time.time() + timeout
    while not (len(trial_dirs(run_dir)) == 2 and all(committed(t) for t in trial_dirs(run_dir))):
        if proc.poll() is not None:
            pytest.fail(f"the search ended before the fault:\n{proc.stdout.read()[-4000:]}")
        assert time.time() < deadline, "no checkpoint of both trials in time"
        time.sleep(0.2)


def placement(cluster, trial: Path) -> dict[str, object]:
    """Which node hosts the trial's driver and each of its workers, from their pid files
    and Ray's State API (actor pid -> node)."""
    from ray.util.state import list_actors

    names = {n.node_id: n.name for n in cluster.nodes}
    actors = list_actors(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")],
                         detail=True, limit=1000, raise_on_missing_output=False)
    node_of = {a.pid: names.get(a.node_id) for a in actors}
    pid = {f.stem: int(f.read_text()) for f in (trial / "workers").glob("*.pid")}
    return {"driver": node_of.get(pid.get("driver")),
            "workers": sorted(node_of.get(p) for k, p in pid.items() if k.startswith("rank"))}


def outcomes(run_dir: Path) -> dict[str, dict]:
    return {t["trial_id"]: t for t in json.loads((run_dir / "trials.json").read_text())["trials"]}


def mlflow_runs(run_dir: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("peft-pipelines")
    return client.search_runs([exp.experiment_id], max_results=100)


def test_sigint_ends_every_run_and_exits_130(cluster, inputs) -> None:
    run_dir = Path(cluster.storage) / "faults-sigint"
    proc = start_tune(cluster, recipe(cluster, inputs, "faults-sigint", max_steps=2 * STEPS,
                                      strategy="STRICT_SPREAD"))
    wait_checkpointed(proc, run_dir)
    where = {t.name: placement(cluster, t) for t in trial_dirs(run_dir)}
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    code, out = finish(proc, timeout=120)
    print(f"stopped in {time.time() - t0:.1f}s")
    assert code == 130, out[-4000:]
    assert "stopped by SIGINT" in out and "Traceback" not in out, out[-4000:]
    runs = mlflow_runs(run_dir)
    assert len(runs) == 3, [(r.info.run_name, r.info.status) for r in runs]  # parent + 2 trials
    assert {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status)
                                                         for r in runs]
    for trial, p in where.items():  # STRICT_SPREAD: a trial's two workers on two nodes
        assert len(p["workers"]) == 2 and None not in p["workers"], (trial, p)
        assert len(set(p["workers"])) == 2, f"trial {trial}: both workers on {p['workers']}"


def _search_with_a_lost_node(cluster, inputs, name: str, pick) -> None:
    """Run a search, SIGKILL the raylet of the node ``pick(placements)`` names once both
    trials have a checkpoint, and check the search still ends with every trial completed."""
    run_dir = Path(cluster.storage) / name
    proc = start_tune(cluster, recipe(cluster, inputs, name, max_steps=STEPS))
    killed: dict[str, object] = {}
    try:
        wait_checkpointed(proc, run_dir)
        where = {t.name: placement(cluster, t) for t in trial_dirs(run_dir)}
        trial, node = pick(where)
        killed.update(trial=trial, node=node, placement=where,
                      at_step=committed(run_dir / "trials" / trial))
        local.kill_node(cluster.root, node, "raylet")
        t0 = time.time()
        code, out = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"{name}: killed {killed}; the search ended {time.time() - t0:.1f}s later")
    assert code == 0, out[-5000:]
    trials = outcomes(run_dir)
    assert len(trials) == 2 and all(t["status"] == "completed" for t in trials.values()), trials
    assert all(t["metrics"]["step"] == STEPS for t in trials.values())
    hit = trials[killed["trial"]]
    assert hit["metrics"]["resumed_from"] > 0, (killed, hit["metrics"])
    assert {r.info.status for r in mlflow_runs(run_dir)} == {"FINISHED"}
    # the node is gone: Ray declared it dead
    states = {n["node_name"]: n["state"] for n in local.alive_nodes(cluster.dashboard_url)}
    assert states.get(killed["node"]) == "DEAD", states


def test_lost_node_of_a_trials_workers_is_survived(cluster, inputs) -> None:
    def pick(where: dict[str, dict]) -> tuple[str, str]:
        # a node with a worker of the trial but not its driver: a worker-level failure
        for trial, p in sorted(where.items()):
            others = [n for n in p["workers"] if n and n != p["driver"]]
            if others:
                return trial, others[0]
        pytest.fail(f"every trial has its workers on its driver's node: {where}")

    _search_with_a_lost_node(cluster, inputs, "faults-workers", pick)


def test_lost_node_of_a_trials_driver_is_survived(cluster, inputs) -> None:
    def pick(where: dict[str, dict]) -> tuple[str, str]:
        trial, p = sorted(where.items())[0]
        assert p["driver"] not in (None, "head"), where
        return trial, p["driver"]

    _search_with_a_lost_node(cluster, inputs, "faults-driver", pick)

