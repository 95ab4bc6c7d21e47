"""A local multi-node Ray cluster on one host, plus an MLflow server, for tests and laptops.

``up`` starts a head and N worker nodes, each a separate ``ray start --block`` process on
127.0.0.1 with its own CPUs, GPUs, a custom resource naming it (``peftpipe_head``,
``peftpipe_worker_1``, ...) and its own Ray temp folder under one short cluster folder (nodes
on one host must not share ``runtime_resources``: a node installing a job's working dir
would delete the copy another node's driver runs in); then an ``mlflow server`` (SQLite
backend, artifacts served from a local folder). Everything about the cluster
(addresses, ports, pids, folders) goes into one JSON state file, written atomically.

``down`` stops exactly the processes of that cluster: the recorded pids (checked against
their recorded start times, so a reused pid is never hit), their descendants, and any
process whose command line names this cluster's own Ray temp folder (Ray's agents and
workers do), SIGTERM first, SIGKILL after a grace period. Nothing else on the machine is
touched: other Ray instances keep running.

The cluster never writes ``/tmp/ray/ray_current_cluster``: its temp folder is its own, so a
``ray.init()`` elsewhere on the machine still starts a fresh local Ray instead of joining it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipelines import compat
from pipelines.errors import JobError

from . import mlflow_server

STATE_FILE = "cluster.json"
DEFAULT_ROOT = "runs/cluster"
HOST = "127.0.0.1"


class ClusterError(JobError):
    """The local cluster could not be started, found or stopped: ``cluster up|down|status``
    exit 1 (an operation on processes that failed, even when a port or the state file is
    the cause)."""


@dataclasses.dataclass
class Proc:
    """A process we started: its pid and start time (to tell it from a later reused pid)."""

    pid: int
    create_time: float

    @classmethod
    def of(cls, pid: int) -> Proc:
        import psutil

        return cls(pid, psutil.Process(pid).create_time())

    def process(self):
        """The live ``psutil.Process``, or None when gone (or the pid was reused)."""
        import psutil

        try:
            p = psutil.Process(self.pid)
            if abs(p.create_time() - self.create_time) > 0.05 or \
                    p.status() == psutil.STATUS_ZOMBIE:
                return None
            return p
        except psutil.Error:
            return None

    def alive(self) -> bool:
        return self.process() is not None


@dataclasses.dataclass
class Node:
    name: str  # head, worker-1, worker-2, ...
    resource: str  # its custom resource (1 unit): peftpipe_head, peftpipe_worker_1, ...
    num_cpus: float
    num_gpus: int
    proc: Proc  # the `ray start --block` process (leader of its own process group)
    log: str
    temp_dir: str = ""  # this node's Ray temp folder (sessions, sockets, runtime envs)
    raylet: Proc | None = None
    node_id: str | None = None
    node_ip: str | None = None  # Ray announces the host's address even when told 127.0.0.1


@dataclasses.dataclass
class ClusterState:
    """Everything ``down``/``status`` and clients need; ``to_dict`` is the state file."""

    root: str
    temp_dir: str  # the cluster's folder of the nodes' Ray temp folders
    storage: str  # the shared folder every node reaches: run outputs and checkpoints
    gcs_address: str  # HOST:PORT, for `ray start --address` and ray.init(address=...)
    dashboard_url: str  # http://HOST:PORT, for Ray Job submission and the State API
    client_address: str  # ray://HOST:PORT, for Ray Client (ray.init("ray://..."))
    nodes: list[Node]
    mlflow_uri: str | None = None
    mlflow: Proc | None = None
    created_at: float = dataclasses.field(default_factory=time.time)
    # Ray token authentication as the nodes run it: "token" (RAY_AUTH_MODE), the token file
    # clients read (None: $RAY_AUTH_TOKEN, or no token mode)
    auth_mode: str | None = None
    auth_token_path: str | None = None

    @property
    def state_file(self) -> Path:
        return Path(self.root) / STATE_FILE

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r}; nodes: {[n.name for n in self.nodes]}")

    @property
    def workers(self) -> list[Node]:
        return [n for n in self.nodes if n.name != "head"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterState:
        d = dict(d)
        nodes = []
        for n in d.pop("nodes"):
            n = dict(n)
            n["proc"] = Proc(**n["proc"])
            n["raylet"] = Proc(**n["raylet"]) if n.get("raylet") else None
            nodes.append(Node(**n))
        mlf = d.pop("mlflow", None)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(nodes=nodes, mlflow=Proc(**mlf) if mlf else None,
                   **{k: v for k, v in d.items() if k in known})

    def env(self) -> dict[str, str]:
        """Environment variables that point clients at this cluster: Ray's own tools too
        (``ray status``, ``ray job ...``, the dashboard), with the token the nodes check."""
        env = {"RAY_ADDRESS": self.gcs_address, "RAY_API_SERVER_ADDRESS": self.dashboard_url,
               "PEFTPIPE_STORAGE": self.storage}
        if self.auth_mode:
            env["RAY_AUTH_MODE"] = self.auth_mode
            if self.auth_token_path:
                env["RAY_AUTH_TOKEN_PATH"] = self.auth_token_path
        if self.mlflow_uri:
            env["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        return env

    def logs(self) -> dict[str, str]:
        """Where every log of the cluster is (``up`` and ``status`` print these)."""
        root = Path(self.root)
        out = {"nodes": f"{root / 'logs'}/{{head,worker-N}}.log (each node's `ray start`)",
               "ray": f"{self.temp_dir}/<h|wN>/session_latest/logs (Ray's daemons and "
                      f"workers; moved to {root / 'logs' / 'ray'} by `down`)",
               "jobs": "`ray job logs <id>`; each run's own log: "
                       f"{self.storage}/<recipe>/logs/peftpipe.log"}
        if self.mlflow is not None:
            out["mlflow"] = str(root / "mlflow" / "server.log")
        return out


# -- the state file ------------------------------------------------------------------------------

def write_state(state: ClusterState) -> Path:
    """Write the state file atomically (a temp file in the same folder, then rename)."""
    # imported here: peft_core loads torch, which `cluster status|down` never need
    from peft_core.files import atomic_write_text

    return atomic_write_text(state.state_file, json.dumps(state.to_dict(), indent=2))


def read_state(root: str | Path = DEFAULT_ROOT) -> ClusterState:
    path = Path(root) / STATE_FILE
    if not path.is_file():
        raise ClusterError(f"no local cluster under {Path(root).resolve()} ({STATE_FILE} missing); "
                           "start one with `peftpipe cluster up`")
    try:
        return ClusterState.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as e:
        raise ClusterError(f"{path}: not a cluster state file: {e}") from e


def find_state(address: str | None, root: str | Path = DEFAULT_ROOT) -> ClusterState | None:
    """The local cluster under ``root`` if it serves ``address`` (any of its addresses;
    None matches), else None."""
    try:
        state = read_state(root)
    except ClusterError:
        return None
    if address is None:
        return state
    norm = address.rstrip("/").replace("localhost", HOST)
    ours = {state.gcs_address, state.dashboard_url, state.client_address,
            state.dashboard_url.removeprefix("http://")}
    return state if norm in ours or norm.removeprefix("http://") in ours else None


# -- starting --------------------------------------------------------------------------------------

def _temp_dir(root: Path) -> str:
    # Unix socket paths are limited to ~107 bytes and Ray nests session and socket names
    # under its temp folder: keep it short, and unique per cluster root.
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:8]
    return f"/tmp/peftpipe-ray-{digest}"


def _ray_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("ray")
    if exe.is_file():
        return [str(exe)]
    return compat.ray_cli_command()


def _node_env(fast_failure_detection: bool) -> dict[str, str]:
    env = dict(os.environ)
    # Job drivers run `python ...`: make it this interpreter, wherever `up` was called from.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("RAY_ADDRESS", None)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if fast_failure_detection:
        for k, v in compat.fast_node_failure_detection_env().items():
            env.setdefault(k, v)  # an operator's own value is kept
    return env


def _start_node(args: list[str], log: Path, env: dict[str, str]) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        p = subprocess.Popen(_ray_cmd() + ["start", "--block", *args], stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             start_new_session=True)
    return Proc.of(p.pid)


def client_auth() -> dict[str, str]:
    """Ray's token authentication (on by default for ``ray start`` since Ray 2.5x): let this
    process's Ray clients (job submission, State API) use the user's token
    (``$RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``) when there is one, and return the HTTP
    headers that carry it for our own requests. ``RAY_AUTH_MODE`` set by the user wins.
    Ray has no public function for this (see :func:`pipelines.compat.ray_client_auth_headers`)."""
    return compat.ray_client_auth_headers()


def auth_settings() -> tuple[str | None, str | None]:
    """``(RAY_AUTH_MODE, token file)`` this process runs Ray with after :func:`client_auth`:
    what a shell needs exported for ``ray status`` or ``ray job`` to reach the cluster. The
    file is ``$RAY_AUTH_TOKEN_PATH`` or Ray's default ``~/.ray/auth_token``; None when the
    token comes from ``$RAY_AUTH_TOKEN`` (never printed) or there is none."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if not mode or mode.lower() != "token":
        return (mode or None), None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "token", None
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return "token", path


