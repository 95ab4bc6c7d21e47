"""The README's "Run on a cluster" block, run exactly as written in a fresh folder: `cluster up`
(a real 3-node local Ray cluster, separate `ray start` processes of 1 CPU each, and an MLflow
server, its default root under that folder), the shortened demo submitted with no other
override, `cluster status`, `cluster down`; each must exit 0. On the same cluster, between
`status` and `down`:

- `up` left every node alive in Ray's State API, MLflow healthy, one JSON state file; the
  demo's search was tracked in and promoted through the MLflow server;
- Ray's own tools work with the `export` lines `up` printed (token authentication included);
- an infeasible placement exits 2 before anything starts: on the submitting machine, and in
  the job (submitted unchecked) before any trial starts; a recipe broken in a way only the
  cluster notices fails the job with exit 2;
- a placement that becomes unschedulable at run time (a 3-worker STRICT_SPREAD run that loses
  a node) fails with Ray's pending demand within `train.pending_timeout_s`;
- a worker node's raylet SIGKILLed mid-training: the run finishes from its checkpoint on the
  nodes left;
- `down` leaves no process of the cluster behind and keeps every node's logs.

One cluster for the module; the tests run in this order and the last one is the README's
`down` (the fixture brings the cluster down whatever happened). A search's trials spread
over nodes (STRICT_SPREAD) and surviving lost nodes are in `test_search_faults.py`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from cluster import local
from cluster import submit as sub
from tests.pipelines import train_helpers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

README = Path(__file__).resolve().parents[2] / "README.md"
BIN = Path(sys.executable).parent
CLIENT_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI",
               "PEFTPIPE_STORAGE")


def readme_cluster_commands(text: str) -> list[str]:
    """The commands of the first ```bash block of the README's "Run on a cluster" section
    (comments dropped, continuation lines joined)."""
    section = text.split("\n## Run on a cluster\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    return [" ".join(shlex.split(line, comments=True)) for line in joined.splitlines()
            if shlex.split(line, comments=True)]


def test_the_readme_block_is_up_submit_status_down() -> None:
    cmds = readme_cluster_commands(README.read_text())
    assert [c.split()[:3] for c in cmds] == [
        ["peftpipe", "cluster", "up"], ["peftpipe", "submit", "demo"],
        ["peftpipe", "cluster", "status"], ["peftpipe", "cluster", "down"]], cmds


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARS}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `peftpipe`, `ray` of this venv
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return {**env, **(extra or {})}


def sh(cmd: str, cwd: Path, timeout: float, env: dict[str, str] | None = None):
    t0 = time.time()
    out = subprocess.run(shlex.split(cmd), cwd=cwd, env=env or _env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=timeout)
    print(f"$ {cmd}  -> exit {out.returncode} in {time.time() - t0:.1f}s")
    return out


class Walk:
    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.cmds = readme_cluster_commands(README.read_text())
        self.outputs: dict[str, str] = {}
        self.exports: dict[str, str] = {}

    @property
    def root(self) -> Path:
        return self.cwd / local.DEFAULT_ROOT

    def state(self) -> local.ClusterState:
        return local.read_state(self.root)


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    w = Walk(tmp_path_factory.mktemp("readme-cluster"))
    yield w
    if (w.root / local.STATE_FILE).exists():  # a test failed before the README's `down`
        local.down(w.root)


# ~170 s alone; a clean-clone run with a benchmark beside it hit 300 s: a longer hard limit
@pytest.mark.timeout(450)
def test_up_then_the_shortened_demo_submit_succeed_as_written(walk) -> None:
    up, submit = walk.cmds[0], walk.cmds[1]
    out = sh(up, walk.cwd, 240)
    walk.outputs["up"] = out.stdout
    assert out.returncode == 0, out.stdout[-3000:]
    walk.exports = dict(re.findall(r"^\s+export (\w+)=(\S+)$", out.stdout, re.M))
    st = walk.state()
    assert [n.name for n in st.nodes] == ["head", "worker-1", "worker-2"]
    assert walk.exports["RAY_ADDRESS"] == st.gcs_address
    assert walk.exports["RAY_API_SERVER_ADDRESS"] == st.dashboard_url
    assert walk.exports["MLFLOW_TRACKING_URI"] == st.mlflow_uri
    assert "logs:" in out.stdout and str(walk.root / "logs") in out.stdout
    assert f"mlflow        {st.mlflow_uri}" in out.stdout

    t0 = time.time()
    out = sh(submit, walk.cwd, 280)
    walk.outputs["submit"] = out.stdout
    print(f"shortened demo on the cluster: {time.time() - t0:.0f}s")
    assert out.returncode == 0, out.stdout[-5000:]
    assert "SUCCEEDED" in out.stdout, out.stdout[-3000:]
    assert re.search(r"demo-sentiment v1 .*is the new champion", out.stdout), out.stdout[-3000:]
    run_dir = Path(st.storage) / "demo"
    assert (run_dir / "report.md").is_file()
    trials = json.loads((run_dir / "trials.json").read_text())
    assert len(trials["trials"]) == 4, trials

    # tracked in and promoted through the server: runs, registry, aliases and artifacts
    # live there, nothing in the run folder
    from mlflow import MlflowClient

    client = MlflowClient(st.mlflow_uri)
    champion = client.get_model_version_by_alias("demo-sentiment", "champion")
    assert champion.version == "1"
    exp = client.get_experiment_by_name("peft-pipelines")
    runs = client.search_runs([exp.experiment_id], "tags.`peftpipe.kind` = 'trial'")
    assert champion.run_id in {r.info.run_id for r in runs} and len(runs) == 4
    assert list((walk.root / "mlflow" / "artifacts").rglob("adapter.safetensors"))
    assert not (run_dir / "mlartifacts").exists() and not (run_dir / "mlflow.db").exists()


def test_up_started_three_nodes_and_mlflow(walk) -> None:
    cluster = walk.state()
    st = local.status(cluster.root)
    assert [(n["name"], n["process"], n["ray"]) for n in st["nodes"]] == [
        ("head", "running", "ALIVE"), ("worker-1", "running", "ALIVE"),
        ("worker-2", "running", "ALIVE")]
    assert st["mlflow"] == "healthy"
    saved = json.loads((walk.root / local.STATE_FILE).read_text())
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


def test_status_as_written_and_ray_tools_with_the_printed_exports(walk) -> None:
    out = sh(walk.cmds[2], walk.cwd, 60)
    assert out.returncode == 0, out.stdout
    assert "logs:" in out.stdout and "ray status" not in out.stdout
    env = _env(walk.exports)
    if walk.exports.get("RAY_AUTH_MODE") == "token":
        # without the token settings Ray's tools are refused: the exports are what makes
        # them work, not something else in this environment
        bare = _env({k: v for k, v in walk.exports.items() if not k.startswith("RAY_AUTH")})
        bare["RAY_AUTH_MODE"] = "disabled"
        refused = sh("ray job list", walk.cwd, 60, bare)
        assert refused.returncode != 0, refused.stdout[-2000:]
    status = sh("ray status", walk.cwd, 60, env)
    assert status.returncode == 0, status.stdout[-2000:]
    assert "Node status" in status.stdout and "3.0 CPU" in status.stdout, status.stdout
    jobs = sh("ray job list", walk.cwd, 60, env)
    assert jobs.returncode == 0, jobs.stdout[-2000:]
    assert "SUCCEEDED" in jobs.stdout, jobs.stdout[-2000:]


def _job_count(walk) -> int:
    from ray.job_submission import JobSubmissionClient

    local.client_auth()
    return len(JobSubmissionClient(walk.state().dashboard_url).list_jobs())


def test_an_infeasible_placement_exits_2_before_anything_starts(walk) -> None:
    before = _job_count(walk)
    # one 1-CPU worker per trial, two trials at once: no 1-CPU node holds a worker and a
    # trial driver's 0.01 CPU
    out = sh("peftpipe submit demo --set train.cpus_per_worker=1", walk.cwd, 120)
    assert out.returncode == 2, out.stdout[-3000:]
    assert "error: train.cpus_per_worker: 2 trials at once of 1 worker x 1 CPU (PACK) do not " \
        "fit on 3 alive nodes of 1 CPU each" in out.stdout, out.stdout
    assert "set train.cpus_per_worker <= 0.98" in out.stdout
    assert "Traceback" not in out.stdout
    assert _job_count(walk) == before  # nothing was submitted

    # submitted unchecked, the job's own check stops it before any trial starts
    out = sh("peftpipe submit demo --no-check --set train.cpus_per_worker=1 "
             "--set data.max_rows=300 --set name=infeasible", walk.cwd, 200)
    assert out.returncode == 2, out.stdout[-4000:]
    assert "train.cpus_per_worker <= 0.98" in out.stdout, out.stdout[-3000:]
    run_dir = Path(walk.state().storage) / "infeasible"
    assert not (run_dir / "trials").exists() and not (run_dir / "search").exists()


def test_submit_of_a_broken_recipe_exits_with_its_code(walk) -> None:
    """A recipe broken in a way only the cluster notices (not checked before submitting):
    the job fails and the exit code says it was the recipe (2), not a crash."""
    cluster, out = walk.state(), []
    code = sub.submit("demo", address=cluster.dashboard_url, check=False, cluster_root=cluster.root,
                      overrides=["train.max_stepz=3"], echo=out.append, timeout_s=120)
    logs = "".join(out)
    assert code == 2, logs[-3000:]
    assert "FAILED" in logs and "train.max_stepz" in logs


def test_a_placement_lost_at_run_time_fails_with_the_pending_demand(walk) -> None:
    """3 workers, one per node (STRICT_SPREAD): after a checkpoint a worker node's raylet is
    killed; Ray Train restarts the group (max_failures=1), which now needs 3 nodes of the 2
    left: it fails within max_failures + 1 tries of train.pending_timeout_s naming Ray's
    pending demand."""
    import ray

    from pipelines.train import TrainConfig, train
    from pipelines.train.scheduling import PendingResourcesError

    st = walk.state()
    storage = Path(st.storage)
    data = train_helpers.write_dataset(storage / "data", "classification", rows=48, eval_rows=16)
    model = train_helpers.save_tiny("bert", storage / "bert")
    timeout_s = 10
    cfg = TrainConfig.model_validate(dict(
        model={"name": str(model)}, method={"name": "lora", "rank": 4}, num_workers=3,
        cpus_per_worker=0.3, placement_strategy="STRICT_SPREAD", batch_size=6,
        micro_batch_size=2, max_steps=200, eval_every=2, checkpoint_every=2, max_eval_batches=1,
        schedule="constant", max_failures=1, pending_timeout_s=timeout_s))
    run_dir = storage / "pending"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    killed: dict[str, float] = {}

    def kill_a_worker_node_after_a_checkpoint() -> None:
        deadline = time.time() + 200
        while time.time() < deadline:
            if snapshot.is_file():
                local.kill_node(st.root, "worker-2", "raylet")
                killed["at"] = time.time()
                return
            time.sleep(0.1)

    ray.init(address=st.gcs_address, logging_level="ERROR", log_to_driver=False)
    try:
        killer = threading.Thread(target=kill_a_worker_node_after_a_checkpoint, daemon=True)
        killer.start()
        with pytest.raises(PendingResourcesError) as e:
            train(cfg, manifest=data, run_dir=run_dir)
        failed_at = time.time()
    finally:
        ray.shutdown()
    assert killed, "no node was killed"
    msg = str(e.value)
    print(f"failed {failed_at - killed['at']:.1f}s after the kill: {msg}")
    assert msg.startswith("train: 3 workers x {CPU: 0.3} (STRICT_SPREAD) could not be placed "
                          f"within train.pending_timeout_s={timeout_s}s"), msg
    assert "Ray's pending demand: 1 placement group(s)" in msg, msg
    assert "the cluster has 2 alive nodes" in msg, msg
    # within its 2 tries: node death detection (~3 s) + the restarts + the timeouts
    assert failed_at - killed["at"] < 2 * timeout_s + 45


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


def _cluster_processes(state: local.ClusterState) -> list[int]:
    return sorted(p.pid for p in local._live_processes(state))


# enough steps after the first checkpoint that a tiny run cannot end before the node dies
STEPS = 120
CPUS_PER_WORKER = 0.45  # both workers fit on the one node (the head) left after the kill


def test_lost_worker_node_is_survived_from_the_checkpoint(walk) -> None:
    """2 workers SPREAD over the nodes the pending test left (head, worker-1); worker-1's
    raylet SIGKILLed after the first checkpoint: Ray Train restarts the group on the head
    (train.max_failures) and the run ends from its checkpoint."""
    import ray

    from pipelines.train import TrainConfig, train

    local.client_auth()  # the State API lookups below, with the cluster's token
    cluster = walk.state()
    storage = Path(cluster.storage)
    data = train_helpers.write_dataset(storage / "data-lost", "classification", rows=48,
                                       eval_rows=16)
    model = train_helpers.save_tiny("bert", storage / "bert-lost")
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

    ray.init(address=cluster.gcs_address, logging_level="ERROR", log_to_driver=False)
    try:
        killer = threading.Thread(target=kill_a_worker_node_after_a_checkpoint, daemon=True)
        killer.start()
        t0 = time.time()
        res = train(cfg, manifest=data, run_dir=run_dir)
    finally:
        ray.shutdown()
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


def test_down_as_written_leaves_nothing(walk) -> None:
    state = walk.state()
    before = _cluster_processes(state)
    assert before
    out = sh(walk.cmds[3], walk.cwd, 120)
    assert out.returncode == 0, out.stdout
    assert _cluster_processes(state) == []
    for pid in before:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (walk.root / local.STATE_FILE).exists()
    assert not Path(state.temp_dir).exists()
    kept = walk.root / "logs" / "ray"
    assert {p.parent.parent.name for p in kept.glob("*/session_*/raylet*.out")} == {
        "head", "worker-1", "worker-2"}
    with pytest.raises(local.ClusterError):
        local.status(walk.root)
