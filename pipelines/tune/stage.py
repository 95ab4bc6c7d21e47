"""The search stage: Ray Tune runs one training per trial, over methods and hyperparameters.

Follows Ray's current Train/Tune pattern: each trial is a small driver function (holding
0.01 CPU) that builds its own ``TorchTrainer`` with :func:`pipelines.train.build_trainer`
and fits it; Ray's ``TuneReportCallback`` forwards the workers' reports to Tune. MLflow
logging happens on the search driver (:class:`MlflowTrialCallback`). A search whose driver
died is resumed with ``Tuner.restore``: finished trials are kept, unfinished ones continue
from their last checkpoint.

Failures inside a search: Ray Train restarts a trial's lost workers (``train.max_failures``),
Ray Tune restarts a trial whose driver or training failed (``tune.max_trial_failures``);
either way the trial resumes from the last checkpoint in its own folder. SIGINT or SIGTERM
stops the search as Tune's own stop signal does (experiment state saved, trials stopped),
a second one at once; either way every MLflow run of the search is ended (KILLED) and
:class:`SearchInterrupted` is raised.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..data.manifest import Manifest
from ..tracking import SearchTracker, TrackingConfig, content_hash
from ..train import TrainConfig, build_trainer, check_inputs, scheduling
from ..train.engines import COMPLETED, STOPPED, member_adapter
from . import packing
from .callbacks import MlflowTrialCallback, StatusCallback
from .config import TuneConfig
from .resources import cpus_per_worker, driver_resources
from .result import SearchInterrupted, SearchResult
from .runs import conclude, end_open_runs, ended_with_driver, open_search, stop_on_signals
from .trial_folder import set_aside_torn_snapshot, write_pid
from .trial_log import (
    CHECKPOINT_PATH_KEY,
    expected_reports,
    finish_trial,
    history_of,
    stopped_early,
    trial_outcome,
    trial_params,
    trial_status,
)

log = logging.getLogger(__name__)


def _run_trial(config: dict[str, Any], *, base: dict[str, Any], dataset: str,
               trials_dir: str, stopper: dict[str, str] | None = None) -> None:
    """One trial: train the trial's method and learning rate with the shared recipe; or, for
    a pack, its members side by side (``stopper``: the rungs actor's name and the metric)."""
    import time

    from ray import tune

    # Tune's time_total_s starts just before this call: the trial's phases start here too
    started_at = time.time()
    t = config["trial"]
    trial_id = tune.get_context().get_trial_id()
    specs = t.get("pack")
    members = None
    if specs is not None:
        members = [{"name": n, "method": s["method"], "lr": s["lr"]}
                   for n, s in zip(packing.member_names(trial_id, len(specs)), specs)]
        t = specs[0]  # the run's own method and lr fields (each member brings its own)
    cfg = TrainConfig.model_validate({**base, "method": t["method"], "lr": t["lr"], "name": None})
    # The trial's own folder: a restored or retried trial finds its checkpoints there and
    # resumes from the latest.
    folder = Path(trials_dir) / trial_id
    write_pid(folder / "workers" / "driver.pid")  # beside its workers' rank{R}.pid
    trainer = build_trainer(
        cfg, dataset, folder, report_to_tune=True, started_at=started_at,
        resume_from=set_aside_torn_snapshot(folder), members=members,
        stopper=packing.MemberStopper(**stopper) if members and stopper else None)
    # a trial whose workers stay unplaced fails naming Ray's pending demand, as a run does
    scheduling.fit(trainer, cfg)


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


def search(train: TrainConfig, config: TuneConfig, *, manifest: Manifest | str | Path,
           run_dir: str | Path,
           tracking: TrackingConfig | None = None, recipe: dict[str, Any] | None = None,
           verbose: bool = True) -> SearchResult:
    """Run (or resume) the search; returns every trial's outcome, the best under the
    objective and budget, and the Pareto front. Each trial is one run of ``train`` with its
    own method and learning rate, on ``train.num_workers`` workers of
    ``train.cpus_per_worker`` CPUs (unset: the default share, see
    :func:`~pipelines.tune.resources.plan`). Needs a running Ray (``ray.init``).
    Raises :class:`SearchInterrupted` when SIGINT or SIGTERM stopped it."""
    info = check_inputs(train, manifest)
    packing.check(train, config)
    run_dir = Path(run_dir).resolve()
    trials = _trial_configs(config)
    reports = expected_reports(train)
    train = train.model_copy(update={
        # per node under the recipe's placement strategy (STRICT_SPREAD needs a node each)
        "cpus_per_worker": cpus_per_worker(config, train=train),
        "storage_path": str(run_dir / "trials"),
    })
    search_id = config.name or "search-" + content_hash(
        {"train": train.model_dump(mode="json"), "tune": config.model_dump(mode="json"),
         "dataset": info.dataset_id})
    mlc, exp, tracker = open_search(
        tracking or TrackingConfig(), run_dir, search_id, train=train,
        dataset_id=info.dataset_id, recipe=recipe, params={
            "searcher": config.searcher, "scheduler": config.scheduler,
            "num_trials": len(trials) if trials is not None else config.num_samples,
            "objective": config.objective.model_dump(), "pack": config.pack})
    with ended_with_driver(mlc, exp, search_id):
        return _search(train, config, info, run_dir, trials, reports, search_id, mlc, exp,
                       tracker, verbose)


def _search(train: TrainConfig, config: TuneConfig, info, run_dir: Path,
            trials: list[dict[str, Any]] | None, reports: int, search_id: str, mlc, exp: str,
            tracker: SearchTracker, verbose: bool) -> SearchResult:
    """Tune's run of the search's trials, then their outcomes (the parent run ends)."""
    from ray import tune

    # members are stopped inside their packs, by the search's own rungs (see packing)
    stopper, rungs = _member_rungs(config, search_id, reports)
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, base=train.model_dump(mode="json"),
                             dataset=str(info.path), trials_dir=str(run_dir / "trials"),
                             stopper=stopper),
        driver_resources(),
    )
    callbacks = [MlflowTrialCallback(tracker, reports, trial_params(train, info.dataset_id))]
    if verbose:
        callbacks.append(StatusCallback(config.objective.metric, total_steps=train.max_steps,
                                        waiting_notice_s=config.waiting_notice_s))
    exp_path = run_dir / "search" / search_id
    tuner = _tuner(trainable, config, trials, reports, exp_path, callbacks)
    with _stop_on_signals() as stopped_by:
        grid = tuner.fit()
    del rungs  # the members' rungs live as long as the search runs
    if stopped_by:
        end_open_runs(mlc, exp, search_id, "KILLED", f"stopped by {stopped_by[0]}")
        raise SearchInterrupted(
            f"search {search_id} stopped by {stopped_by[0]}; its state is saved: run the same "
            "command again to resume it", signal_name=stopped_by[0])
    outcomes = [o for r in grid for o in _outcomes(r, reports, callbacks[0], train.max_steps)]
    _close_open_runs(tracker, outcomes)
    return conclude(tracker, outcomes, config.objective, path=str(exp_path),
                    tolerate_failed=config.tolerate_failed_trials)


