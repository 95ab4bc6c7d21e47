"""The local cluster's state file and process bookkeeping, without starting Ray: atomic
JSON round trip, address matching, pid-reuse safety, and `down` stopping exactly the
recorded processes (plain sleeping processes stand in for nodes here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from cluster import local

pytestmark = pytest.mark.timeout(60)


def _sleeper(*extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", *extra],
                            start_new_session=True)


def _state(tmp_path, procs, temp_dir="/tmp/peftpipe-ray-test0000") -> local.ClusterState:
    nodes = [local.Node(name, f"peftpipe_{name}", 1, 0, local.Proc.of(p.pid),
                        str(tmp_path / "x.log"),
                        temp_dir=f"{temp_dir}/{name}")
             for name, p in procs]
    return local.ClusterState(root=str(tmp_path), temp_dir=temp_dir, storage=str(tmp_path / "s"),
                              gcs_address="127.0.0.1:6380", dashboard_url="http://127.0.0.1:8266",
                              client_address="ray://127.0.0.1:10002", nodes=nodes,
                              mlflow_uri="http://127.0.0.1:5001")


def test_state_file_round_trip_and_atomic_write(tmp_path) -> None:
    p = _sleeper()
    try:
        st = _state(tmp_path, [("head", p)])
        path = local.write_state(st)
        assert json.loads(path.read_text())["nodes"][0]["proc"]["pid"] == p.pid
        assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed into place
        again = local.read_state(tmp_path)
        assert again == st and again.node("head").proc.alive()
        assert again.env()["RAY_ADDRESS"] == "127.0.0.1:6380"
    finally:
        p.kill()
        p.wait()


def test_find_state_matches_any_of_its_addresses(tmp_path) -> None:
    local.write_state(_state(tmp_path, []))
    for addr in ("http://127.0.0.1:8266", "http://localhost:8266/", "127.0.0.1:8266",
                 "127.0.0.1:6380", "ray://127.0.0.1:10002", None):
        assert local.find_state(addr, tmp_path) is not None, addr
    assert local.find_state("http://10.0.0.5:8265", tmp_path) is None
    assert local.find_state(None, tmp_path / "elsewhere") is None


def test_unreadable_state_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(local.ClusterError, match="cluster up"):
        local.read_state(tmp_path)
    (tmp_path / local.STATE_FILE).write_text("{}")
    with pytest.raises(local.ClusterError, match="not a cluster state file"):
        local.read_state(tmp_path)


def test_a_reused_pid_is_not_ours() -> None:
    me = psutil.Process()
    assert local.Proc(me.pid, me.create_time()).alive()
    assert not local.Proc(me.pid, me.create_time() - 100).alive()


def test_down_stops_recorded_processes_their_children_and_the_clusters_own(tmp_path) -> None:
    temp_dir = f"/tmp/peftpipe-ray-t{os.getpid()}"
    head = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        "time.sleep(600)")],
        start_new_session=True)
    worker = _sleeper()
    stray = _sleeper(f"--temp-dir={temp_dir}/w1")  # not recorded, but names the cluster's folder
    bystander = _sleeper(f"--temp-dir={temp_dir}x/w1")  # another cluster's folder
    try:
        deadline = time.time() + 20
        while not psutil.Process(head.pid).children() and time.time() < deadline:
            time.sleep(0.1)
        child = psutil.Process(head.pid).children()[0].pid
        local.write_state(_state(tmp_path, [("head", head), ("worker-1", worker)], temp_dir))
        assert set(local.live_processes(tmp_path)) == {head.pid, child, worker.pid, stray.pid}
        stopped = local.down(tmp_path, grace_s=5)
        assert set(stopped) == {head.pid, child, worker.pid, stray.pid}
        for p in (head, worker, stray):
            assert p.wait(timeout=10) is not None
        assert (not psutil.pid_exists(child)
                or psutil.Process(child).status() == psutil.STATUS_ZOMBIE)
        assert bystander.poll() is None, "a process of another cluster was stopped"
        assert not (tmp_path / local.STATE_FILE).exists()
    finally:
        for p in (head, worker, stray, bystander):
            if p.poll() is None:
                p.kill()
                p.wait()
