"""No silent waits: a run whose workers' resources stay pending fails, naming Ray's demand.

Ray Train (v2) waits ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s) for a worker group's
placement group, then counts a controller failure and tries again; its default
``FailureConfig.controller_failure_limit`` (-1) retries for ever, so a placement no node can
hold hangs without a word. :func:`failure_config` sets Ray's start timeout to the recipe's
``train.pending_timeout_s`` and allows as many such retries as ``train.max_failures``;
:func:`fit` runs the trainer, logs what stays pending while it waits, and turns Ray's
startup timeout into a :class:`PendingResourcesError` carrying Ray's pending demand (from
the public State API's placement groups and the nodes' resources).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ..compat import is_ray_train_start_timeout, set_ray_train_start_timeout
from ..errors import JobError
from .config import TrainConfig

log = logging.getLogger("pipelines.train")

# Ray Train reads it from the environment of the process that calls fit() and passes it to
# its controller (ray.train.v2._internal.constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR;
# the name is Ray's documented variable, the module holding it is private).
POLL_S = 5.0  # how often a waiting run looks at Ray's pending placement groups


class PendingResourcesError(JobError):
    """A run's workers could not be placed within ``train.pending_timeout_s``."""


def failure_config(config: TrainConfig) -> Any:
    """Ray Train's ``FailureConfig`` for ``config``: worker failures and failed worker-group
    starts retried ``max_failures`` times each; a worker group still unplaced after
    ``pending_timeout_s`` on its last try fails the run (None: Ray's own behaviour, retry
    for ever). Sets Ray's start timeout in
    this process's environment, where Ray Train reads it (call it where ``fit`` runs)."""
    from ray.train import FailureConfig

    if config.pending_timeout_s is None:
        return FailureConfig(max_failures=config.max_failures)
    set_ray_train_start_timeout(config.pending_timeout_s)
    # Ray counts a worker group that failed to start as a controller failure, and after a
    # node is lost that is what a restart meets while the dead node is not yet declared
    # dead (a worker placed on it dies in its constructor): allowing none would turn a
    # survivable lost node into a failed run. So starts get the run's own retry budget;
    # a group that stays unplaced fails after max_failures + 1 timeouts, each logged.
    return FailureConfig(max_failures=config.max_failures,
                         controller_failure_limit=config.max_failures)


def fit(trainer: Any, config: TrainConfig) -> Any:
    """``trainer.fit()``; a worker group Ray could not place within the timeout raises
    :class:`PendingResourcesError` with what Ray reported pending while the run waited."""
    from ray.train import ControllerError

    bundle = worker_bundle(config, trainer)
    # look often enough to see the group at least a few times before the timeout removes it
    poll = min(POLL_S, max(0.5, (config.pending_timeout_s or 4 * POLL_S) / 4))
    watch = _PendingWatch(bundle, config.num_workers, config.placement_strategy, poll)
    watch.start()
    try:
        return trainer.fit()
    except ControllerError as e:
        if not is_ray_train_start_timeout(e):
            raise
        raise PendingResourcesError(
            f"train: {config.num_workers} workers x {_fmt(bundle)} "
            f"({config.placement_strategy}) could not be placed within "
            f"train.pending_timeout_s={config.pending_timeout_s:g}s; "
            f"{watch.report() or pending_demand()}") from e
    finally:
        watch.stop()


def worker_bundle(config: TrainConfig, trainer: Any = None) -> dict[str, float]:
    """One worker's resources as the trainer asks Ray for them."""
    scaling = getattr(trainer, "scaling_config", None)
    if scaling is not None and scaling.resources_per_worker:
        return {k: float(v) for k, v in scaling.resources_per_worker.items()}
    return {"CPU": float(config.cpus_per_worker)}


def _fmt(bundle: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" if isinstance(v, (int, float)) else f"{k}: {v}"
                           for k, v in sorted(bundle.items())) + "}"


