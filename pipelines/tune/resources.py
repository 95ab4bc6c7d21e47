"""What a search or a single run asks of the cluster, checked against its nodes before
anything starts.

Each trial of a search is two Ray placement groups: its driver's one bundle
(``TRIAL_DRIVER_CPU``, see :func:`driver_resources`) and its Ray Train worker group,
``train.num_workers`` bundles of ``{CPU: train.cpus_per_worker (, GPU: 1)}`` placed with
``train.placement_strategy``; a single run is its worker group alone (this process drives
it). A bundle must fit on one node, so the cluster's *total* CPUs say little: three 1-CPU
nodes hold no 1.49-CPU worker. :func:`plan` counts, node by node (``ray.nodes()``: CPU,
GPU, memory and any other resource a bundle names), how many trials' groups fit at once
under the strategy, and, when ``train.cpus_per_worker`` is left unset in a search, picks
it: the largest share (in hundredths) that lets the concurrent trials all run (a single
run's default is 1 CPU). Nothing fits: :class:`ResourceError` naming the fields and a
setting that does.

Where Ray puts the drivers is Ray's choice: every node is assumed to hold all concurrent
drivers (worst case), so a placement found here cannot be undone by where they land.
Equal bundles make the count independent of Ray's choices otherwise: a node with room for
``s`` bundles takes ``s`` whatever the order (PACK, SPREAD), ``s // n`` whole groups
(STRICT_PACK), or one bundle of each of up to ``s`` groups (STRICT_SPREAD: ``k`` groups of
``n`` fit iff ``sum(min(s_i, k)) >= k * n``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .config import TuneConfig

if TYPE_CHECKING:
    from ..train import TrainConfig

TRIAL_DRIVER_CPU = 0.01  # a trial's driver only waits on its trainer; it must not hold a CPU
MIN_SHARE = 0.1  # a default share below this would train at a crawl: ask for fewer trials
EPS = 1e-6


class ResourceError(InputError):
    """The cluster cannot run the search as configured."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """What the cluster can run: the CPUs of each worker, how many trials at once (of the
    ``wanted``), and the nodes it was computed from."""

    cpus_per_worker: float
    concurrent_trials: int
    wanted: int
    nodes: int


def node_resources() -> list[dict[str, float]]:
    """Every alive node's total resources (``ray.nodes()``; needs a running Ray)."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def driver_resources(cpu: float = TRIAL_DRIVER_CPU):
    """A trial driver's placement group: one bundle of ``cpu`` CPUs."""
    from ray import tune

    return tune.PlacementGroupFactory([{"CPU": cpu}])


def requested_cpus(train: TrainConfig) -> float | None:
    """``train.cpus_per_worker`` as the recipe (or caller) gave it; None when left unset,
    which a search fills with the default share (:func:`plan`)."""
    return train.cpus_per_worker if "cpus_per_worker" in train.model_fields_set else None


# -- counting -----------------------------------------------------------------------------------

def _slots(node: dict[str, float], bundle: dict[str, float]) -> int:
    need = {k: v for k, v in bundle.items() if v > 0}
    if not need:
        return 1 << 30
    return min(math.floor(node.get(k, 0.0) / v + EPS) for k, v in need.items())