def _member_rungs(config: TuneConfig, search_id: str,
                  reports: int) -> tuple[dict[str, str] | None, Any]:
    """A packed ASHA search's rungs actor (its name and the metric, for each pack's
    ``stopper``) and the handle that keeps it alive; (None, None) otherwise."""
    if config.pack <= 1 or config.scheduler != "asha":
        return None, None
    obj = config.objective
    name, rungs = packing.start_rungs(
        search_id, mode=obj.mode, grace_period=min(config.grace_period, reports),
        reduction_factor=config.reduction_factor, max_t=reports + 1)
    return {"metric": obj.metric, "actor_name": name}, rungs


def _scheduler(config: TuneConfig, reports: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if config.pack > 1 or config.scheduler != "asha":
        # a pack is one Tune trial; Tune must not stop it for one member's metric
        return FIFOScheduler()
    # max_t one past the last report, so a trial is never stopped *at* its last report
    # (which would lose its final artifacts).
    return ASHAScheduler(time_attr="training_iteration", max_t=reports + 1,
                         grace_period=min(config.grace_period, reports),
                         reduction_factor=config.reduction_factor)


def _space(config: TuneConfig,
           trials: list[dict[str, Any]] | None) -> tuple[dict[str, Any] | None, Any, int]:
    """``(param_space, search_alg, num_samples)``: the grid or random draws as a Tune
    grid (a pack's trials cut into packs), or Optuna's define-by-run space."""
    from ray import tune

    if trials is not None and config.pack > 1:
        return {"trial": tune.grid_search(
            [{"pack": p} for p in packing.packs(trials, config.pack)])}, None, 1
    if trials is not None:
        return {"trial": tune.grid_search(trials)}, None, 1
    from ray.tune.search.optuna import OptunaSearch

    space, obj = config.space, config.objective

    def define_by_run(ot_trial):
        return {"trial": space.suggest(ot_trial)}

    return None, OptunaSearch(space=define_by_run, metric=obj.metric, mode=obj.mode,
                              seed=config.seed), config.num_samples


def _tuner(trainable: Any, config: TuneConfig, trials: list[dict[str, Any]] | None,
           reports: int, exp_path: Path, callbacks: list[Any]) -> Any:
    """The search's Tuner: restored from ``exp_path`` when a driver ran it before, else new."""
    from ray import tune

    param_space, search_alg, num_samples = _space(config, trials)
    if tune.Tuner.can_restore(str(exp_path)):
        # The search goes on with the callbacks it started with (pickled with the experiment;
        # Tuner.restore takes no others): they rebuild their per-driver state when unpickled,
        # and the outcomes find each trial's MLflow run by its tags.
        return tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True, param_space=param_space)
    packed = config.pack > 1
    # A trial whose driver or training failed (its node lost, say) runs again; it resumes
    # from the checkpoint in its own folder (see _run_trial).
    run_config = tune.RunConfig(
        name=exp_path.name, storage_path=str(exp_path.parent), callbacks=callbacks, verbose=0,
        failure_config=tune.FailureConfig(max_failures=config.max_trial_failures))
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(
            # a pack reports its members' metrics, not one of its own
            metric=None if packed else config.objective.metric,
            mode=None if packed else config.objective.mode,
            scheduler=_scheduler(config, reports), search_alg=search_alg,
            num_samples=num_samples, max_concurrent_trials=config.max_concurrent_trials,
            reuse_actors=False,
        ),
        run_config=run_config,
    )


