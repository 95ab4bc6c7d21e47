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
import json
import logging
import math
import os
import random
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..data.manifest import Manifest
from ..tracking import SearchTracker, TrackingConfig, client, content_hash, experiment_id, git_sha
from ..train import TrainConfig, build_trainer, check_inputs, scheduling
from ..train.checkpoint import STATE_FILE
from ..train.packed import COMPLETED, STOPPED, member_adapter
from . import packing
from .callbacks import (
    ADAPTER,
    CHECKPOINT_PATH_KEY,
    MlflowTrialCallback,
    StatusCallback,
    stopped_early,
)
from .config import TuneConfig
from .objective import pareto_front
from .resources import TRIAL_DRIVER_CPU, cpus_per_worker, driver_resources
from .result import SearchInterrupted, SearchResult
from .runs import TAG_DRIVER, driver_identity, end_open_runs, reconcile

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
    _write_pid(folder / "workers" / "driver.pid")  # beside its workers' rank{R}.pid
    trainer = build_trainer(
        cfg, dataset, folder, report_to_tune=True, started_at=started_at,
        resume_from=_set_aside_torn_snapshot(folder), members=members,
        stopper=packing.MemberStopper(**stopper) if members and stopper else None)
    # a trial whose workers stay unplaced fails naming Ray's pending demand, as a run does
    scheduling.fit(trainer, cfg)


#: where Ray Train keeps a run's checkpoint list (its file; read here only to see it is whole)
_RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def _set_aside_torn_snapshot(folder: Path) -> Path | None:
    """A trial driver lost with its node while Ray Train rewrote the run's checkpoint list
    (written in place) leaves it empty or cut; Ray would refuse to start that run again on
    every retry. So the torn list is renamed away and the retry resumes from the newest
    complete checkpoint folder (its state file and every rank's RNG file present).
    Returns that folder; None when the list is whole or absent (Ray resumes by itself)."""
    snap = folder / _RAY_SNAPSHOT
    try:
        json.loads(snap.read_text())
        return None
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        pass
    snap.rename(snap.with_name(snap.name + ".torn"))
    best: tuple[int, Path] | None = None
    for state_file in folder.glob(f"checkpoint_*/{STATE_FILE}"):
        try:
            state = json.loads(state_file.read_text())
            step, world = int(state["step"]), int(state["world_size"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        ckpt = state_file.parent
        if all((ckpt / f"rng_rank{r}.pt").is_file() for r in range(world)) and (
                best is None or step > best[0]):
            best = (step, ckpt)
    log.warning("trial folder %s: torn %s set aside; resuming from %s", folder, _RAY_SNAPSHOT,
                best[1] if best else "the start")
    return best[1] if best else None


def _write_pid(path: Path) -> None:
    """This process's pid, atomically: an operator (or a test) finds the trial's driver."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, path)


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
    run fits in exactly ``workers x cpus_per_worker`` (Tune accepts an empty head bundle).
    Raises :class:`SearchInterrupted` when SIGINT or SIGTERM stopped it."""
    info = check_inputs(train, manifest)
    packing.check(train, config)
    run_dir = Path(run_dir).resolve()
    trials = _trial_configs(config)
    reports = _expected_reports(train)
    train = train.model_copy(update={
        "num_workers": config.workers_per_trial,
        # per node under the recipe's placement strategy (STRICT_SPREAD needs a node each)
        "cpus_per_worker": cpus_per_worker(config, trial_driver_cpu, train=train),
        "storage_path": str(run_dir / "trials"),
    })
    TrainConfig.model_validate(train.model_dump())  # batch divisibility with the new worker count
    search_id = config.name or "search-" + content_hash(
        {"train": train.model_dump(mode="json"), "tune": config.model_dump(mode="json"),
         "dataset": info.dataset_id})

    tracking = tracking or TrackingConfig()
    mlc = client(tracking, run_dir)
    exp = experiment_id(mlc, tracking, run_dir)
    # runs a dead driver of this search left RUNNING end as KILLED before it goes on
    reconcile(mlc, exp, search_id, opening=True)
    tracker = SearchTracker(mlc, exp, search_id, tags={
        "dataset_id": info.dataset_id, "base_model": train.model.name,
        "recipe_hash": content_hash(recipe or {}), "git_sha": git_sha(),
    })
    tracker.log_params(tracker.parent_id, {
        "searcher": config.searcher, "scheduler": config.scheduler,
        "num_trials": len(trials) if trials is not None else config.num_samples,
        "objective": config.objective.model_dump(), "max_steps": train.max_steps,
        "batch_size": train.batch_size, "zero_stage": train.zero.stage, "pack": config.pack,
    })
    mlc.set_tag(tracker.parent_id, TAG_DRIVER, driver_identity())
    if recipe:
        mlc.log_dict(tracker.parent_id, recipe, "recipe.json")
    try:
        return _search(train, config, info, run_dir, trials, reports, search_id, mlc, exp,
                       tracker, verbose, trial_driver_cpu)
    except SearchInterrupted:
        raise
    except BaseException as e:
        # the driver is going down (a second Ctrl-C, a crash): no run of it stays RUNNING
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        try:
            end_open_runs(mlc, exp, search_id, status, f"driver: {type(e).__name__}")
        except Exception:  # the tracking store is gone too: the next open reconciles
            log.warning("search %s: could not end its MLflow runs", search_id, exc_info=True)
        raise


def _search(train: TrainConfig, config: TuneConfig, info, run_dir: Path,
            trials: list[dict[str, Any]] | None, reports: int, search_id: str, mlc, exp: str,
            tracker: SearchTracker, verbose: bool, trial_driver_cpu: float) -> SearchResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    obj = config.objective
    packed = config.pack > 1
    stopper = rungs = None
    if packed and config.scheduler == "asha":
        # members are stopped inside their packs, by the search's own rungs (see packing)
        name, rungs = packing.start_rungs(
            search_id, mode=obj.mode, grace_period=min(config.grace_period, reports),
            reduction_factor=config.reduction_factor, max_t=reports + 1)
        stopper = {"metric": obj.metric, "actor_name": name}
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, base=train.model_dump(mode="json"),
                             dataset=str(info.path), trials_dir=str(run_dir / "trials"),
                             stopper=stopper),
        driver_resources(trial_driver_cpu),
    )
    if packed:
        # a pack is one Tune trial; Tune must not stop it for one member's metric
        scheduler = FIFOScheduler()
    elif config.scheduler == "asha":
        # max_t one past the last report, so a trial is never stopped *at* its last report
        # (which would lose its final artifacts).
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=reports + 1,
                                  grace_period=min(config.grace_period, reports),
                                  reduction_factor=config.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    search_alg, param_space, num_samples = None, None, 1
    if trials is not None and packed:
        param_space = {"trial": tune.grid_search(
            [{"pack": p} for p in packing.packs(trials, config.pack)])}
    elif trials is not None:
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
        callbacks.append(StatusCallback(obj.metric, total_steps=train.max_steps,
                                        waiting_notice_s=config.waiting_notice_s))
    # A trial whose driver or training failed (its node lost, say) runs again; it resumes
    # from the checkpoint in its own folder (see _run_trial).
    run_config = tune.RunConfig(
        name=search_id, storage_path=str(run_dir / "search"), callbacks=callbacks, verbose=0,
        failure_config=tune.FailureConfig(max_failures=config.max_trial_failures))
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
                # a pack reports its members' metrics, not one of its own
                metric=None if packed else obj.metric, mode=None if packed else obj.mode,
                scheduler=scheduler, search_alg=search_alg,
                num_samples=num_samples, max_concurrent_trials=config.max_concurrent_trials,
                reuse_actors=False,
            ),
            run_config=run_config,
        )
    with _stop_on_signals() as stopped_by:
        grid = tuner.fit()
    del rungs  # the members' rungs live as long as the search runs
    if stopped_by:
        end_open_runs(mlc, exp, search_id, "KILLED", f"stopped by {stopped_by[0]}")
        raise SearchInterrupted(
            f"search {search_id} stopped by {stopped_by[0]}; its state is saved: run the same "
            "command again to resume it", signal_name=stopped_by[0])

    outcomes = [o for r in grid for o in _outcomes(r, reports, callbacks[0], train.max_steps)]
    outcomes.sort(key=lambda o: o["trial_id"])
    _close_open_runs(mlc, tracker, outcomes)
    best = obj.best([{**o["metrics"], "_trial": o["trial_id"]} for o in outcomes])
    best_trial = next((o for o in outcomes if best and o["trial_id"] == best["_trial"]), None)
    front_ids = {p["_trial"] for p in pareto_front(
        [{**o["metrics"], "_trial": o["trial_id"]} for o in outcomes], obj.metric, obj.mode)}
    failed = [o["trial_id"] for o in outcomes if o["status"] == "error"]
    status = "FAILED" if failed and not config.tolerate_failed_trials else "FINISHED"
    tracker.end_search(status, {
        "best_trial": best_trial["trial_id"] if best_trial else "none",
        "best_run_id": best_trial["mlflow_run_id"] if best_trial else "",
        "best_" + obj.metric: best_trial["metrics"].get(obj.metric) if best_trial else "",
    })
    return SearchResult(search_id=search_id, path=str(exp_path), trials=outcomes,
                        best=best_trial, pareto=[o for o in outcomes if o["trial_id"] in front_ids],
                        parent_run_id=tracker.parent_id, tracking_uri=mlc.tracking_uri,
                        objective=obj)