def _get_json(url: str, timeout: float = 3) -> Any:
    req = urllib.request.Request(url, headers=client_auth())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise ClusterError(f"{url}: the dashboard refuses this client ({e.code}); Ray token "
                               "authentication needs the same token on both sides "
                               "($RAY_AUTH_TOKEN or ~/.ray/auth_token)") from e
        raise


def _wait(what: str, check, timeout_s: float, procs: list[tuple[Proc, str]]) -> Any:
    deadline = time.time() + timeout_s
    while True:
        for proc, log in procs:
            if not proc.alive():
                tail = Path(log).read_text()[-3000:] if Path(log).is_file() else ""
                raise ClusterError(f"{what}: process {proc.pid} exited; its log ({log}):\n{tail}")
        try:
            got = check()
            if got:
                return got
        except ClusterError:
            raise
        except Exception:  # not up yet
            pass
        if time.time() > deadline:
            raise ClusterError(f"{what}: not ready after {timeout_s:g}s")
        time.sleep(0.5)


def alive_nodes(dashboard_url: str) -> list[dict[str, Any]]:
    """The cluster's nodes as Ray's State API lists them (alive and dead)."""
    from ray.util.state import list_nodes

    client_auth()
    return [dataclasses.asdict(n) if dataclasses.is_dataclass(n) else dict(n)
            for n in list_nodes(address=dashboard_url, detail=True, timeout=10,
                                raise_on_missing_output=False)]


