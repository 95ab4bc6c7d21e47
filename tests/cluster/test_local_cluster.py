"""A real 3-node local Ray cluster (head + 2 workers, 1 CPU each, separate `ray start`
processes) and a real MLflow server, used the way a user uses a remote cluster:

1. `up`: every node alive in Ray's State API, MLflow healthy, one JSON state file;
2. `submit` of the demo recipe (shrunk by overrides) as a Ray Job: a small search whose
   trials' workers land on different nodes (STRICT_SPREAD, checked from the State API), its
   winner promoted through the MLflow server, exit 0; a broken recipe submitted unchecked
   fails on the cluster and its exit code says so;
4. a worker node's raylet SIGKILLed mid-training: the run finishes from its checkpoint on the
   remaining nodes;
5. `down`: no process of the cluster is left.

The tests share one cluster and run in this order; each has a hard timeout.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import psutil
import pytest

from cluster import local
from cluster import submit as sub
from tests.pipelines import train_helpers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "120")
CPUS_PER_WORKER = 0.45  # two train workers fit on a 1-CPU node, with room for trial drivers


def _cluster_processes(state: local.ClusterState) -> list[int]:
    return sorted(p.pid for p in local._live_processes(state))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    t0 = time.time()
    state = local.up(root, workers=2, cpus=1, object_store_mb=128)
    print(f"\ncluster up in {time.time() - t0:.1f}s")
    yield state
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if (root / local.STATE_FILE).exists():  # a test failed before `down` was tested
        local.down(root)


@pytest.fixture(scope="module")
def driver(cluster):
    """This test process as a Ray driver on the cluster (as `peftpipe run --address` is)."""
    import ray

    ray.init(address=cluster.gcs_address, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(cluster):
    storage = Path(cluster.storage)
    data = train_helpers.write_dataset(storage / "data", "classification", rows=48, eval_rows=16)
    model = train_helpers.save_tiny("bert", storage / "bert")
    return data, model


def _node_names(cluster) -> dict[str, str]:
    return {n.node_id: n.name for n in cluster.nodes}


def _actors_by_pid(cluster, state: str | None = None) -> dict[int, dict]:
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker")]
    if state:
        filters.append(("state", "=", state))
    actors = list_actors(address=cluster.dashboard_url, filters=filters, detail=True, limit=1000,
                         raise_on_missing_output=False)
    return {a.pid: {"node_id": a.node_id, "state": a.state} for a in actors}


def test_up_starts_three_nodes_and_mlflow(cluster) -> None:
    st = local.status(cluster.root)
    assert [(n["name"], n["process"], n["ray"]) for n in st["nodes"]] == [
        ("head", "running", "ALIVE"), ("worker-1", "running", "ALIVE"),
        ("worker-2", "running", "ALIVE")]
    assert st["mlflow"] == "healthy"
    saved = json.loads((Path(cluster.root) / local.STATE_FILE).read_text())
    assert {n["name"]: n["proc"]["pid"] for n in saved["nodes"]} == {
        n.name: n.proc.pid for n in cluster.nodes}
    assert all(n.raylet and n.raylet.alive() for n in cluster.nodes)
    # each node advertises its own resources; together they are the cluster's
    nodes = {n["node_name"]: n for n in local.alive_nodes(cluster.dashboard_url)}
    for n in cluster.nodes:
        assert nodes[n.name]["resources_total"]["CPU"] == 1
        assert nodes[n.name]["resources_total"][n.resource] == 1
    # the cluster's Ray lives in its own temp folder: no `ray.init()` elsewhere joins it
    assert cluster.temp_dir.startswith("/tmp/peftpipe-ray-")
    assert (Path(cluster.node("head").temp_dir) / "ray_current_cluster").is_file()
    assert len({n.temp_dir for n in cluster.nodes}) == 3  # one per node: no shared runtime envs


def test_submit_demo_search_spreads_over_nodes_and_promotes_through_mlflow(cluster) -> None:
    """`peftpipe submit` of the demo recipe (shrunk by overrides): a 2-trial search whose
    trials each run 2 workers on different nodes (STRICT_SPREAD), tracked in and promoted
    through the cluster's MLflow server, outputs on the shared storage."""
    from mlflow import MlflowClient

    out: list[str] = []
    shrink = ["data.max_rows=120", "data.max_length=32", "train.max_eval_batches=2",
              "train.max_steps=4", "train.eval_every=2", "train.warmup_steps=0",
              "train.batch_size=8", "train.micro_batch_size=4",
              "train.placement_strategy=STRICT_SPREAD",
              "tune.space.methods={lora: {rank: 4, lr: 1.0e-3}, linear_probe: {lr: 1.0e-2}}",
              "tune.scheduler=fifo", "tune.max_concurrent_trials=2", "tune.workers_per_trial=2",
              f"tune.cpus_per_worker={CPUS_PER_WORKER}", "registry.model_name=cluster-demo"]
    t0 = time.time()
    code = sub.submit("demo", address=cluster.dashboard_url, overrides=shrink,
                      cluster_root=cluster.root, echo=out.append, timeout_s=240,
                      env={"RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120"})
    logs = "".join(out)
    print(f"submit demo: {time.time() - t0:.1f}s")
    assert code == 0, logs[-4000:]
    assert "SUCCEEDED" in logs, logs[-3000:]
    assert re.search(r"cluster-demo v1 .*is the new champion", logs), logs[-3000:]
    run_dir = Path(cluster.storage) / "demo"  # on the shared storage, not the job's folder
    assert (run_dir / "report.md").is_file()

    # Where the trials' workers ran, from Ray's State API (actor pid -> node).
    actors, names = _actors_by_pid(cluster), _node_names(cluster)
    used: dict[str, list[str]] = {}
    for trial in (run_dir / "trials").iterdir():
        pids = [int((trial / "workers" / f"rank{r}.pid").read_text()) for r in (0, 1)]
        used[trial.name] = [names[actors[p]["node_id"]] for p in pids]
    assert len(used) == 2, used
    for trial, nodes in used.items():
        assert len(set(nodes)) == 2, f"trial {trial}: both workers on {nodes}"
    assert len({n for nodes in used.values() for n in nodes}) == 3, used

    # Tracked in and promoted through the server: runs, registry, aliases and artifacts
    # live there, nothing in the run folder.
    client = MlflowClient(cluster.mlflow_uri)
    champion = client.get_model_version_by_alias("cluster-demo", "champion")
    assert champion.version == "1"
    exp = client.get_experiment_by_name("peft-pipelines")
    trials = client.search_runs([exp.experiment_id], "tags.`peftpipe.kind` = 'trial'")
    assert champion.run_id in {r.info.run_id for r in trials} and len(trials) == 2
    served = Path(cluster.root) / "mlflow" / "artifacts"
    assert list(served.rglob("adapter.safetensors")), "the server did not store the adapters"
    assert not (run_dir / "mlartifacts").exists() and not (run_dir / "mlflow.db").exists()


