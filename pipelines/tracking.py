"""MLflow tracking: one parent run per search, one nested child run per trial.

The default is embedded: a SQLite backend store and a local artifact folder under the run
directory, so a laptop needs no server. Any tracking URI (an ``mlflow server``) can be given
in the recipe or by ``MLFLOW_TRACKING_URI``. Every operation is idempotent by tags, so a
search resumed after its driver died finds its runs again instead of logging them twice.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

#: the metric names every stage reports (DESIGN.md contract)
METRICS = (
    "train_loss", "eval_loss", "eval_accuracy", "perplexity", "trainable_params",
    "trainable_fraction", "tokens_per_s", "step_time_s", "peak_mem_mb",
)

#: where a trial's time went (pipelines.train.metrics.PHASES): ``phase_<name>_s``, cumulative
PHASE_PREFIX, PHASE_SUFFIX = "phase_", "_s"


def is_logged(name: str) -> bool:
    """Whether a reported metric goes to MLflow: the fixed names and the phase timings."""
    return name in METRICS or (name.startswith(PHASE_PREFIX) and name.endswith(PHASE_SUFFIX))


TAG_SEARCH = "peftpipe.search_id"
TAG_TRIAL = "peftpipe.trial_id"
TAG_KIND = "peftpipe.kind"
PARENT_TAG = "mlflow.parentRunId"


class TrackingConfig(BaseModel):
    """Where runs go. ``tracking_uri`` None: ``$MLFLOW_TRACKING_URI`` or a SQLite store in
    the run directory."""

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str | None = None
    experiment: str = "peft-pipelines"


def resolve_uri(config: TrackingConfig, run_dir: str | Path) -> str:
    if config.tracking_uri:
        return config.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def client(config: TrackingConfig, run_dir: str | Path):
    """An ``MlflowClient`` for the configured store (created on first use)."""
    from mlflow import MlflowClient

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=resolve_uri(config, run_dir))


def experiment_id(mlflow_client, config: TrackingConfig, run_dir: str | Path) -> str:
    """The experiment's id, creating it with artifacts under the run directory when the store
    is local (a server keeps its own artifact root)."""
    exp = mlflow_client.get_experiment_by_name(config.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if mlflow_client.tracking_uri.startswith(("sqlite:", "file:")):
        location = (Path(run_dir).resolve() / "mlartifacts").as_uri()
    try:
        return mlflow_client.create_experiment(config.experiment, artifact_location=location)
    except Exception:  # created concurrently by another process: read it back
        exp = mlflow_client.get_experiment_by_name(config.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"method": {"rank": 8}}`` -> ``{"method.rank": "8"}`` (MLflow params are strings)."""
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def content_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_sha() -> str | None:
    """The commit of the code being run, with ``-dirty`` when the tree has changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None


def who() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # no user database in some containers
        return socket.gethostname()


class SearchTracker:
    """Parent and child runs of one search, found again by tags after a restart."""

    def __init__(self, mlflow_client, experiment: str, search_id: str, tags: Mapping[str, str]):
        self.client = mlflow_client
        self.experiment = experiment
        self.search_id = search_id
        self.tags = {k: str(v) for k, v in tags.items() if v is not None}
        self._children: dict[str, str] = {}
        self._last_step: dict[str, int] = {}
        self.parent_id = self._find_or_create(
            f"tags.`{TAG_SEARCH}` = '{search_id}' and tags.`{TAG_KIND}` = 'search'",
            {**self.tags, TAG_SEARCH: search_id, TAG_KIND: "search"},
            run_name=f"search-{search_id}",
        )

    def _find_or_create(self, query: str, tags: dict[str, str], run_name: str) -> str:
        found = self.client.search_runs([self.experiment], filter_string=query, max_results=1)
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            return run_id
        return self.client.create_run(self.experiment, tags=tags, run_name=run_name).info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        existing = self.client.get_run(run_id).data.params
        todo = {k: v for k, v in flatten(params).items() if k not in existing}
        from mlflow.entities import Param

        if todo:
            self.client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in todo.items()])

    def trial_run(self, trial_id: str, params: Mapping[str, Any], name: str | None = None) -> str:
        """The child run of ``trial_id`` (created once, with its flattened params)."""
        if trial_id in self._children:
            return self._children[trial_id]
        run_id = self._find_or_create(
            f"tags.`{TAG_SEARCH}` = '{self.search_id}' and tags.`{TAG_TRIAL}` = '{trial_id}'",
            {**self.tags, TAG_SEARCH: self.search_id, TAG_TRIAL: trial_id, TAG_KIND: "trial",
             PARENT_TAG: self.parent_id},
            run_name=name or trial_id,
        )
        self.log_params(run_id, params)
        self._children[trial_id] = run_id
        history = self.client.get_metric_history(run_id, "train_loss")
        self._last_step[run_id] = max((m.step for m in history), default=-1)
        return run_id

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """Log the known metrics of one report; a step already logged is skipped."""
        if step <= self._last_step.get(run_id, -1):
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if is_logged(k) and isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if batch:
            self.client.log_batch(run_id, metrics=batch)
        self._last_step[run_id] = step

    def finish(self, run_id: str, status: str, artifacts: Mapping[str, Path] | None = None,
               tags: Mapping[str, Any] | None = None) -> None:
        """Attach artifact folders, tags, and end the run as FINISHED, FAILED or KILLED."""
        for dest, folder in (artifacts or {}).items():
            if folder and Path(folder).is_dir():
                self.client.log_artifacts(run_id, str(folder), dest)
        for k, v in (tags or {}).items():
            self.client.set_tag(run_id, k, str(v))
        self.client.set_terminated(run_id, status)

    def end_search(self, status: str, summary: Mapping[str, Any] | None = None) -> None:
        for k, v in (summary or {}).items():
            self.client.set_tag(self.parent_id, f"peftpipe.{k}", str(v))
        self.client.set_terminated(self.parent_id, status)
