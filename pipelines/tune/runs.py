"""A search's MLflow runs always end: closed by the driver when it stops, and reconciled by
the next command that opens the search when the driver died without closing them (SIGKILL,
a lost head node).

The search's parent run carries the identity of the driver that has it open
(``peftpipe.driver``: host, pid and the process's start time); a run left ``RUNNING`` by a
driver that is no longer alive is ended ``KILLED``. No Ray here: ``report`` and ``promote``
reconcile without starting anything.

A driver's search (or single run: a search of one trial to MLflow) goes through the same
steps here, whichever way it trains: :func:`open_search` (parent run, params, driver
identity), :func:`ended_with_driver` and :func:`stop_on_signals` while it trains, and
:func:`conclude` (the best trial, the Pareto front, the parent run ended).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..tracking import (
    TAG_KIND,
    TAG_SEARCH,
    SearchTracker,
    TrackingConfig,
    client,
    content_hash,
    experiment_id,
    git_sha,
)
from .objective import Objective, pareto_front
from .result import SearchInterrupted, SearchResult

if TYPE_CHECKING:
    from ..train import TrainConfig

TAG_DRIVER = "peftpipe.driver"
TAG_ENDED_BY = "peftpipe.ended_by"

log = logging.getLogger(__name__)


def driver_identity(pid: int | None = None) -> str:
    """``host:pid:start`` of a process (default this one): a pid reused by another process
    later has another start time."""
    import psutil

    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{psutil.Process(pid).create_time():.2f}"


def driver_alive(identity: str) -> bool | None:
    """Whether the driver ``identity`` still runs: None when it ran on another host (this
    machine cannot tell), False for this process itself (it is opening the search anew)."""
    import psutil

    host, _, rest = identity.partition(":")
    pid_s, _, start = rest.partition(":")
    if host != socket.gethostname():
        return None
    try:
        pid = int(pid_s)
        if pid == os.getpid():
            return False
        return f"{psutil.Process(pid).create_time():.2f}" == start
    except (ValueError, psutil.Error):
        return False


def open_runs(mlc: Any, experiment: str, search_id: str) -> list[Any]:
    """The search's runs (parent and trials) still ``RUNNING``."""
    return mlc.search_runs(
        [experiment], filter_string=f"tags.`{TAG_SEARCH}` = '{search_id}' "
        "and attributes.status = 'RUNNING'", max_results=1000)


def end_open_runs(mlc: Any, experiment: str, search_id: str, status: str,
                  reason: str) -> list[str]:
    """End every ``RUNNING`` run of the search as ``status`` (KILLED, FAILED); returns their
    ids. Trials first, the parent last: a reader never sees a closed search with open trials."""
    runs = sorted(open_runs(mlc, experiment, search_id),
                  key=lambda r: r.data.tags.get(TAG_KIND) == "search")
    for r in runs:
        mlc.set_tag(r.info.run_id, TAG_ENDED_BY, reason)
        mlc.set_terminated(r.info.run_id, status)
    return [r.info.run_id for r in runs]


def reconcile(mlc: Any, experiment: str, search_id: str, *, opening: bool) -> list[str]:
    """End as ``KILLED`` the runs a dead driver left ``RUNNING``. ``opening``: the caller
    is about to run the search itself (a resume), so a driver on another host counts as
    gone too (two drivers cannot share one Tune experiment); ``report`` and ``promote``
    leave such runs alone. A live driver's runs are never touched."""
    runs = open_runs(mlc, experiment, search_id)
    if not runs:
        return []
    parent = next((r for r in runs if r.data.tags.get(TAG_KIND) == "search"), None)
    identity = parent.data.tags.get(TAG_DRIVER) if parent is not None else None
    alive = driver_alive(identity) if identity else None
    # trials open under a closed parent: their driver closed the search, so it is gone
    if parent is not None and (alive or (alive is None and not opening)):
        return []
    ended = end_open_runs(mlc, experiment, search_id, "KILLED",
                          f"reconciled: driver {identity or 'unknown'} is gone")
    log.warning("search %s: %d run(s) left RUNNING by driver %s ended as KILLED",
                search_id, len(ended), identity or "unknown")
    return ended


def reconcile_experiment(mlc: Any, experiment: str) -> list[str]:
    """:func:`reconcile` for every search of the experiment that has runs open (``report``
    and ``promote``: the search killed may not be the one they read)."""
    runs = mlc.search_runs([experiment], filter_string="attributes.status = 'RUNNING'",
                           max_results=1000)
    ended: list[str] = []
    for search_id in sorted({r.data.tags[TAG_SEARCH] for r in runs if TAG_SEARCH in r.data.tags}):
        ended += reconcile(mlc, experiment, search_id, opening=False)
    return ended