def _find_child(proc: Proc, name: str) -> Proc | None:
    p = proc.process()
    if p is None:
        return None
    import psutil

    for c in p.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if c.name() == name:
                return Proc(c.pid, c.create_time())
    return None


def up(root: str | Path = DEFAULT_ROOT, *, workers: int = 2, cpus: float = 1,
       head_cpus: float | None = None, gpus: int = 0, object_store_mb: int = 256,
       dashboard_port: int | None = None, port: int | None = None,
       client_port: int | None = None, mlflow: bool = True, mlflow_port: int | None = None,
       fast_failure_detection: bool = True, timeout_s: float = 180) -> ClusterState:
    """Start the cluster under ``root`` (state file, logs, storage and MLflow store live
    there) and return its state once every node is alive in the GCS and MLflow answers.

    ``cpus``/``gpus``: what each worker node advertises (logical: nodes share this host's
    cores); ``head_cpus``: the head's CPUs (default ``cpus``). Ports default to free ones.
    On any failure everything already started is stopped again.
    """
    if workers < 0:
        raise ClusterError("workers: must be >= 0")
    root = Path(root).resolve()
    temp_dir, storage = _fresh_root(root)
    logs = root / "logs"
    free = mlflow_server.free_port
    port = port or free()
    dashboard_port = dashboard_port or free()
    client_port = client_port or free()
    _check_ports(dashboard_port, client_port, port, mlflow_port if mlflow else None)
    client_auth()  # nodes inherit RAY_AUTH_MODE=token when the user has a token
    env = _node_env(fast_failure_detection)
    object_store = str(int(object_store_mb * 1024 * 1024))
    common = ["--node-ip-address", HOST, "--object-store-memory", object_store,
              "--disable-usage-stats"]

    state = ClusterState(
        root=str(root), temp_dir=temp_dir, storage=str(storage),
        gcs_address=f"{HOST}:{port}", dashboard_url=f"http://{HOST}:{dashboard_port}",
        client_address=f"ray://{HOST}:{client_port}", nodes=[],
    )
    try:
        head_cpus = cpus if head_cpus is None else head_cpus
        head_tmp = f"{temp_dir}/h"
        state.auth_mode, state.auth_token_path = auth_settings()
        head = _start_node([
            "--head", "--port", str(port), "--num-cpus", _num(head_cpus), "--num-gpus", "0",
            "--resources", json.dumps({"peftpipe_head": 1}), "--node-name", "head",
            "--include-dashboard", "true", "--dashboard-host", HOST,
            "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(client_port),
            "--dashboard-agent-listen-port", str(free()), "--temp-dir", head_tmp, *common,
        ], logs / "head.log", env)
        state.nodes.append(Node("head", "peftpipe_head", head_cpus, 0, head, str(logs / "head.log"),
                                temp_dir=head_tmp))
        write_state(state)  # from here on, `down` can clean up whatever happens
        if mlflow:
            mproc, state.mlflow_uri = mlflow_server.start(root / "mlflow", port=mlflow_port)
            state.mlflow = Proc.of(mproc.pid)
            write_state(state)
        _wait("ray head", lambda: _get_json(state.dashboard_url + "/api/version"), timeout_s,
              [(head, str(logs / "head.log"))])
        client_auth()  # the head may just have created the user's first token
        state.auth_mode, state.auth_token_path = auth_settings()
        env = _node_env(fast_failure_detection)
        for i in range(1, workers + 1):
            name, log, tmp = f"worker-{i}", logs / f"worker-{i}.log", f"{temp_dir}/w{i}"
            proc = _start_node([
                "--address", state.gcs_address, "--num-cpus", _num(cpus), "--num-gpus", str(gpus),
                "--resources", json.dumps({f"peftpipe_worker_{i}": 1}), "--node-name", name,
                "--dashboard-agent-listen-port", str(free()), "--temp-dir", tmp, *common,
            ], log, env)
            state.nodes.append(Node(name, f"peftpipe_worker_{i}", cpus, gpus, proc, str(log),
                                    temp_dir=tmp))
            write_state(state)

        _record_nodes(state, _wait("ray nodes", lambda: _all_alive(state), timeout_s,
                                   [(n.proc, n.log) for n in state.nodes]))
        if state.mlflow is not None:
            mlog = root / "mlflow" / "server.log"
            _wait("mlflow server", lambda: mlflow_server.healthy(state.mlflow_uri), timeout_s,
                  [(state.mlflow, str(mlog))])
        write_state(state)
        return state
    except BaseException:
        with contextlib.suppress(Exception):
            down(root)
        raise