def pending_placement_groups(address: str | None = None) -> list[dict[str, Any]]:
    """Ray's placement groups waiting for resources (State API): bundles, Ray's
    scheduling state (``NO_RESOURCES``, ``INFEASIBLE``, ...) and how long they waited."""
    from ray.util.state import list_placement_groups

    out = []
    for pg in list_placement_groups(address=address, filters=[("state", "=", "PENDING")],
                                    detail=True, raise_on_missing_output=False, timeout=10):
        stats = dict(pg.stats or {})
        bundles = [{k: v for k, v in dict(b.get("unit_resources") or b).items()
                    if not k.startswith("bundle_group") and k != "bundle_id"}
                   for b in (pg.bundles or [])]
        out.append({"id": pg.placement_group_id, "bundles": bundles,
                    "scheduling_state": stats.get("scheduling_state"),
                    "attempts": stats.get("scheduling_attempt")})
    return out


def nodes_summary() -> str:
    """Every alive node's total CPU/GPU (``ray.nodes()``), for the error message."""
    import ray

    parts = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources") or {}
        gpu = f", GPU {res['GPU']:g}" if res.get("GPU") else ""
        parts.append(f"CPU {res.get('CPU', 0):g}{gpu}")
    return f"{len(parts)} alive node{'s' * (len(parts) != 1)} ({'; '.join(parts)})"


def pending_demand(address: str | None = None) -> str:
    """Ray's pending demand now, one line: the pending placement groups and the nodes."""
    try:
        pgs = pending_placement_groups(address)
        nodes = nodes_summary()
    except Exception as e:  # the State API needs the dashboard; say so rather than fail
        return f"Ray's pending demand unavailable ({type(e).__name__}: {e})"
    if not pgs:
        return f"Ray reports no pending placement group; the cluster has {nodes}"
    return describe(pgs) + f"; the cluster has {nodes}"


def describe(pgs: list[dict[str, Any]]) -> str:
    """``Ray's pending demand: 1 placement group(s) [{CPU: 0.3} x 3] (INFEASIBLE)``."""
    groups = []
    for pg in pgs:
        kinds: dict[str, int] = {}
        for b in pg["bundles"]:
            kinds[_fmt(b)] = kinds.get(_fmt(b), 0) + 1
        parts = ", ".join(f"{k} x {n}" for k, n in kinds.items())
        groups.append(f"[{parts}] ({pg.get('scheduling_state') or 'PENDING'})")
    return f"Ray's pending demand: {len(pgs)} placement group(s) " + ", ".join(groups)


class _PendingWatch:
    """While a fit runs, look at Ray's pending placement groups every few seconds: the
    run's own group (same bundles) is logged while it waits and kept for the error."""

    def __init__(self, bundle: dict[str, float], num_workers: int, strategy: str,
                 poll_s: float = POLL_S) -> None:
        self.bundle, self.num_workers, self.strategy = bundle, num_workers, strategy
        self.poll_s = poll_s
        self.seen: list[dict[str, Any]] = []
        self.since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pending-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _ours(self, pg: dict[str, Any]) -> bool:
        want = {k: float(v) for k, v in self.bundle.items()}
        return len(pg["bundles"]) == self.num_workers and all(
            {k: float(v) for k, v in b.items() if k in want} == want for b in pg["bundles"])

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                mine = [pg for pg in pending_placement_groups() if self._ours(pg)]
            except Exception:  # no dashboard (State API): the error message says so later
                return
            if not mine:
                self.since = None
                continue
            self.seen = mine
            self.since = self.since or time.time() - self.poll_s
            log.warning("train: %d workers x %s (%s) waiting %.0fs for resources; %s",
                        self.num_workers, _fmt(self.bundle), self.strategy,
                        time.time() - self.since, describe(mine))

    def report(self) -> str:
        if not self.seen:
            return ""
        try:
            nodes = nodes_summary()
        except Exception:
            nodes = "unknown nodes"
        return describe(self.seen) + f"; the cluster has {nodes}"
