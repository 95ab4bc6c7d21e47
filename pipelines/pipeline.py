"""The main job, one function per stage: prepare -> search (or train) -> promote -> report.

Every stage takes the validated :class:`~pipelines.recipe.Recipe` and what the stage before
it produced, so ``peftpipe run`` chains them and ``peftpipe prepare|train|tune|promote|report``
run one. A stage's results are also written under the recipe's ``run_dir`` (the tokenized
dataset by its content id, ``trials.json`` after a search, ``report.md``), so a later
stage can be run on its own, in another process.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

from peft_core.files import atomic_file

# log_to_file and ray_session are also the CLI's (``pipeline.log_to_file``/``ray_session``)
from .console import log_to_file
from .data.manifest import Manifest
from .errors import JobError
from .ray_runtime import ray_session
from .recipe import Recipe, RecipeError
from .tune import Objective, SearchResult  # Ray-free (the recipe imports them too)

log = logging.getLogger("pipelines")


TRIALS_FILE = "trials.json"


class NoWinnerError(JobError):
    """The search left no trial with the objective's metric: nothing to promote."""


class TrialsFailedError(JobError):
    """Trials still failed after their retries and the recipe does not tolerate it
    (``tune.tolerate_failed_trials``); the search's outcome is saved all the same."""


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    manifest: Manifest | None = None
    search: SearchResult | None = None
    decision: Any = None
    report: Path | None = None


# -- stages ------------------------------------------------------------------------------------

def split_requirements(recipe: Recipe) -> dict[str, tuple[int, str]]:
    """The fewest rows each split needs for the recipe's later stages: a whole batch to
    train on, and at least one row to evaluate and to promote on."""
    fr = recipe.data.split
    need = {"train": (recipe.train.batch_size, f"train.batch_size is {recipe.train.batch_size}")}
    if fr.eval > 0:
        need["eval"] = (1, "evaluation")
    if fr.test > 0:
        need["test"] = (1, "promotion evaluates on it")
    return need


def prepare_stage(recipe: Recipe) -> Manifest:
    """Tokenize the recipe's corpora with Ray Data (reused when already built); splits too
    small for the recipe's batch or evaluation are a :class:`~pipelines.data.DataError`."""
    from .data import prepare

    sources = [_materialise(s, recipe) for s in recipe.data.sources]
    config = recipe.data.model_copy(update={"sources": sources})
    manifest = prepare(config, require=split_requirements(recipe))
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
    with atomic_file(out) as tmp:
        builtin.write_rows(rows, tmp, "jsonl")
    return str(out.resolve())


def tune_stage(recipe: Recipe, manifest: Manifest, *, verbose: bool = True) -> SearchResult:
    """Ray Tune over the recipe's methods and hyperparameters, every trial in MLflow."""
    from .tune import search

    if recipe.tune is None:
        raise RecipeError("tune: the recipe has no tune section (use `peftpipe train` for one run)")
    result = search(recipe.train, recipe.tune, manifest=manifest, run_dir=recipe.run_dir,
                    tracking=recipe.tracking, recipe=recipe.dump(), verbose=verbose)
    return _check_failed(_save_trials(recipe, result, manifest), recipe.tune.tolerate_failed_trials)


def train_stage(recipe: Recipe, manifest: Manifest, *, verbose: bool = True) -> SearchResult:
    """One training run of ``train.method`` (:mod:`pipelines.single_run`): tracked,
    resumable and promotable as a search's trial is, and saved as a one-trial search's
    ``trials.json``."""
    from .single_run import run_one

    train = recipe.train
    if manifest.task != "classification" and "eval_before_training" not in train.model_fields_set:
        # one evaluation before training gives the untrained model's eval loss: the
        # reference a language model's run must beat (classification's is the majority class)
        train = train.model_copy(update={"eval_before_training": True})
    result = run_one(train, manifest=manifest, run_dir=recipe.run_dir,
                     objective=Objective.model_validate(_objective(recipe)),
                     tracking=recipe.tracking, recipe=recipe.dump(), verbose=verbose)
    return _check_failed(_save_trials(recipe, result, manifest), tolerated=False)


def _check_failed(search: SearchResult, tolerated: bool) -> SearchResult:
    failed = [t for t in search.trials if t["status"] == "error"]
    if failed and not tolerated:
        first = (failed[0].get("error") or "").strip().splitlines()
        raise TrialsFailedError(
            f"{len(failed)} of {len(search.trials)} trial(s) failed after their retries "
            f"({', '.join(t['trial_id'] for t in failed)}): "
            f"{first[-1] if first else 'no error recorded'} (outcomes in "
            f"{TRIALS_FILE}; tune.tolerate_failed_trials: true goes on with the others)")
    return search