def _fresh_root(root: Path) -> tuple[str, Path]:
    """``(temp dir, storage folder)`` of a cluster about to start under ``root``: refused
    while the last one there still runs, its leftover files swept otherwise."""
    try:
        old = read_state(root)
    except ClusterError:
        old = None
    if old is not None:
        if _live_processes(old):
            raise ClusterError(f"a cluster is already running under {root} "
                               f"(dashboard {old.dashboard_url}); `peftpipe cluster down` first")
        _sweep_files(old)
    temp_dir = _temp_dir(root)
    if Path(temp_dir).exists():
        shutil.rmtree(temp_dir, ignore_errors=True)
    storage = root / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    return temp_dir, storage


def _check_ports(dashboard_port: int, client_port: int, gcs_port: int,
                 mlflow_port: int | None) -> None:
    """Each port the cluster will listen on is free, or a ClusterError naming it."""
    if mlflow_port is not None and not port_free(mlflow_port):
        raise ClusterError(f"mlflow port {mlflow_port}: already in use (give another, "
                           "or 0 for any free one)")
    for what, p in (("dashboard", dashboard_port), ("ray client", client_port),
                    ("gcs", gcs_port)):
        if not port_free(p):
            raise ClusterError(f"{what} port {p}: already in use (give another, or 0 for "
                               "any free one)")