def fits(nodes: list[dict[str, float]], worker: dict[str, float], workers: int,
         strategy: str, trials: int, driver: dict[str, float]) -> bool:
    """Whether ``trials`` trials (a ``driver`` bundle and ``workers`` ``worker`` bundles
    each, placed with ``strategy``) can all be placed on ``nodes`` at once."""
    if sum(_slots(n, driver) for n in nodes) < trials:
        return False
    # every node keeps room for all the drivers: wherever Ray puts them, the workers fit
    left = [{k: v - trials * driver.get(k, 0.0) for k, v in n.items()} for n in nodes]
    slots = [max(_slots(n, worker), 0) for n in left]
    if strategy == "STRICT_PACK":
        return sum(s // workers for s in slots) >= trials
    if strategy == "STRICT_SPREAD":
        return sum(min(s, trials) for s in slots) >= trials * workers
    return sum(slots) >= trials * workers  # PACK, SPREAD: any node may take any bundle


def max_trials(nodes, worker, workers, strategy, driver, wanted: int) -> int:
    """How many trials (up to ``wanted``) fit at once."""
    return max((k for k in range(1, wanted + 1)
                if fits(nodes, worker, workers, strategy, k, driver)), default=0)


def best_share(nodes, worker, workers, strategy, driver, trials: int) -> float:
    """The largest CPUs per worker, in hundredths, at which ``trials`` trials fit (0: none)."""
    def ok(c: int) -> bool:
        return fits(nodes, {**worker, "CPU": c / 100}, workers, strategy, trials, driver)

    lo, hi = 0, int(max((n.get("CPU", 0.0) for n in nodes), default=0) * 100)
    while lo < hi:  # fitting is monotone: a smaller share never fits fewer bundles
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo / 100


# -- the plan -------------------------------------------------------------------------------------

def _describe(nodes: list[dict[str, float]]) -> str:
    def one(n: dict[str, float]) -> str:
        gpu = f"/{n['GPU']:g} GPU" if n.get("GPU") else ""
        return f"{n.get('CPU', 0):g}{gpu}"

    kinds = [one(n) for n in nodes]
    if kinds and len(set(kinds)) == 1:
        return f"{len(nodes)} alive node{'s' * (len(nodes) != 1)} of {kinds[0]} CPU each"
    return f"{len(nodes)} alive nodes with {', '.join(kinds)} CPU"


def _num_trials(config: TuneConfig) -> int:
    if config.searcher == "grid":
        try:
            return len(config.space.grid())
        except Exception:  # the search stage reports a bad space itself
            return config.num_samples
    return config.num_samples


def plan(config: TuneConfig | None, driver_cpu: float = TRIAL_DRIVER_CPU, *,
         train: TrainConfig | None = None,
         nodes: list[dict[str, float]] | None = None) -> Placement:
    """Where the search ``config`` (None: one run of ``train``, with no driver bundle) fits
    on ``nodes`` (default: the running Ray's alive nodes). ``train`` gives the workers per
    trial, their CPUs, the placement strategy and GPU use (default 1 worker, the default
    share, PACK, GPUs when a node has one)."""
    nodes = node_resources() if nodes is None else [dict(n) for n in nodes]
    if config is None and train is None:
        raise TypeError("plan: a single run needs its train config")
    strategy = train.placement_strategy if train is not None else "PACK"
    use_gpu = train.use_gpu if train is not None else None
    if use_gpu is None:
        use_gpu = sum(n.get("GPU", 0.0) for n in nodes) >= 1
    n = train.num_workers if train is not None else 1
    worker: dict[str, float] = {"GPU": 1.0} if use_gpu else {}
    driver = {} if config is None else {"CPU": driver_cpu}
    _check_nodes(nodes, worker, n, strategy, driver)
    if config is None:  # one run: exactly its workers, 1 CPU each unless the recipe says
        return _given_share(nodes, worker, n, strategy, driver, 1, train.cpus_per_worker,
                            single=True)
    wanted = max(1, min(config.max_concurrent_trials, _num_trials(config)))
    cpus = requested_cpus(train) if train is not None else None
    if cpus is None:
        return _default_share(nodes, worker, n, strategy, driver, wanted)
    return _given_share(nodes, worker, n, strategy, driver, wanted, cpus, single=False)


def _check_nodes(nodes: list[dict[str, float]], worker: dict[str, float], n: int,
                 strategy: str, driver: dict[str, float]) -> None:
    """What no CPU share can fix: no node, too few nodes to spread over, too few GPUs."""
    where = _describe(nodes)
    if not nodes:
        raise ResourceError("the Ray cluster has no alive node")
    if strategy == "STRICT_SPREAD" and n > len(nodes):
        raise ResourceError(
            f"train.placement_strategy: STRICT_SPREAD puts each of the train.num_workers={n} "
            f"workers on its own node; the cluster has {where}: set train.num_workers <= "
            f"{len(nodes)} or train.placement_strategy=SPREAD")
    if worker.get("GPU") and not fits(nodes, worker, n, strategy, 1, driver):
        gpus = sum(node.get("GPU", 0.0) for node in nodes)
        raise ResourceError(
            f"train.use_gpu: {n} workers need a GPU each ({strategy}); the cluster has {where} "
            f"({gpus:g} GPUs): set train.num_workers <= {int(gpus)} or train.use_gpu=false")


def _workers(n: int) -> str:
    return f"{n} worker{'s' * (n != 1)}"


def _default_share(nodes: list[dict[str, float]], worker: dict[str, float], n: int,
                   strategy: str, driver: dict[str, float], wanted: int) -> Placement:
    """A search without ``train.cpus_per_worker``: the largest share at which its
    concurrent trials all run, when that is not too small to train."""
    share = best_share(nodes, worker, n, strategy, driver, wanted)
    if share >= MIN_SHARE:
        return Placement(share, wanted, wanted, len(nodes))
    where = _describe(nodes)
    fewer = max((k for k in range(1, wanted) if
                 best_share(nodes, worker, n, strategy, driver, k) >= MIN_SHARE), default=0)
    if not fewer:
        one = best_share(nodes, worker, 1, strategy, driver, 1)
        raise ResourceError(
            f"train.num_workers: {_workers(n)} ({strategy}) leave {share:g} CPU each on "
            f"{where} (below {MIN_SHARE:g}); set train.num_workers lower (1 worker gets "
            f"{one:g} CPU)")
    raise ResourceError(
        f"tune.max_concurrent_trials: {wanted} trials at once of {_workers(n)} ({strategy}) "
        f"leave {share:g} CPU per worker on {where} (below {MIN_SHARE:g}); set "
        f"tune.max_concurrent_trials <= {fewer} or train.cpus_per_worker explicitly")


def _given_share(nodes: list[dict[str, float]], worker: dict[str, float], n: int,
                 strategy: str, driver: dict[str, float], wanted: int, cpus: float, *,
                 single: bool) -> Placement:
    """``cpus`` per worker: whether ``wanted`` trials (or the one run) fit at once."""
    got = max_trials(nodes, {**worker, "CPU": cpus}, n, strategy, driver, wanted)
    if got == wanted:
        return Placement(cpus, got, wanted, len(nodes))
    where = _describe(nodes)
    share = best_share(nodes, worker, n, strategy, driver, wanted)
    fix = f"train.cpus_per_worker <= {share:g}" if share > 0 else ""
    if single:
        raise ResourceError(
            f"train.cpus_per_worker: {_workers(n)} x {cpus:g} CPU ({strategy}) do not fit on "
            f"{where} (a worker's CPUs must fit on one node): set "
            f"{fix or 'train.num_workers lower'}")
    alt = [fix] if fix else []
    if got:
        alt.append(f"tune.max_concurrent_trials <= {got}")
    raise ResourceError(
        f"train.cpus_per_worker: {wanted} trials at once of {_workers(n)} x {cpus:g} CPU "
        f"({strategy}) do not fit on {where} ({got} do{'es' * (got == 1)}; a worker's CPUs "
        f"must fit on one node, and every trial driver holds {driver.get('CPU', 0):g} CPU): "
        f"set {' or '.join(alt) or 'train.num_workers lower'}")


def cpus_per_worker(config: TuneConfig | None, driver_cpu: float = TRIAL_DRIVER_CPU, *,
                    train: TrainConfig | None = None,
                    nodes: list[dict[str, float]] | None = None) -> float:
    """The CPUs of each training worker (see :func:`plan`); raises :class:`ResourceError`
    when the trials cannot all run at once on the cluster's nodes."""
    return plan(config, driver_cpu, train=train, nodes=nodes).cpus_per_worker


def check_job(train: TrainConfig, tune: TuneConfig | None,
              nodes: list[dict[str, float]]) -> Placement:
    """What ``peftpipe run`` would ask of ``nodes`` for a recipe's ``train`` and ``tune``
    sections (one run when there is no search): a :class:`ResourceError` before submitting
    instead of one in the job."""
    return plan(tune, TRIAL_DRIVER_CPU, train=train, nodes=nodes)


def nodes_from_state_api(address: str) -> list[dict[str, Any]]:
    """Alive nodes' total resources from a cluster's dashboard (Ray's State API), for a
    client that has not joined the cluster (``peftpipe submit``)."""
    from ray.util.state import list_nodes

    return [dict(n.resources_total or {}) for n in
            list_nodes(address=address, detail=True, timeout=10, raise_on_missing_output=False)
            if n.state == "ALIVE"]
