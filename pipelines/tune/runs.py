"""A search's MLflow runs always end: closed by the driver when it stops, and reconciled by
the next command that opens the search when the driver died without closing them (SIGKILL,
a lost head node).

The search's parent run carries the identity of the driver that has it open
(``peftpipe.driver``: host, pid and the process's start time); a run left ``RUNNING`` by a
driver that is no longer alive is ended ``KILLED``. No Ray here: ``report`` and ``promote``
reconcile without starting anything.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from ..tracking import TAG_KIND, TAG_SEARCH

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
