"""The main job, one function per stage: prepare -> search (or train) -> promote -> report.

Every stage takes the validated :class:`~pipelines.recipe.Recipe` and what the stage before
it produced, so ``peftpipe run`` chains them and ``peftpipe prepare|train|tune|promote|report``
run one. A stage's results are also written under the recipe's ``run_dir`` (the tokenized
dataset by its content id, ``trials.json`` after a search, ``report.md``), so a later
stage can be run on its own, in another process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .recipe import Recipe, RecipeError

log = logging.getLogger("pipelines")


TRIALS_FILE = "trials.json"


class NoWinnerError(RuntimeError):
    """The search left no trial with the objective's metric: nothing to promote."""


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    manifest: Any = None
    search: Any = None
    decision: Any = None
    report: Path | None = None


# -- Ray and logs ------------------------------------------------------------------------------

@contextlib.contextmanager
def ray_session(recipe: Recipe, address: str | None = None) -> Iterator[None]:
    """Join the recipe's cluster (or ``address``) or start a local Ray for the job, check
    that it can run the recipe, and stop what was started afterwards."""
    import ray

    address = address or recipe.ray.address
    started = False
    if not ray.is_initialized():
        if address is None:
            cpus = recipe.ray.num_cpus or os.cpu_count() or 1
            # Fail before starting anything when the local machine cannot hold the search.
            recipe.check_resources(cpus, recipe.ray.num_gpus or _local_gpus())
        kwargs: dict[str, Any] = dict(address=address, log_to_driver=recipe.ray.log_to_driver,
                                      logging_level=logging.WARNING)
        if address is None:
            kwargs.update(num_cpus=recipe.ray.num_cpus, num_gpus=recipe.ray.num_gpus,
                          include_dashboard=recipe.ray.include_dashboard)
        ctx = ray.init(**kwargs)
        started = True
        _link_ray_logs(recipe, ctx)
    try:
        res = ray.cluster_resources()
        recipe.check_resources(res.get("CPU", 0), res.get("GPU", 0))
        yield
    finally:
        if started:
            ray.shutdown()


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _link_ray_logs(recipe: Recipe, ctx: Any) -> None:
    """``run_dir/logs/ray`` points at this Ray session's logs (worker stdout, errors)."""
    session = (getattr(ctx, "address_info", None) or {}).get("session_dir")
    if not session:
        return
    logs = Path(recipe.run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    link = logs / "ray"
    with contextlib.suppress(OSError):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(session) / "logs", target_is_directory=True)


def log_to_file(recipe: Recipe) -> Path:
    """Send the pipeline's own log records to ``run_dir/logs/peftpipe.log``."""
    path = Path(recipe.run_dir) / "logs" / "peftpipe.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if not any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in root.handlers):
        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
    return path


# -- stages ------------------------------------------------------------------------------------

def prepare_stage(recipe: Recipe):
    """Tokenize the recipe's corpora with Ray Data (reused when already built)."""
    from .data import prepare

    sources = [_materialise(s, recipe) for s in recipe.data.sources]
    config = recipe.data.model_copy(update={"sources": sources})
    manifest = prepare(config)
    log.info("prepare: dataset %s (%s rows) at %s", manifest.dataset_id, manifest.rows,
             manifest.path)
    return manifest


def _materialise(source: str, recipe: Recipe) -> str:
    """A ``builtin:NAME`` corpus written once, in a fixed shuffled order, under run_dir
    (the packaged files are sorted by label; ``max_rows`` must not take one class only)."""
    if not source.startswith("builtin:"):
        return source
    from .data import builtin

    name = source.removeprefix("builtin:")
    rows = builtin.movie_review_rows() if name == "movie_reviews" else builtin.chatterbot_rows()
    random.Random(0).shuffle(rows)
    out = Path(recipe.run_dir) / "corpora" / f"{name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".jsonl.tmp")
    os.close(fd)
    builtin.write_rows(rows, tmp, "jsonl")
    os.replace(tmp, out)
    return str(out.resolve())


def tune_stage(recipe: Recipe, manifest, *, verbose: bool = True):
    """Ray Tune over the recipe's methods and hyperparameters, every trial in MLflow."""
    from .tune import search

    if recipe.tune is None:
        raise RecipeError("tune: the recipe has no tune section (use `peftpipe train` for one run)")
    result = search(recipe.train, recipe.tune, manifest=manifest, run_dir=recipe.run_dir,
                    tracking=recipe.tracking, recipe=recipe.dump(), verbose=verbose)
    _save_trials(recipe, result)
    return result