# -- a driver's search, from opening to its outcome ----------------------------------------

def open_search(tracking: TrackingConfig, run_dir: Path, search_id: str, *,
                train: TrainConfig, dataset_id: str, recipe: dict[str, Any] | None,
                params: Mapping[str, Any]) -> tuple[Any, str, SearchTracker]:
    """The search's MLflow client, experiment and parent run (found again when resumed,
    after the runs a dead driver of it left RUNNING were ended), with ``params``, the
    training's size, the recipe and this driver's identity."""
    mlc = client(tracking, run_dir)
    exp = experiment_id(mlc, tracking, run_dir)
    # runs a dead driver of this search left RUNNING end as KILLED before it goes on
    reconcile(mlc, exp, search_id, opening=True)
    tracker = SearchTracker(mlc, exp, search_id, tags={
        "dataset_id": dataset_id, "base_model": train.model.name,
        "recipe_hash": content_hash(recipe or {}), "git_sha": git_sha(),
    })
    tracker.log_params(tracker.parent_id, {
        **params, "max_steps": train.max_steps, "batch_size": train.batch_size,
        "zero_stage": train.zero.stage})
    mlc.set_tag(tracker.parent_id, TAG_DRIVER, driver_identity())
    if recipe:
        mlc.log_dict(tracker.parent_id, recipe, "recipe.json")
    return mlc, exp, tracker


@contextlib.contextmanager
def ended_with_driver(mlc: Any, experiment: str, search_id: str) -> Iterator[None]:
    """No run of the search stays RUNNING when its driver goes down: a second Ctrl-C ends
    them KILLED, a crash FAILED (a stop by signal, :class:`SearchInterrupted`, ended them
    already)."""
    try:
        yield
    except SearchInterrupted:
        raise
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        try:
            end_open_runs(mlc, experiment, search_id, status, f"driver: {type(e).__name__}")
        except Exception:  # the tracking store is gone too: the next open reconciles
            log.warning("search %s: could not end its MLflow runs", search_id, exc_info=True)
        raise


def conclude(tracker: SearchTracker, outcomes: list[dict[str, Any]], objective: Objective, *,
             path: str, tolerate_failed: bool) -> SearchResult:
    """The search's outcome from its trials': the best under the objective and budget and
    the Pareto front; the parent run ends naming the best trial, FAILED when a trial failed
    and that is not tolerated."""
    outcomes = sorted(outcomes, key=lambda o: o["trial_id"])
    rows = [{**o["metrics"], "_trial": o["trial_id"]} for o in outcomes]
    best = objective.best(rows)
    best_trial = next((o for o in outcomes if best and o["trial_id"] == best["_trial"]), None)
    front_ids = {p["_trial"] for p in pareto_front(rows, objective.metric, objective.mode)}
    failed = any(o["status"] == "error" for o in outcomes)
    tracker.end_search("FAILED" if failed and not tolerate_failed else "FINISHED", {
        "best_trial": best_trial["trial_id"] if best_trial else "none",
        "best_run_id": best_trial["mlflow_run_id"] if best_trial else "",
        "best_" + objective.metric:
            best_trial["metrics"].get(objective.metric) if best_trial else "",
    })
    return SearchResult(search_id=tracker.search_id, path=path, trials=outcomes,
                        best=best_trial, pareto=[o for o in outcomes if o["trial_id"] in front_ids],
                        parent_run_id=tracker.parent_id, tracking_uri=tracker.client.tracking_uri,
                        objective=objective)


@contextlib.contextmanager
def stop_on_signals(what: str, saved: str,
                    on_first: Callable[[int, Any], None]) -> Iterator[list[str]]:
    """While a search or a run trains, SIGINT and SIGTERM (Ctrl-C, ``kill``, ``ray job
    stop``) stop it gracefully: the first one says so and calls ``on_first(signum, frame)``,
    a second one stops at once (KeyboardInterrupt). Yields the list the first signal's name
    is put in; ``what`` and ``saved`` name what stops and what of it is kept."""
    got: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield got  # signal handlers can only be set in the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        if got:
            raise KeyboardInterrupt
        got.append(signal.Signals(signum).name)
        print(f"\n{got[0]}: stopping the {what} ({saved}; again to stop at once)",
              file=sys.stderr, flush=True)
        on_first(signum, frame)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)
