"""The search stage: Ray Tune runs one training per trial, over methods and hyperparameters.

Follows Ray's current Train/Tune pattern: each trial is a small driver function (holding
0.01 CPU) that builds its own ``TorchTrainer`` with :func:`pipelines.train.build_trainer`
and fits it; Ray's ``TuneReportCallback`` forwards the workers' reports to Tune. MLflow
logging happens on the search driver (:class:`MlflowTrialCallback`). A search whose driver
died is resumed with ``Tuner.restore``: finished trials are kept, unfinished ones continue
from their last checkpoint.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from ..data.manifest import Manifest
from ..tracking import SearchTracker, TrackingConfig, client, content_hash, experiment_id, git_sha
from ..train import TrainConfig, build_trainer, check_inputs
from .callbacks import ADAPTER, CHECKPOINT_PATH_KEY, MlflowTrialCallback, StatusCallback
from .config import TuneConfig
from .objective import pareto_front
from .resources import TRIAL_DRIVER_CPU, cpus_per_worker, driver_resources
from .result import SearchResult


def _run_trial(config: dict[str, Any], *, base: dict[str, Any], dataset: str,
               trials_dir: str) -> None:
    """One trial: train the trial's method and learning rate with the shared recipe."""
    from ray import tune

    t = config["trial"]
    cfg = TrainConfig.model_validate({**base, "method": t["method"], "lr": t["lr"], "name": None})
    trial_id = tune.get_context().get_trial_id()
    # The trial's own folder: a restored trial finds its checkpoints there and resumes.
    trainer = build_trainer(cfg, dataset, Path(trials_dir) / trial_id, report_to_tune=True)
    trainer.fit()


def _trial_configs(config: TuneConfig) -> list[dict[str, Any]] | None:
    space = config.space
    if config.searcher == "grid":
        trials = space.grid()
    elif config.searcher == "random":
        rng = random.Random(config.seed)
        trials = [space.sample(rng) for _ in range(config.num_samples)]
    else:
        return None
    space.validate_trials(trials)
    return trials


def _expected_reports(train: TrainConfig) -> int:
    return math.ceil(train.max_steps / train.eval_every)