def _all_alive(state: ClusterState) -> dict[str, dict[str, Any]] | None:
    """The GCS's alive nodes by name once every node of ``state`` is among them."""
    nodes = [n for n in alive_nodes(state.dashboard_url) if n["state"] == "ALIVE"]
    by_name = {n["node_name"]: n for n in nodes}
    return by_name if all(n.name in by_name for n in state.nodes) else None


def _record_nodes(state: ClusterState, found: dict[str, dict[str, Any]]) -> None:
    """Each started node's Ray id, IP and raylet process, from the GCS's alive nodes."""
    for n in state.nodes:
        n.node_id = found[n.name]["node_id"]
        n.node_ip = found[n.name].get("node_ip")
        n.raylet = _find_child(n.proc, "raylet")


def port_free(port: int, host: str = HOST) -> bool:
    """Whether nobody listens on ``host:port`` now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def preferred_port(port: int, host: str = HOST) -> int:
    """``port`` when it is free, else any free one (a second cluster, a busy 8265)."""
    return port if port_free(port, host) else mlflow_server.free_port(host)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# -- stopping --------------------------------------------------------------------------------------

def _live_processes(state: ClusterState) -> list:
    """Every live process of this cluster: recorded ones, their descendants, and any process
    whose command line names the cluster's own Ray temp folder."""
    import psutil

    found: dict[int, Any] = {}
    recorded = [n.proc for n in state.nodes] + [n.raylet for n in state.nodes if n.raylet]
    if state.mlflow:
        recorded.append(state.mlflow)
    for rec in recorded:
        p = rec.process()
        if p is None:
            continue
        found[p.pid] = p
        with contextlib.suppress(psutil.Error):
            for c in p.children(recursive=True):
                found[c.pid] = c
    if state.mlflow and state.mlflow.alive():
        # the server's web workers share its process group
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if os.getpgid(p.pid) == state.mlflow.pid:
                    found[p.pid] = p
    marker = state.temp_dir.rstrip("/") + "/"
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if any(marker in a or a.endswith(state.temp_dir) for a in p.info["cmdline"] or ()):
                found[p.pid] = p
    found.pop(os.getpid(), None)
    alive = []
    for p in found.values():
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


def live_processes(root: str | Path = DEFAULT_ROOT) -> list[int]:
    """Pids of the cluster's processes that are still running."""
    return sorted(p.pid for p in _live_processes(read_state(root)))


def down(root: str | Path = DEFAULT_ROOT, *, grace_s: float = 10,
         keep_logs: bool = True) -> list[int]:
    """Stop every process of the cluster under ``root``; returns the pids that were stopped.
    Ray's session logs are moved to ``{root}/logs/ray`` (``keep_logs``) and the temp folder
    removed. Raises :class:`ClusterError` if a process survives SIGKILL.

    Ray's daemons, workers and MLflow get SIGTERM and ``grace_s`` seconds to exit; the
    ``ray start --block`` monitors are then SIGKILLed (on SIGTERM they would drain the node
    for up to 30 s, with nothing left to drain)."""
    import psutil

    state = read_state(root)
    procs = _live_processes(state)
    stopped = [p.pid for p in procs]
    monitors = {n.proc.pid for n in state.nodes}
    daemons = [p for p in procs if p.pid not in monitors]
    for p in daemons:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    rest = _wait_gone(daemons, grace_s)
    # the monitors, stragglers, and anything spawned meanwhile: SIGKILL, until none is left
    for _ in range(3):
        rest = list({p.pid: p for p in rest + _live_processes(state)}.values())
        if not rest:
            break
        stopped += [p.pid for p in rest if p.pid not in stopped]
        for p in rest:
            with contextlib.suppress(psutil.Error):
                p.kill()
        rest = _wait_gone(rest, 5)
    left = _live_processes(state)
    if left:
        raise ClusterError(f"processes still running after SIGKILL: {[p.pid for p in left]}")
    _reap_children(state)
    _sweep_files(state, keep_logs=keep_logs)
    state.state_file.unlink(missing_ok=True)
    return sorted(set(stopped))