def train_stage(recipe: Recipe, manifest, *, verbose: bool = True):
    """One training run of ``train.method``: a search with a single trial, so it is tracked,
    resumable and promotable exactly like a searched one."""
    from .tune import TuneConfig, search

    method = dict(recipe.train.method)
    name = method.pop("name")
    # In a search space a list is a choice; a fixed list value is a one-element choice.
    params = {k: [v] if isinstance(v, list) else v for k, v in method.items()}
    objective = _objective(recipe)
    one = TuneConfig.model_validate({
        "space": {"methods": {name: params}, "lr": recipe.train.lr},
        "searcher": "grid", "scheduler": "fifo", "max_concurrent_trials": 1,
        "workers_per_trial": recipe.train.num_workers,
        "cpus_per_worker": recipe.train.cpus_per_worker, "objective": objective,
    })
    result = search(recipe.train, one, manifest=manifest, run_dir=recipe.run_dir,
                    tracking=recipe.tracking, recipe=recipe.dump(), verbose=verbose)
    _save_trials(recipe, result)
    return result


def promote_stage(recipe: Recipe, manifest, search=None):
    """Register the search's best trial; it becomes ``champion`` only if it beats the
    current champion on the test split."""
    from .promote import promote

    search = search or load_trials(recipe)
    best = search.best if hasattr(search, "best") else search["best"]
    if not best:
        raise NoWinnerError("promote: no trial finished with the objective's metric within budget")
    decision = promote(run_id=best["mlflow_run_id"], manifest=manifest, config=recipe.registry,
                       tracking_config=recipe.tracking, run_dir=recipe.run_dir,
                       tags={"recipe": recipe.name})
    log.info("promote: %s", decision.reason)
    return decision


def report_stage(recipe: Recipe, search=None, decision=None) -> Path:
    """``report.md`` with the leaderboard and the two plots, in ``run_dir``."""
    from .report import write_report
    from .tune import Objective

    data = _as_dict(search) if search is not None else load_trials(recipe)
    objective = Objective.model_validate(data.get("objective") or _objective(recipe))
    champion = None
    if decision is not None:
        champion = {"model": f"models:/{decision.model_name}@champion" if decision.promoted
                    else f"models:/{decision.model_name}/{decision.champion_version}",
                    "version": decision.version, "promoted": decision.promoted,
                    f"test_{recipe.registry.metric}": decision.candidate_score,
                    "reason": decision.reason}
    return write_report(data["trials"], objective, Path(recipe.run_dir),
                        title=f"peft-pipelines: {recipe.name}", champion=champion,
                        extra=f"\nSearch `{data['search_id']}`, MLflow: `{data['tracking_uri']}`.\n")


def run(recipe: Recipe, *, address: str | None = None, verbose: bool = True) -> RunResult:
    """The whole job: prepare -> search (one training run if the recipe has no ``tune``)
    -> promote -> report."""
    out = RunResult(Path(recipe.run_dir))
    log_to_file(recipe)
    with ray_session(recipe, address):
        out.manifest = prepare_stage(recipe)
        step = tune_stage if recipe.tune is not None else train_stage
        out.search = step(recipe, out.manifest, verbose=verbose)
    out.decision = promote_stage(recipe, out.manifest, out.search)
    out.report = report_stage(recipe, out.search, out.decision)
    return out


# -- what a search leaves on disk --------------------------------------------------------------

def _as_dict(search) -> dict[str, Any]:
    if isinstance(search, dict):
        return search
    return {"search_id": search.search_id, "trials": search.trials, "best": search.best,
            "pareto": [p["trial_id"] for p in search.pareto],
            "tracking_uri": search.tracking_uri, "parent_run_id": search.parent_run_id}


def _objective(recipe: Recipe) -> dict[str, Any]:
    if recipe.tune is not None:
        return recipe.tune.objective.model_dump()
    return {"metric": recipe.registry.metric, "mode": recipe.registry.mode}


def _save_trials(recipe: Recipe, search) -> Path:
    data = {**_as_dict(search), "objective": _objective(recipe)}
    path = Path(recipe.run_dir) / TRIALS_FILE
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def load_trials(recipe: Recipe) -> dict[str, Any]:
    """The last search's outcome saved in ``run_dir`` (for promote/report run alone)."""
    path = Path(recipe.run_dir) / TRIALS_FILE
    if not path.is_file():
        raise RecipeError(f"run_dir: {path} does not exist; run `peftpipe tune` (or `run`) first")
    return json.loads(path.read_text())