def test_submit_of_a_broken_recipe_exits_with_its_code(cluster) -> None:
    """A recipe broken in a way only the cluster notices (not checked before submitting):
    the job fails and the exit code says it was the recipe (2), not a crash."""
    out: list[str] = []
    code = sub.submit("demo", address=cluster.dashboard_url, check=False, cluster_root=cluster.root,
                      overrides=["train.max_stepz=3"], echo=out.append, timeout_s=120)
    logs = "".join(out)
    assert code == 2, logs[-3000:]
    assert "FAILED" in logs and "train.max_stepz" in logs


# enough steps after the first checkpoint that a tiny run cannot end before the node dies
STEPS = 120


def test_lost_worker_node_is_survived_from_the_checkpoint(cluster, driver, tiny) -> None:
    from pipelines.train import TrainConfig, train

    data, model = tiny
    run_dir = Path(cluster.storage) / "lost-node"
    cfg = TrainConfig.model_validate(dict(
        model={"name": str(model)}, method={"name": "lora", "rank": 4}, num_workers=2,
        cpus_per_worker=CPUS_PER_WORKER, placement_strategy="SPREAD", batch_size=8,
        micro_batch_size=4, max_steps=STEPS, eval_every=4, checkpoint_every=4, max_eval_batches=1,
        lr=1e-2, schedule="constant", max_failures=2))
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    names = _node_names(cluster)
    killed: dict[str, object] = {}

    def committed() -> int:
        try:
            return len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):
            return 0

    def victim() -> str | None:
        """The worker node one of this run's ranks runs on, once both have started."""
        pids = [run_dir / "workers" / f"rank{r}.pid" for r in (0, 1)]
        if not all(p.is_file() for p in pids):
            return None
        ours = {int(p.read_text()) for p in pids}
        on = {names.get(a["node_id"]) for pid, a in _actors_by_pid(cluster, "ALIVE").items()
              if pid in ours}
        return next(iter(sorted(n for n in on if n and n != "head")), None)

    def kill_a_worker_node_after_a_checkpoint() -> None:
        # The node is chosen before the first checkpoint: the State API can take seconds
        # under load, and a tiny run's remaining steps must not finish before the kill.
        deadline = time.time() + 200
        node = None
        while time.time() < deadline and not killed:
            node = node or victim()
            if node and committed() >= 1:
                killed["node"] = node
                killed["raylet"] = local.kill_node(cluster.root, node, "raylet")
                killed["at_step"] = committed()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_node_after_a_checkpoint, daemon=True)
    killer.start()
    t0 = time.time()
    res = train(cfg, manifest=data, run_dir=run_dir)
    print(f"train with a lost node: {time.time() - t0:.1f}s, killed {killed}")
    killer.join(timeout=5)
    assert killed, "no worker node was killed"
    steps = [r["step"] for r in res.history]
    assert steps == list(range(4, STEPS + 1, 4)), steps
    assert 4 <= res.history[-1]["resumed_from"] < STEPS, res.history[-1]
    # the node is gone for good: Ray declared it dead and its `ray start` process ended
    dead = {n["node_name"]: n["state"] for n in local.alive_nodes(cluster.dashboard_url)
            if n["node_name"] == killed["node"]}
    assert dead == {killed["node"]: "DEAD"}, dead
    node = next(n for n in cluster.nodes if n.name == killed["node"])
    deadline = time.time() + 30
    while node.proc.alive() and time.time() < deadline:
        time.sleep(0.5)
    assert not node.proc.alive()
    # and the finishing workers ran on the nodes that were left
    actors = _actors_by_pid(cluster)
    for r in (0, 1):
        pid = int((run_dir / "workers" / f"rank{r}.pid").read_text())
        assert names[actors[pid]["node_id"]] != killed["node"]


def test_down_leaves_no_process_behind(cluster) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    before = _cluster_processes(cluster)
    assert before
    t0 = time.time()
    stopped = local.down(cluster.root)
    print(f"down in {time.time() - t0:.1f}s ({len(stopped)} processes)")
    assert set(before) <= set(stopped)
    assert _cluster_processes(cluster) == []
    for pid in before:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (Path(cluster.root) / local.STATE_FILE).exists()
    assert not Path(cluster.temp_dir).exists()
    kept = Path(cluster.root) / "logs" / "ray"
    assert {p.parent.parent.name for p in kept.glob("*/session_*/raylet*.out")} == {
        "head", "worker-1", "worker-2"}
    with pytest.raises(local.ClusterError):
        local.status(cluster.root)
