"""MLflow Model Registry: register adapters, move the ``champion`` alias only when earned.

A promotion registers the winning adapter as a new version (alias ``candidate``), scores it
and the current champion on the same held-out split, and moves ``champion`` only if the
candidate is better by the configured margin. Every decision is written as tags on the
version (values compared, margin, who, when), and each champion remembers the one it
replaced, so ``rollback`` walks the chain back. Aliases are only ever set by single registry
calls, so concurrent promotions end with the last writer's alias, never a broken one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .tracking import who

CANDIDATE, CHAMPION = "candidate", "champion"
TAG = "peftpipe."


class RegistryError(RuntimeError):
    """A registry operation cannot proceed (unknown model, nothing to roll back to, ...)."""


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
           score: Callable[[str], float]) -> Decision:
    """Score ``version`` and the current champion with ``score(version)``; move the alias
    if the candidate wins by more than the margin. ``score`` evaluates on held-out data."""
    name = config.model_name
    champion = alias_version(client, name, CHAMPION)
    cand_score = float(score(version))
    champ_score = None
    if champion is None:
        promoted, reason = True, "no champion yet"
    elif champion == version:
        promoted, reason = False, "already the champion"
    else:
        champ_score = float(score(champion))
        promoted = is_better(cand_score, champ_score, config.mode, config.margin)
        cmp = "beats" if promoted else "does not beat"
        reason = (f"candidate {config.metric}={cand_score:.6g} {cmp} champion v{champion} "
                  f"{config.metric}={champ_score:.6g} by more than margin {config.margin:g} "
                  f"({config.mode} is better)")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tags = {
        "decision": "promoted" if promoted else "rejected", "decision_reason": reason,
        "metric": config.metric, "mode": config.mode, "margin": config.margin,
        "candidate_score": cand_score, "champion_score": champ_score,
        "champion_version_at_decision": champion, "decided_by": who(), "decided_at": stamp,
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, TAG + k, "" if v is None else str(v))
    if promoted:
        client.set_model_version_tag(name, version, TAG + "previous_champion", champion or "")
        set_alias(client, name, CHAMPION, version)
    return Decision(name, version, promoted, reason, cand_score, champ_score, champion)


def rollback(client, name: str) -> Decision:
    """Move ``champion`` back to the version it replaced."""
    current = alias_version(client, name, CHAMPION)
    if current is None:
        raise RegistryError(f"model {name!r} has no champion to roll back")
    previous = client.get_model_version(name, current).tags.get(TAG + "previous_champion")
    if not previous:
        raise RegistryError(f"{name} v{current} is the first champion; nothing to roll back to")
    set_alias(client, name, CHAMPION, previous)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(name, current, TAG + "rolled_back_at", stamp)
    client.set_model_version_tag(name, current, TAG + "rolled_back_by", who())
    return Decision(name, previous, True, f"rolled back from v{current} to v{previous}",
                    champion_version=current)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@alias`` or ``models:/NAME/VERSION`` -> (name, alias, version)."""
    if not uri.startswith("models:/"):
        raise RegistryError(f"model: expected models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}")
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, None
    name, _, version = rest.partition("/")
    if not version:
        raise RegistryError(f"model: {uri!r} names no alias or version")
    return name, None, version


def download(client, uri: str, dst: str | Path) -> tuple[str, Path]:
    """Fetch a registered adapter folder; returns (version, local folder)."""
    import mlflow.artifacts

    name, alias, version = parse_model_uri(uri)
    if alias:
        version = alias_version(client, name, alias)
        if version is None:
            raise RegistryError(f"model {name!r} has no version with alias {alias!r}")
    mv = client.get_model_version(name, version)
    Path(dst).mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=mv.source, dst_path=str(dst), tracking_uri=client.tracking_uri
    )
    return version, Path(local)