def promote_stage(recipe: Recipe, manifest: Manifest, search: SearchResult | None = None):
    """Register the search's best trial (``search``, else the run dir's last one); it
    becomes ``champion`` only if it beats the current champion on the test split."""
    from .promote import promote

    search = search or load_trials(recipe)
    best = search.best
    if not best:
        raise NoWinnerError("promote: no trial finished with the objective's metric within budget")
    decision = promote(run_id=best["mlflow_run_id"], manifest=manifest, config=recipe.registry,
                       tracking_config=recipe.tracking, run_dir=recipe.run_dir,
                       tags={"recipe": recipe.name})
    log.info("promote: %s", decision.reason)
    return decision


def report_stage(recipe: Recipe, search: SearchResult | None = None, decision=None) -> Path:
    """``report.md`` with the leaderboard and the two plots, in ``run_dir`` (from
    ``search``, else the run dir's last search)."""
    from .report import write_report

    search = search or load_trials(recipe)
    objective = objective_of(recipe, search)
    champion = None
    if decision is not None:
        champion = {"model": f"models:/{decision.model_name}@champion" if decision.promoted
                    else f"models:/{decision.model_name}/{decision.champion_version}",
                    "version": decision.version, "promoted": decision.promoted,
                    f"test_{recipe.registry.metric}": decision.candidate_score,
                    "reason": decision.reason}
    return write_report(search.trials, objective, Path(recipe.run_dir),
                        title=f"peft-pipelines: {recipe.name}", champion=champion,
                        extra=f"\nSearch `{search.search_id}`, MLflow: `{search.tracking_uri}`.\n",
                        ref=search.reference, label_names=search.label_names)


def run(recipe: Recipe, *, address: str | None = None, verbose: bool = True,
        on_dataset=None, ray_verbose: bool = False) -> RunResult:
    """The whole job: prepare -> search (one training run if the recipe has no ``tune``)
    -> promote -> report. ``on_dataset(manifest)`` is called once the data stage is done
    (the CLI prints its summary there, before the trials start)."""
    out = RunResult(Path(recipe.run_dir))
    log_to_file(recipe)
    with ray_session(recipe, address, verbose=ray_verbose):
        out.manifest = prepare_stage(recipe)
        if on_dataset is not None:
            on_dataset(out.manifest)
        step = tune_stage if recipe.tune is not None else train_stage
        out.search = step(recipe, out.manifest, verbose=verbose)
    out.decision = promote_stage(recipe, out.manifest, out.search)
    out.report = report_stage(recipe, out.search, out.decision)
    return out


# -- what a search leaves on disk --------------------------------------------------------------

def _objective(recipe: Recipe) -> dict[str, Any]:
    if recipe.tune is not None:
        return recipe.tune.objective.model_dump()
    return {"metric": recipe.registry.metric, "mode": recipe.registry.mode}


def objective_of(recipe: Recipe, search: SearchResult) -> Objective:
    """The objective ``search`` ranked by (the recipe's for a file that has none)."""
    return search.objective or Objective.model_validate(_objective(recipe))


def _save_trials(recipe: Recipe, search: SearchResult,
                 manifest: Manifest | None = None) -> SearchResult:
    """``search`` completed with what the dataset tells (the reference score, class names)
    and saved as ``run_dir/trials.json``."""
    from .report import reference

    search = dataclasses.replace(search, objective=objective_of(recipe, search))
    if manifest is not None:
        search = dataclasses.replace(
            search, reference=reference(manifest, search.trials, search.objective),
            label_names=manifest.label_names, dataset_id=manifest.dataset_id)
    search.save(Path(recipe.run_dir) / TRIALS_FILE)
    return search


def load_trials(recipe: Recipe) -> SearchResult:
    """The last search's outcome saved in ``run_dir`` (for promote/report run alone)."""
    path = Path(recipe.run_dir) / TRIALS_FILE
    if not path.is_file():
        raise RecipeError(f"run_dir: {path} does not exist; run `peftpipe tune` (or `run`) first")
    try:
        search = SearchResult.load(path)
    except (ValueError, KeyError, TypeError) as e:
        raise RecipeError(f"run_dir: {path} is not a search's outcome: {e}") from e
    reconcile_runs(recipe, search)
    return search


def reconcile_runs(recipe: Recipe, search: SearchResult) -> list[str]:
    """End as KILLED the MLflow runs of the experiment ``search`` is in that a dead driver
    left RUNNING (this search, or a later one killed with SIGKILL); best effort: a tracking
    server that cannot be reached only costs a warning here."""
    from .tracking import TrackingConfig, client, experiment_id
    from .tune.runs import reconcile_experiment

    try:
        cfg = TrackingConfig(tracking_uri=search.tracking_uri,
                             experiment=recipe.tracking.experiment)
        mlc = client(cfg, recipe.run_dir)
        return reconcile_experiment(mlc, experiment_id(mlc, cfg, recipe.run_dir))
    except Exception:  # reporting must not fail on the tracking store
        log.warning("could not reconcile the runs of search %s", search.search_id,
                    exc_info=True)
        return []
