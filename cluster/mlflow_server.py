"""A real ``mlflow server`` process on loopback: SQLite backend store, local artifact folder
served through the server (``--artifacts-destination``), so clients on any node log and
download artifacts over HTTP and need no access to the server's disk.

Used by ``peftpipe cluster up`` (a long-lived server whose pid goes into the cluster state)
and by tests (:func:`mlflow_server`, a context manager that stops it afterwards).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (it may be taken again before it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(root: str | Path, *, host: str = "127.0.0.1", port: int | None = None,
          workers: int = 1) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow server`` with its store and artifacts under ``root``; returns the
    process (the leader of its own process group) and the server's URI. Does not wait:
    see :func:`wait_healthy`."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"), "--workers", str(workers),
    ]
    # MLflow 3's job runner starts ~8 huey consumer processes (~240 MB each) that tracking
    # and the registry never use: on a small node they only slow everything else down.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    return proc, f"http://{host}:{port}"


def wait_healthy(uri: str, proc: subprocess.Popen | None = None, *, timeout_s: float = 120,
                 log: str | Path | None = None) -> None:
    """Wait until ``{uri}/health`` answers; raise if the process exits or time runs out."""
    deadline = time.time() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            tail = Path(log).read_text()[-2000:] if log and Path(log).is_file() else ""
            raise RuntimeError(f"mlflow server exited with code {proc.returncode}: {tail}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                return
        except OSError:
            if time.time() > deadline:
                raise TimeoutError(f"mlflow server at {uri} not up after {timeout_s:g}s") from None
            time.sleep(0.5)


def healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=2):
            return True
    except OSError:
        return False


def stop(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    """Stop the server and its web workers (its process group), SIGKILL after ``timeout_s``."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def mlflow_server(root: str | Path, timeout_s: float = 120) -> Iterator[str]:
    """Start a server under ``root``, yield its URI, stop it (by its process group) afterwards."""
    proc, uri = start(root)
    try:
        wait_healthy(uri, proc, timeout_s=timeout_s, log=Path(root) / "server.log")
        yield uri
    finally:
        stop(proc)
