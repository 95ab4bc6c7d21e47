"""Run driver code inside the cluster when this process is a Ray Client (``ray://``).

A Ray Client driver is a proxy: Ray Data's streaming executor needs a real core worker and
fails on a client (``'Worker' object has no attribute 'core_worker'``, Ray 2.60), and Tune
already moves its own driver into the cluster for the same reason. :func:`on_cluster` does
the same for any function: it runs it as a 0-CPU task on the head node (where job drivers
run too) and returns its result; without Ray Client it just calls the function here.

    with pipeline.ray_session(recipe, "ray://head:10001"):
        manifest, search = on_cluster(prepare_and_search, recipe)

The function and its arguments are pickled to the cluster, so paths they use must be on
storage the head node reaches (the recipe's ``run_dir`` on shared storage).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def is_client() -> bool:
    """Whether this process is connected to Ray through Ray Client."""
    import ray

    return bool(ray.util.client.ray.is_connected())


def head_node_id() -> str | None:
    import ray

    for n in ray.nodes():
        if n.get("Alive") and "node:__internal_head__" in (n.get("Resources") or {}):
            return n["NodeID"]
    return None


def on_cluster(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, run on the head node when this is a Ray Client driver."""
    if not is_client():
        return fn(*args, **kwargs)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: dict[str, Any] = {"num_cpus": 0, "max_retries": 0}
    head = head_node_id()
    if head is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=True)
    task = ray.remote(fn).options(**options)
    return ray.get(task.remote(*args, **kwargs))
