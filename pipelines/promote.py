"""Promotion: register a search's winner and move ``champion`` only if it earns it.

The candidate and the current champion are both evaluated on the held-out ``test`` split of
the candidate's dataset (same code, same rows), and the registry decides with the margin.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import peft_core

from . import registry, tracking
from .errors import InputError
from .evaluate import evaluate_adapter
from .serve import export, mlflow_model, pipeline_info

MODEL_ARTIFACT = "model"


class PromotionError(InputError, RuntimeError):
    """Nothing to promote (no eligible trial, unknown search, a champion on another base,
    a metric the task does not measure): the request cannot be met, exit 2 for `promote`.
    Inside `run` the job's own search made the candidate, so `run` exits 1 on it. Still a
    ``RuntimeError``, as before the tree."""


def find_search(client, experiment: str, search_id: str):
    runs = client.search_runs(
        [experiment],
        filter_string=(f"tags.`{tracking.TAG_SEARCH}` = '{search_id}' and "
                       f"tags.`{tracking.TAG_KIND}` = 'search'"),
        max_results=1,
    )
    if not runs:
        raise PromotionError(f"search {search_id!r}: no such search in this tracking store")
    return runs[0]


def register_model(client, name: str, run_id: str, *, adapter_path: str = "adapter",
                   tags: dict[str, Any] | None = None) -> str:
    """Register run ``run_id``'s adapter artifact as an MLflow Model (a ``pyfunc`` with
    signature and input example, logged beside it as the run's ``model`` artifact; the base
    model is referenced, not copied); its facts (base model and fingerprint, task, method)
    become the version's tags. Returns the version, aliased ``candidate``."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="peftpipe-register-") as tmp:
        adapter = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=adapter_path, dst_path=tmp,
            tracking_uri=client.tracking_uri)
        model = mlflow_model.save(adapter, Path(tmp) / "model")
        client.log_artifacts(run_id, str(model), MODEL_ARTIFACT)
        facts = mlflow_model.facts(adapter)
        # what other servers can load (peftpipe export): readable from the version's tags
        facts.update(export.support(peft_core.read_adapter_config(adapter), facts["task"]))
    return registry.register_candidate(client, name, run_id, artifact_path=MODEL_ARTIFACT,
                                       tags={**facts, **(tags or {})})


def promote(*, run_id: str, manifest: Any, config: registry.RegistryConfig,
            tracking_config: tracking.TrackingConfig, run_dir: str | Path,
            tags: dict[str, Any] | None = None, split: str = "test") -> registry.Decision:
    """Register the adapter logged by MLflow run ``run_id`` and decide on ``champion``."""
    client = tracking.client(tracking_config, run_dir)
    run = client.get_run(run_id)
    version = register_model(
        client, config.model_name, run_id,
        tags={"method": run.data.params.get("method.name", ""),
              "dataset_id": run.data.tags.get("dataset_id", ""),
              "search_id": run.data.tags.get(tracking.TAG_SEARCH, ""), **(tags or {})},
    )
    cache: dict[str, float] = {}
    scratch = Path(tempfile.mkdtemp(prefix="peftpipe-promote-"))
    candidate_model: dict[str, str] = {}

    def score(v: str) -> float:
        if v not in cache:
            _, folder = registry.download(client, f"models:/{config.model_name}/{v}", scratch / v)
            meta = pipeline_info(folder)
            if v == version:
                candidate_model.update(model=meta["model"])
            elif meta["model"] != candidate_model.get("model"):
                # Scores on another base model's tokenization are not comparable.
                raise PromotionError(
                    f"champion v{v} is built on {meta['model']!r}, the candidate on "
                    f"{candidate_model.get('model')!r}: not comparable on one test split; "
                    "register it under another model name"
                )
            metrics = evaluate_adapter(folder, manifest, split=split)
            if config.metric not in metrics:
                raise PromotionError(
                    f"registry.metric: {config.metric!r} is not measured for this task; "
                    f"available: {sorted(metrics)}"
                )
            cache[v] = metrics[config.metric]
        return cache[v]

    return registry.decide(client, config, version, score)
