"""`on_cluster` without Ray Client is a plain call (the Ray Client path is exercised on a live
cluster, see docs/cluster.md)."""

from __future__ import annotations

import pytest

from cluster.remote import is_client, on_cluster

pytestmark = pytest.mark.timeout(60)


def test_without_ray_client_the_function_runs_here() -> None:
    assert not is_client()
    assert on_cluster(lambda a, b=0: a + b, 2, b=3) == 5