def search(train: TrainConfig, config: TuneConfig, *, manifest: Manifest | str | Path,
           run_dir: str | Path,
           tracking: TrackingConfig | None = None, recipe: dict[str, Any] | None = None,
           verbose: bool = True, trial_driver_cpu: float = TRIAL_DRIVER_CPU) -> SearchResult:
    """Run (or resume) the search; returns every trial's outcome, the best under the
    objective and budget, and the Pareto front. Needs a running Ray (``ray.init``).
    ``trial_driver_cpu`` 0 for a single training run: its driver then needs no CPU, so a
    run fits in exactly ``workers x cpus_per_worker`` (Tune accepts an empty head bundle)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    info = check_inputs(train, manifest)
    run_dir = Path(run_dir).resolve()
    trials = _trial_configs(config)
    reports = _expected_reports(train)
    train = train.model_copy(update={
        "num_workers": config.workers_per_trial,
        "cpus_per_worker": cpus_per_worker(config, trial_driver_cpu),
        "storage_path": str(run_dir / "trials"),
    })
    TrainConfig.model_validate(train.model_dump())  # batch divisibility with the new worker count
    search_id = config.name or "search-" + content_hash(
        {"train": train.model_dump(mode="json"), "tune": config.model_dump(mode="json"),
         "dataset": info.dataset_id})

    tracking = tracking or TrackingConfig()
    mlc = client(tracking, run_dir)
    exp = experiment_id(mlc, tracking, run_dir)
    tracker = SearchTracker(mlc, exp, search_id, tags={
        "dataset_id": info.dataset_id, "base_model": train.model.name,
        "recipe_hash": content_hash(recipe or {}), "git_sha": git_sha(),
    })
    tracker.log_params(tracker.parent_id, {
        "searcher": config.searcher, "scheduler": config.scheduler,
        "num_trials": len(trials) if trials is not None else config.num_samples,
        "objective": config.objective.model_dump(), "max_steps": train.max_steps,
        "batch_size": train.batch_size, "zero_stage": train.zero.stage,
    })
    if recipe:
        mlc.log_dict(tracker.parent_id, recipe, "recipe.json")

    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, base=train.model_dump(mode="json"),
                             dataset=str(info.path), trials_dir=str(run_dir / "trials")),
        driver_resources(trial_driver_cpu),
    )
    obj = config.objective
    if config.scheduler == "asha":
        # max_t one past the last report, so a trial is never stopped *at* its last report
        # (which would lose its final artifacts).
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=reports + 1,
                                  grace_period=min(config.grace_period, reports),
                                  reduction_factor=config.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    search_alg, param_space, num_samples = None, None, 1
    if trials is not None:
        param_space = {"trial": tune.grid_search(trials)}
    else:
        from ray.tune.search.optuna import OptunaSearch

        space = config.space

        def define_by_run(ot_trial):
            return {"trial": space.suggest(ot_trial)}

        search_alg = OptunaSearch(space=define_by_run, metric=obj.metric, mode=obj.mode,
                                  seed=config.seed)
        num_samples = config.num_samples
    callbacks = [MlflowTrialCallback(tracker, reports, {
        "dataset_id": info.dataset_id, "max_steps": train.max_steps, "batch_size": train.batch_size,
        "zero_stage": train.zero.stage})]
    if verbose:
        callbacks.append(StatusCallback(obj.metric, total_steps=train.max_steps))
    run_config = tune.RunConfig(name=search_id, storage_path=str(run_dir / "search"),
                                callbacks=callbacks, verbose=0)
    exp_path = run_dir / "search" / search_id
    if tune.Tuner.can_restore(str(exp_path)):
        # The search goes on with the callbacks it started with (pickled with the experiment;
        # Tuner.restore takes no others): they rebuild their per-driver state when unpickled,
        # and the outcomes below find each trial's MLflow run by its tags.
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True,
                                   param_space=param_space)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=obj.metric, mode=obj.mode, scheduler=scheduler, search_alg=search_alg,
                num_samples=num_samples, max_concurrent_trials=config.max_concurrent_trials,
                reuse_actors=False,
            ),
            run_config=run_config,
        )
    grid = tuner.fit()

    outcomes = [_outcome(r, reports, callbacks[0]) for r in grid]
    outcomes.sort(key=lambda o: o["trial_id"])
    _close_open_runs(mlc, tracker, outcomes)
    best = obj.best([{**o["metrics"], "_trial": o["trial_id"]} for o in outcomes])
    best_trial = next((o for o in outcomes if best and o["trial_id"] == best["_trial"]), None)
    front_ids = {p["_trial"] for p in pareto_front(
        [{**o["metrics"], "_trial": o["trial_id"]} for o in outcomes], obj.metric, obj.mode)}
    tracker.end_search("FINISHED", {
        "best_trial": best_trial["trial_id"] if best_trial else "none",
        "best_run_id": best_trial["mlflow_run_id"] if best_trial else "",
        "best_" + obj.metric: best_trial["metrics"].get(obj.metric) if best_trial else "",
    })
    return SearchResult(search_id=search_id, path=str(exp_path), trials=outcomes,
                        best=best_trial, pareto=[o for o in outcomes if o["trial_id"] in front_ids],
                        parent_run_id=tracker.parent_id, tracking_uri=mlc.tracking_uri,
                        objective=obj)


def _close_open_runs(mlc, tracker: SearchTracker, outcomes: list[dict[str, Any]]) -> None:
    """A trial that ended while its driver was dead had no callback: end its run now, with
    its adapter, so no run of a finished search stays RUNNING."""
    for o in outcomes:
        run = mlc.get_run(o["mlflow_run_id"])
        if run.info.status != "RUNNING":
            continue
        has_adapter = any(f.path == ADAPTER for f in mlc.list_artifacts(run.info.run_id))
        adapter = o["adapter_dir"] if o["adapter_dir"] and not has_adapter else None
        tracker.finish(run.info.run_id, "FAILED" if o["status"] == "error" else "FINISHED",
                       artifacts={ADAPTER: Path(adapter)} if adapter else None,
                       tags={"peftpipe.stopped_early": o["status"] == "stopped early"})


def _outcome(result, reports: int, mlflow_cb: MlflowTrialCallback) -> dict[str, Any]:
    metrics = dict(result.metrics or {})
    t = (result.config or {}).get("trial", {})
    trial_id = metrics.get("trial_id") or Path(result.path).name
    history: dict[str, list[tuple[int, float]]] = {}
    df = result.metrics_dataframe
    if df is not None and "step" in df:
        for col in ("eval_loss", "train_loss", "eval_accuracy"):
            if col in df:
                history[col] = [(int(s), float(v)) for s, v in zip(df["step"], df[col]) if v == v]
    if result.error is not None:
        status = "error"
    elif int(metrics.get("training_iteration", 0)) < reports:
        status = "stopped early"
    else:
        status = "completed"
    ckpt = metrics.get(CHECKPOINT_PATH_KEY)
    run_id = mlflow_cb.runs.get(trial_id) or mlflow_cb.tracker.trial_run(trial_id, {})
    return {
        "trial_id": trial_id, "method": t.get("method", {}), "lr": t.get("lr"),
        "metrics": {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))},
        "history": history, "status": status, "time_s": metrics.get("time_total_s"),
        "adapter_dir": str(Path(ckpt) / ADAPTER) if ckpt else None,
        "mlflow_run_id": run_id, "error": str(result.error) if result.error else None,
    }
