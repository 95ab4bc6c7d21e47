"""Connecting a driver process to Ray: :func:`ensure_ray` is the one ``ray.init`` of the
project (the stage commands, ``peftpipe serve``, one training run, the data stage alone);
:func:`ray_session` is a recipe's job around it (resource checks, logs, shutdown).

Cluster nodes themselves are started by ``ray start`` (``cluster/local.py``), not here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .console import link_ray_logs, quiet_ray, raylet_lines_to_log

if TYPE_CHECKING:
    from .recipe import Recipe

#: what a Ray started here gets unless the caller says otherwise (``local=``)
LOCAL_DEFAULTS: dict[str, Any] = {
    # The dashboard serves the State API that Ray Train's placement-group cleaner polls;
    # without it a live controller can be taken for dead on a loaded machine.
    "include_dashboard": True,
}


def ensure_ray(address: str | None = None, *, local: Mapping[str, Any] | None = None,
               **opts: Any) -> Any | None:
    """Connect this process to Ray unless it already is: join ``address`` (``auto``,
    ``HOST:PORT``, ``ray://...``), or with None start a local Ray (``RAY_ADDRESS``, when
    set, still wins, as in ``ray.init``).

    ``local``: options only a Ray started here takes (``num_cpus``, ``num_gpus``,
    ``include_dashboard``), on top of :data:`LOCAL_DEFAULTS`; left out when joining, where
    ``ray.init`` refuses them. ``opts`` go to ``ray.init`` either way (``logging_level``,
    ``log_to_driver``, ...).

    Returns ``ray.init``'s context when this call connected (the caller then owns the
    connection and may ``ray.shutdown()`` it), None when the process was connected already.
    """
    import ray

    if ray.is_initialized():
        return None
    kwargs = dict(opts)
    if address is None:
        kwargs.update({**LOCAL_DEFAULTS, **(local or {})})
    return ray.init(address=address, **kwargs)


def local_gpus() -> int:
    """GPUs this machine shows to torch (what a local Ray would offer)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def ray_session(recipe: Recipe, address: str | None = None, *, stage: str | None = None,
                verbose: bool = False) -> Iterator[None]:
    """Join the recipe's cluster (or ``address``) or start a local Ray for the job, check
    that it can run ``stage`` (``data``, ``train``, ``tune``; None: what ``run`` does), and
    stop what was started afterwards. Unless ``verbose``, Ray's own log lines and Ray
    Data's progress go to ``run_dir/logs`` only (see :func:`~pipelines.console.quiet_ray`)."""
    import ray

    address = address or recipe.ray.address
    if not verbose:
        quiet_ray(recipe)
    if address is None and not ray.is_initialized():
        cpus = recipe.ray.num_cpus or os.cpu_count() or 1
        # Fail before starting anything when the local machine cannot hold the search.
        recipe.check_resources(cpus, recipe.ray.num_gpus or local_gpus(), stage)
    ctx = ensure_ray(
        address, local={"num_cpus": recipe.ray.num_cpus, "num_gpus": recipe.ray.num_gpus,
                        "include_dashboard": recipe.ray.include_dashboard},
        log_to_driver=recipe.ray.log_to_driver or verbose,
        logging_level=logging.INFO if verbose else logging.WARNING)
    if ctx is not None:
        link_ray_logs(recipe, ctx)
        if not verbose:
            quiet_ray(recipe)  # ray.init re-attaches its console handler
    # the shutdown inside the filter: Ray's log deduplicator holds back repeated raylet
    # lines and prints them when the driver disconnects
    with contextlib.nullcontext() if verbose else raylet_lines_to_log():
        try:
            res = ray.cluster_resources()
            recipe.check_resources(res.get("CPU", 0), res.get("GPU", 0), stage)
            yield
        finally:
            if ctx is not None:
                ray.shutdown()
