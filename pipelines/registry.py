"""MLflow Model Registry: register adapters, move the ``champion`` alias only when earned.

A promotion registers the winning adapter as a new version (alias ``candidate``), scores it
and the current champion on the same held-out split, and moves ``champion`` only if the
candidate is better by the configured margin. Every decision is written as tags on the
version (values compared, margin, who, when), and each champion remembers the one it
replaced, so ``rollback`` walks the chain back.

Concurrent promotions and rollbacks of one model (separate processes, separate machines)
serialise on :class:`RegistryLock`, an advisory lock kept in the registry itself, so it works
on every store MLflow's client talks to (the embedded SQLite store and an ``mlflow server``):
candidates are scored outside the lock, and the read-compare-move of ``champion`` happens
under it, again if the champion moved while scoring. So the champion always ends on the best
version by the gate's rule, and every champion's ``previous_champion`` is the version it
really replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import InputError
from .tracking import who

CANDIDATE, CHAMPION = "candidate", "champion"
TAG = "peftpipe."


class RegistryError(InputError, RuntimeError):
    """A registry operation cannot proceed (unknown model or alias, a bad models:/ URI,
    nothing to roll back to, the model's lock held): exit 2 for `promote`, `rollback`,
    `serve`, `export`; inside `run` a job failure (exit 1). Still a ``RuntimeError``."""


class RegistryConfig(BaseModel):
    """``metric``/``mode``: how candidate and champion are compared on the test split;
    ``margin``: how much better the candidate must be to take the ``champion`` alias."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field("peft-adapter", min_length=1)
    metric: str = "eval_accuracy"
    mode: Literal["max", "min"] = "max"
    margin: float = Field(0.0, ge=0)


@dataclasses.dataclass
class Decision:
    model_name: str
    version: str
    promoted: bool
    reason: str
    candidate_score: float | None = None
    champion_score: float | None = None
    champion_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _ensure_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="peft-pipelines adapters")
        except MlflowException:  # created by a concurrent promotion
            client.get_registered_model(name)


