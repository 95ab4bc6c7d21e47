"""A real ``mlflow server`` process on 127.0.0.1 for tests (SQLite backend, local artifacts)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(root: Path, timeout_s: float = 120) -> Iterator[str]:
    """Start a server, yield its URI, stop it by pid (and its workers) afterwards."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(root / "artifacts"), "--workers", "1",
    ]
    log = open(root / "server.log", "w")  # noqa: SIM115
    # MLflow 3's job runner starts ~8 huey consumer processes (~240 MB each) that tracking
    # and the registry never use: on a 2-core machine they only slow everything else down.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(uri + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError(f"mlflow server not up after {timeout_s}s") from None
                time.sleep(0.5)
        yield uri
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()