def _wait_gone(procs: list, timeout: float) -> list:
    """Wait until every process has exited (a zombie counts: its parent reaps it later);
    returns those still running after ``timeout``."""
    import psutil

    deadline = time.time() + timeout
    while True:
        rest = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    rest.append(p)
        if not rest or time.time() > deadline:
            return rest
        time.sleep(0.1)


def _reap_children(state: ClusterState) -> None:
    """Collect the exit status of processes this very process started (no zombies left)."""
    for rec in [n.proc for n in state.nodes] + ([state.mlflow] if state.mlflow else []):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(rec.pid, os.WNOHANG)


def _sweep_files(state: ClusterState, keep_logs: bool = True) -> None:
    temp = Path(state.temp_dir)
    if not temp.exists():
        return
    if keep_logs:
        dest = Path(state.root) / "logs" / "ray"
        by_dir = {Path(n.temp_dir).name: n.name for n in state.nodes if n.temp_dir}
        for session in sorted(temp.glob("*/session_2*")):
            logs = session / "logs"
            if logs.is_dir():
                target = dest / by_dir.get(session.parent.name, session.parent.name) / session.name
                shutil.rmtree(target, ignore_errors=True)
                with contextlib.suppress(OSError, shutil.Error):
                    shutil.copytree(logs, target, ignore_dangling_symlinks=True,
                                    ignore=shutil.ignore_patterns("*.sock"))
    shutil.rmtree(temp, ignore_errors=True)


# -- status ----------------------------------------------------------------------------------------

def status(root: str | Path = DEFAULT_ROOT) -> dict[str, Any]:
    """What runs: per node its process and whether the GCS sees it alive; MLflow's health."""
    state = read_state(root)
    try:
        seen = {n["node_name"]: n for n in alive_nodes(state.dashboard_url)
                if n["state"] == "ALIVE"}
        reachable = True
    except Exception:
        seen, reachable = {}, False
    nodes = []
    for n in state.nodes:
        nodes.append({
            "name": n.name, "pid": n.proc.pid, "process": "running" if n.proc.alive() else "gone",
            "ray": "ALIVE" if n.name in seen else "DEAD", "node_id": n.node_id,
            "cpus": n.num_cpus, "gpus": n.num_gpus, "resource": n.resource,
        })
    out = {
        "root": state.root, "gcs_address": state.gcs_address, "dashboard_url": state.dashboard_url,
        "client_address": state.client_address, "storage": state.storage,
        "ray_reachable": reachable, "nodes": nodes, "mlflow_uri": state.mlflow_uri,
        "logs": state.logs(),
    }
    if state.mlflow is not None:
        out["mlflow"] = "healthy" if state.mlflow_uri and mlflow_server.healthy(
            state.mlflow_uri) else ("running" if state.mlflow.alive() else "gone")
    return out


def kill_node(root: str | Path, name: str, what: str = "raylet") -> int:
    """Simulate losing a node: SIGKILL its raylet (``what="raylet"``) or its whole
    ``ray start`` process group (``what="node"``). Returns the pid killed."""
    state = read_state(root)
    node = state.node(name)
    if what == "raylet":
        raylet = node.raylet or _find_child(node.proc, "raylet")
        if raylet is None or not raylet.alive():
            raise ClusterError(f"{name}: no running raylet")
        os.kill(raylet.pid, signal.SIGKILL)
        return raylet.pid
    if what == "node":
        if not node.proc.alive():
            raise ClusterError(f"{name}: not running")
        os.killpg(node.proc.pid, signal.SIGKILL)
        return node.proc.pid
    raise ValueError(f"what: expected 'raylet' or 'node', got {what!r}")