def set_alias(client, name: str, alias: str, version: str, attempts: int = 10) -> None:
    """Point ``alias`` at ``version``. Some stores implement this as check-then-insert, so two
    writers racing on a new alias collide (a UNIQUE error for one of them): retry, and the
    last writer wins cleanly."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def register_candidate(client, name: str, run_id: str, artifact_path: str = "adapter",
                       tags: dict[str, Any] | None = None) -> str:
    """Register the adapter logged under ``run_id/artifact_path``; alias it ``candidate``."""
    _ensure_model(client, name)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    mv = client.create_model_version(
        name, source=source, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()}
    )
    for _ in range(60):  # local stores are READY at once; a server may take a moment
        if client.get_model_version(name, str(mv.version)).status == "READY":
            break
        time.sleep(1)
    version = str(mv.version)
    set_alias(client, name, CANDIDATE, version)
    return version


def is_better(candidate: float, champion: float, mode: str, margin: float) -> bool:
    return candidate - champion > margin if mode == "max" else champion - candidate > margin


def decide(client, config: RegistryConfig, version: str,
           score: Callable[[str], float], *, lock_timeout_s: float = 600) -> Decision:
    """Score ``version`` and the current champion with ``score(version)``; move the alias
    if the candidate wins by more than the margin. ``score`` evaluates on held-out data.

    Scoring (slow) runs outside the model's lock; the compare-and-move runs inside it, and
    if another promotion or rollback moved ``champion`` meanwhile, the new champion is
    scored and the comparison made again."""
    name = config.model_name
    scores = {version: float(score(version))}
    while True:
        champion = alias_version(client, name, CHAMPION)
        if champion is not None and champion not in scores:
            scores[champion] = float(score(champion))
        with RegistryLock(client, name, timeout_s=lock_timeout_s):
            if alias_version(client, name, CHAMPION) != champion:
                continue  # moved while we scored: compare with the one that holds it now
            return _decide_locked(client, config, version, champion, scores)


def _decide_locked(client, config: RegistryConfig, version: str, champion: str | None,
                   scores: dict[str, float]) -> Decision:
    name = config.model_name
    cand_score, champ_score = scores[version], None
    if champion is None:
        promoted, reason = True, "no champion yet"
    elif champion == version:
        promoted, reason = False, "already the champion"
    else:
        champ_score = scores[champion]
        promoted = is_better(cand_score, champ_score, config.mode, config.margin)
        cmp = "beats" if promoted else "does not beat"
        reason = (f"candidate {config.metric}={cand_score:.6g} {cmp} champion v{champion} "
                  f"{config.metric}={champ_score:.6g} by more than margin {config.margin:g} "
                  f"({config.mode} is better)")
    tags = {
        "decision": "promoted" if promoted else "rejected", "decision_reason": reason,
        "metric": config.metric, "mode": config.mode, "margin": config.margin,
        "candidate_score": cand_score, "champion_score": champ_score,
        "champion_version_at_decision": champion, "decided_by": who(), "decided_at": _stamp(),
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, TAG + k, "" if v is None else str(v))
    if promoted:
        client.set_model_version_tag(name, version, TAG + "previous_champion", champion or "")
        set_alias(client, name, CHAMPION, version)
    return Decision(name, version, promoted, reason, cand_score, champ_score, champion)


def rollback(client, name: str, *, lock_timeout_s: float = 600) -> Decision:
    """Move ``champion`` back to the version it replaced (under the model's lock, so two
    rollbacks at once go back two steps, not one)."""
    with RegistryLock(client, name, timeout_s=lock_timeout_s):
        current = alias_version(client, name, CHAMPION)
        if current is None:
            raise RegistryError(f"model {name!r} has no champion to roll back")
        previous = client.get_model_version(name, current).tags.get(TAG + "previous_champion")
        if not previous:
            raise RegistryError(f"{name} v{current} is the first champion; nothing to roll back to")
        set_alias(client, name, CHAMPION, previous)
        client.set_model_version_tag(name, current, TAG + "rolled_back_at", _stamp())
        client.set_model_version_tag(name, current, TAG + "rolled_back_by", who())
    return Decision(name, previous, True, f"rolled back from v{current} to v{previous}",
                    champion_version=current)


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def champion_chain(client, name: str) -> list[str]:
    """The champion, the version it replaced, and so on back to the first champion."""
    chain: list[str] = []
    version = alias_version(client, name, CHAMPION)
    while version and version not in chain:
        chain.append(version)
        version = client.get_model_version(name, version).tags.get(TAG + "previous_champion")
    return chain


# -- the lock ---------------------------------------------------------------------------------

LOCK_SUFFIX = ".peftpipe-lock"
_LOCK_TOKEN, _LOCK_HOLDER, _LOCK_EXPIRES = (TAG + "lock.token", TAG + "lock.holder",
                                           TAG + "lock.expires")


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


class RegistryLock:
    """An advisory lock on registered model ``name``, held as a registered model of its own
    (``NAME.peftpipe-lock``).

    Why this primitive: creating a registered model is the one atomic compare-and-set every
    MLflow store offers (the name is the table's primary key; the server forwards to the same
    SQL store and answers ``RESOURCE_ALREADY_EXISTS`` to the loser), while tag and alias
    updates are plain overwrites. The lock's tags, written in the same insert, name the holder
    and a lease that a heartbeat thread extends; a holder that died is broken after its lease
    ran out, by one waiter at a time (a second lock model, ``...-lock.break``, serialises the
    breakers so none deletes a lock another has just taken)."""

    def __init__(self, client, name: str, *, timeout_s: float = 600, lease_s: float = 60,
                 poll_s: float = 0.05):
        self.client, self.name = client, name
        self.lock_name = name + LOCK_SUFFIX
        self.timeout_s, self.lease_s, self.poll_s = timeout_s, lease_s, poll_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._last_error: Exception | None = None

    def __enter__(self) -> RegistryLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _tags(self) -> dict[str, str]:
        return {_LOCK_TOKEN: self.token, _LOCK_HOLDER: f"{who()} pid {os.getpid()}",
                _LOCK_EXPIRES: f"{time.time() + self.lease_s:.3f}"}

    def _try_create(self, lock_name: str, tags: dict[str, str]) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                lock_name, tags=tags,
                description=f"peftpipe advisory lock on {self.name!r}; deleted when released")
            return True
        except MlflowException as e:
            if _error_code(e) != "RESOURCE_ALREADY_EXISTS":
                # e.g. SQLite's "database is locked" under concurrent writers: try again
                self._last_error = e
            return False

    def _holder(self, lock_name: str) -> dict[str, str] | None:
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.client.get_registered_model(lock_name).tags)
        except MlflowException:
            return None

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        holder: dict[str, str] | None = None
        while True:
            if self._try_create(self.lock_name, self._tags()):
                break
            current = self._holder(self.lock_name)
            if current and float(current.get(_LOCK_EXPIRES, "inf")) < time.time():
                self._break(current.get(_LOCK_TOKEN, ""))
                continue
            holder = current or holder
            if time.monotonic() > deadline:
                if holder is None and self._last_error is not None:
                    raise RegistryError(f"model {self.name!r}: cannot take lock "
                                        f"{self.lock_name!r}: {self._last_error}")
                raise RegistryError(
                    f"model {self.name!r}: lock {self.lock_name!r} still held by "
                    f"{(holder or {}).get(_LOCK_HOLDER, 'unknown')} after {self.timeout_s:g}s; "
                    f"if that process is gone the lock expires by itself {self.lease_s:g}s "
                    "after its last heartbeat")
            time.sleep(self.poll_s * (1 + random.random()))  # jitter: waiters do not march
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                      name=f"lock-heartbeat-{self.name}")
        self._beat.start()

    def _heartbeat(self) -> None:
        from mlflow.exceptions import MlflowException

        while not self._stop.wait(self.lease_s / 3):
            # a store hiccup is fine: the next beat comes well inside the lease
            with contextlib.suppress(MlflowException):
                self.client.set_registered_model_tag(self.lock_name, _LOCK_EXPIRES,
                                                     f"{time.time() + self.lease_s:.3f}")

    def _break(self, stale_token: str) -> None:
        """Delete the expired lock holding ``stale_token``, if it still is that one."""
        breaker = self.lock_name + ".break"
        if not self._try_create(breaker, {_LOCK_EXPIRES: f"{time.time() + 30:.3f}"}):
            b = self._holder(breaker)
            if b and float(b.get(_LOCK_EXPIRES, "inf")) < time.time():
                self._delete(breaker)  # a breaker died mid-break (rare twice over)
            return
        try:
            current = self._holder(self.lock_name)
            if (current and current.get(_LOCK_TOKEN) == stale_token
                    and float(current.get(_LOCK_EXPIRES, "inf")) < time.time()):
                self._delete(self.lock_name)
        finally:
            self._delete(breaker)

    def _delete(self, lock_name: str) -> None:
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):  # already gone
            self.client.delete_registered_model(lock_name)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        current = self._holder(self.lock_name)
        if current and current.get(_LOCK_TOKEN) == self.token:
            self._delete(self.lock_name)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@alias`` or ``models:/NAME/VERSION`` -> (name, alias, version)."""
    if not uri.startswith("models:/"):
        raise RegistryError("model: expected models:/NAME@ALIAS or models:/NAME/VERSION, "
                            f"got {uri!r}")
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, None
    name, _, version = rest.partition("/")
    if not version:
        raise RegistryError(f"model: {uri!r} names no alias or version")
    return name, None, version


def download(client, uri: str, dst: str | Path) -> tuple[str, Path]:
    """Fetch a registered version; returns (version, its local adapter folder)."""
    import mlflow.artifacts

    name, alias, version = parse_model_uri(uri)
    if alias:
        version = alias_version(client, name, alias)
        if version is None:
            raise RegistryError(f"model {name!r} has no version with alias {alias!r}")
    mv = client.get_model_version(name, version)
    Path(dst).mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=mv.source, dst_path=str(dst), tracking_uri=client.tracking_uri
    ))
    return version, adapter_folder(local)


#: where an MLflow Model folder written by :mod:`pipelines.serve.mlflow_model` keeps the adapter
MODEL_ADAPTER = Path("artifacts") / "adapter"


def adapter_folder(local: Path) -> Path:
    """The adapter inside a downloaded version: the MLflow Model's ``adapter`` artifact, or
    the folder itself for versions registered as bare adapter folders."""
    return local / MODEL_ADAPTER if (local / "MLmodel").is_file() else local
