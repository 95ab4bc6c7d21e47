"""Fixtures shared by the pipeline tests: one real local Ray cluster per test module."""

from __future__ import annotations

import os

import pytest

# Ray Data must fail fast rather than wait forever when train workers hold every CPU.
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "120")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance with 2 CPUs (the size of the CI machine), shut down after the
    module; reused as is when something already started Ray. With the dashboard: Ray Train's
    placement-group cleaner asks the State API whether the controller lives, and without it
    a loaded machine can see a live controller as dead and lose the workers' resources."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, logging_level="ERROR")
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def serve_port(ray_cluster):
    """Ray Serve's HTTP proxy on a free loopback port of the module's Ray, shut down after
    the module."""
    from ray import serve

    from cluster.mlflow_server import free_port

    p = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": p})
    yield p
    serve.shutdown()