def _tune_stop_signal(signum: int, frame: Any) -> None:
    """SIGUSR1's handler outside ``tuner.fit()`` (Tune installs its own inside): a stop
    request there stops at once."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[list[str]]:
    """While ``tuner.fit()`` runs, SIGINT and SIGTERM (Ctrl-C, ``kill``, ``ray job stop``)
    stop the search gracefully the way Tune's own stop signal, SIGUSR1, does; a second one
    stops it at once (KeyboardInterrupt). Yields the list the signal's name is put in.

    Tune's own SIGINT handler would stop the run just as well, but leave no trace that it
    did (``fit()`` returns as if the search had ended), so it is switched off with Tune's
    documented ``TUNE_DISABLE_SIGINT_HANDLER`` and this handler forwards to the SIGUSR1
    one, which Tune installs in ``fit()`` either way."""
    got: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield got  # signal handlers can only be set in the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        if got:
            raise KeyboardInterrupt
        got.append(signal.Signals(signum).name)
        print(f"\n{got[0]}: stopping the search (its state is saved; again to stop at once)",
              file=sys.stderr, flush=True)
        tune_handler = signal.getsignal(signal.SIGUSR1)
        if callable(tune_handler):
            tune_handler(signum, frame)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    old_usr1 = signal.signal(signal.SIGUSR1, _tune_stop_signal)
    old_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        signal.signal(signal.SIGUSR1, old_usr1)
        if old_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = old_env


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
    history: dict[str, list[tuple[int, float]]] = {}
    df = result.metrics_dataframe
    if df is not None and "step" in df:
        for col in ("eval_loss", "train_loss", "eval_accuracy"):
            if col in df:
                history[col] = [(int(s), float(v)) for s, v in zip(df["step"], df[col]) if v == v]
    if result.error is not None:
        status = "error"
    elif stopped_early(metrics, reports, max_steps):
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