def _tune_stop_signal(signum: int, frame: Any) -> None:
    """SIGUSR1's handler outside ``tuner.fit()`` (Tune installs its own inside): a stop
    request there stops at once."""
    raise KeyboardInterrupt


def _forward_to_tune(signum: int, frame: Any) -> None:
    tune_handler = signal.getsignal(signal.SIGUSR1)
    if callable(tune_handler):
        tune_handler(signum, frame)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[list[str]]:
    """While ``tuner.fit()`` runs, SIGINT and SIGTERM (Ctrl-C, ``kill``, ``ray job stop``)
    stop the search gracefully the way Tune's own stop signal, SIGUSR1, does; a second one
    stops it at once (:func:`~pipelines.tune.runs.stop_on_signals`). Yields the list the
    signal's name is put in.

    Tune's own SIGINT handler would stop the run just as well, but leave no trace that it
    did (``fit()`` returns as if the search had ended), so it is switched off with Tune's
    documented ``TUNE_DISABLE_SIGINT_HANDLER`` and the first signal is forwarded to the
    SIGUSR1 handler, which Tune installs in ``fit()`` either way."""
    if threading.current_thread() is not threading.main_thread():
        yield []  # signal handlers can only be set in the main thread
        return
    old_usr1 = signal.signal(signal.SIGUSR1, _tune_stop_signal)
    old_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        with stop_on_signals("search", "its state is saved", _forward_to_tune) as got:
            yield got
    finally:
        signal.signal(signal.SIGUSR1, old_usr1)
        if old_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = old_env


def _close_open_runs(tracker: SearchTracker, outcomes: list[dict[str, Any]]) -> None:
    """A trial that ended while its driver was dead had no callback: end its run now, with
    its adapter, so no run of a finished search stays RUNNING."""
    for o in outcomes:
        run = tracker.client.get_run(o["mlflow_run_id"])
        if run.info.status != "RUNNING":
            continue
        finish_trial(tracker, run.info.run_id, "FAILED" if o["status"] == "error" else "FINISHED",
                     Path(o["adapter_dir"]) if o["adapter_dir"] else None,
                     {"peftpipe.stopped_early": o["status"] == "stopped early"})


def _outcomes(result, reports: int, mlflow_cb: MlflowTrialCallback,
              max_steps: int | None = None) -> list[dict[str, Any]]:
    """A trial's outcome; a pack's, one per member (each a trial of the search)."""
    specs = ((result.config or {}).get("trial") or {}).get("pack")
    if specs is None:
        return [_outcome(result, reports, mlflow_cb, max_steps)]
    metrics = dict(result.metrics or {})
    pack_id = metrics.get("trial_id") or Path(result.path).name
    records = metrics.get("members") or {}
    shared = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    df = result.metrics_dataframe
    ckpt = metrics.get(CHECKPOINT_PATH_KEY)
    out = []
    for name, spec in zip(packing.member_names(pack_id, len(specs)), specs):
        rec = records.get(name) or {}
        history: dict[str, list[tuple[int, float]]] = {}
        step_col = f"members/{name}/step"
        if df is not None and step_col in df:
            for col in ("eval_loss", "train_loss", "eval_accuracy"):
                c = f"members/{name}/{col}"
                if c in df:
                    seen: dict[int, float] = {}
                    for st, v in zip(df[step_col], df[c]):
                        if st == st and v == v:
                            seen[int(st)] = float(v)  # an ended member repeats its record
                    history[col] = sorted(seen.items())
        if result.error is not None and rec.get("status") != COMPLETED:
            status = "error"
        elif rec.get("status") == STOPPED or (
                rec and stopped_early(rec, reports, max_steps)):
            status = "stopped early"
        elif rec:
            status = "completed"
        else:
            status = "error"
        mine = {k: v for k, v in rec.items() if not isinstance(v, (dict, list))}
        out.append({
            "trial_id": name, "method": spec["method"], "lr": spec["lr"],
            "metrics": {**shared, **mine, "trial_id": name, "pack": pack_id},
            "history": history, "status": status, "time_s": metrics.get("time_total_s"),
            "adapter_dir": str(member_adapter(ckpt, name)) if ckpt else None,
            "mlflow_run_id": mlflow_cb.runs.get(name) or mlflow_cb.tracker.trial_run(name, {}),
            "error": str(result.error) if result.error else None,
        })
    return out


def _outcome(result, reports: int, mlflow_cb: MlflowTrialCallback,
             max_steps: int | None = None) -> dict[str, Any]:
    metrics = dict(result.metrics or {})
    t = (result.config or {}).get("trial", {})
    trial_id = metrics.get("trial_id") or Path(result.path).name
    df = result.metrics_dataframe
    return trial_outcome(
        trial_id, t.get("method", {}), t.get("lr"), metrics,
        history=history_of(df.to_dict("records")) if df is not None and "step" in df else {},
        status=trial_status(result.error is not None, metrics, reports, max_steps),
        checkpoint=metrics.get(CHECKPOINT_PATH_KEY),
        run_id=mlflow_cb.runs.get(trial_id) or mlflow_cb.tracker.trial_run(trial_id, {}),
        error=str(result.error) if result.error else None)
