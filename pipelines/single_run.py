"""One tracked training run: ``peftpipe train``, and ``peftpipe run`` without a ``tune``
section.

A run is one Ray Train ``TorchTrainer`` (:func:`pipelines.train.build_trainer`) fitted by
this process: no Ray Tune and no trial driver, so it needs exactly its workers' resources.
It is recorded as a search's trial is (:mod:`pipelines.tune.trial_log`), so promote, report
and the registry read it alike: an MLflow parent run for the job with one child run for the
training (params, every report's metrics, the ``adapter`` artifact, its status), and a
:class:`~pipelines.tune.SearchResult` with the one trial, which the pipeline saves as
``run_dir/trials.json``.

The workers' reports reach this process through :class:`ReportForwarder`, a Ray Train
run-level callback (``ray.train.UserCallback``: Ray calls it on the run's controller, which
it places on this node, after each report), which puts rank 0's metrics on a Ray queue. The
trainer fits in a background thread, so the main thread logs each report to MLflow, prints
its status line and keeps the signal handlers: SIGINT or SIGTERM ends the run's MLflow runs
KILLED and raises :class:`~pipelines.tune.result.SearchInterrupted` (its workers stop with
this process's Ray session). The same command again resumes from the run's latest
checkpoint: Ray Train finds it in the run's folder, ``run_dir/trials/<trial id>``.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from .data.manifest import Manifest
from .tracking import TrackingConfig, content_hash
from .train import TrainConfig, TrainResult, build_trainer, check_inputs, scheduling
from .tune.config import TuneConfig
from .tune.objective import Objective
from .tune.resources import plan
from .tune.result import SearchInterrupted, SearchResult
from .tune.runs import conclude, end_open_runs, ended_with_driver, open_search, stop_on_signals
from .tune.trial_folder import set_aside_torn_snapshot, write_pid
from .tune.trial_log import (
    ADAPTER,
    CHECKPOINT_PATH_KEY,
    StatusLines,
    TrialRuns,
    expected_reports,
    history_of,
    stopped_early,
    trial_outcome,
    trial_params,
    trial_status,
)

#: a run whose training failed runs again from its last checkpoint this often (as many
#: times as a search's trial, ``tune.max_trial_failures``' default)
RETRIES = TuneConfig.model_fields["max_trial_failures"].default
POLL_S = 1.0  # how long the main thread waits for a report before it looks around


class ReportForwarder(UserCallback):
    """On the run's controller, after each report: rank 0's metrics, with the report's
    checkpoint folder under ``checkpoint_path`` (as Ray's Tune callback names it), onto
    ``queue`` for this process."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: Any) -> None:
        record = dict(metrics[0])
        if checkpoint is not None:
            record[CHECKPOINT_PATH_KEY] = checkpoint.path
        self.queue.put(record)


def run_one(train: TrainConfig, *, manifest: Manifest | str | Path, run_dir: str | Path,
            objective: Objective, tracking: TrackingConfig | None = None,
            recipe: dict[str, Any] | None = None, verbose: bool = True) -> SearchResult:
    """Train ``train.method`` once (or resume it) on ``train.num_workers`` workers of
    ``train.cpus_per_worker`` CPUs, tracked in MLflow; its outcome as a one-trial
    :class:`SearchResult` ranked by ``objective``. Needs a running Ray (``ray.init``).
    Raises :class:`SearchInterrupted` when SIGINT or SIGTERM stopped it."""
    info = check_inputs(train, manifest)
    run_dir = Path(run_dir).resolve()
    plan(None, train=train)  # each worker's CPUs fit on one node, before anything starts
    train = train.model_copy(update={"storage_path": str(run_dir / "trials")})
    digest = content_hash({"train": train.model_dump(mode="json"), "dataset": info.dataset_id})
    # named as a search's trial is (``<5 hex>_<index>``), and stable: running the same
    # recipe again finds the run's folder, checkpoints and MLflow runs
    search_id, trial_id = f"search-{digest}", f"{digest[:5]}_00000"
    mlc, exp, tracker = open_search(
        tracking or TrackingConfig(), run_dir, search_id, train=train,
        dataset_id=info.dataset_id, recipe=recipe, params={
            # a single run's parent logs what a one-trial search's did, so views and
            # queries over the experiment see one shape of record
            "searcher": "grid", "scheduler": "fifo", "num_trials": 1,
            "objective": objective.model_dump(), "pack": 1})
    runs = TrialRuns(tracker, expected_reports(train), trial_params(train, info.dataset_id))
    status = StatusLines(objective.metric, total_steps=train.max_steps) if verbose else None
    folder = run_dir / "trials" / trial_id
    with ended_with_driver(mlc, exp, search_id):
        with stop_on_signals("run", "its checkpoints are saved", _ignore) as stopped_by:
            outcome = _Run(train, info, folder, trial_id, runs, status).train(stopped_by)
        if stopped_by:
            end_open_runs(mlc, exp, search_id, "KILLED", f"stopped by {stopped_by[0]}")
            raise SearchInterrupted(
                f"run {search_id} stopped by {stopped_by[0]}; its checkpoints are saved: run "
                "the same command again to resume it", signal_name=stopped_by[0])
        return conclude(tracker, [outcome], objective, path=str(folder), tolerate_failed=False)


def _ignore(signum: int, frame: Any) -> None:
    """A run's stop needs no handler of its own: the main thread sees the signal's name."""


def _method(train: TrainConfig) -> dict[str, Any]:
    """The run's method config as a search's trial holds it: its name, then its fields
    in order."""
    method = dict(train.method)
    name = method.pop("name")
    return {"name": name, **{k: method[k] for k in sorted(method)}}


class _Run:
    """The driver side of one run: its trainer fitted in a thread, each attempt again from
    the last checkpoint; its reports recorded here as they arrive."""

    def __init__(self, train: TrainConfig, info: Manifest, folder: Path, trial_id: str,
                 runs: TrialRuns, status: StatusLines | None) -> None:
        self.train_config, self.info, self.folder = train, info, folder
        self.trial_id, self.runs, self.status = trial_id, runs, status
        self.method = _method(train)
        self.reports: list[dict[str, Any]] = []
        self.started = time.time()
        self.run_id = ""

    def _say(self, text: str) -> None:
        if self.status is not None:
            self.status.say(self.trial_id, self.method["name"], text)

    def train(self, stopped_by: list[str]) -> dict[str, Any]:
        """Fit until the run ends, fails for good or a signal stops it; its outcome."""
        self.run_id = self.runs.open(self.trial_id, self.method, self.train_config.lr)
        write_pid(self.folder / "workers" / "driver.pid")  # beside its workers' rank{R}.pid
        self._say("started")
        result = error = None
        for attempt in range(RETRIES + 1):
            result, error = self._attempt(stopped_by)
            if stopped_by or error is None:
                break
            if attempt < RETRIES:
                self.runs.recovered(self.run_id, attempt + 1)
                self._say(f"failed (failure {attempt + 1}); running again from its last "
                          "checkpoint")
        if not stopped_by:
            self._record_end(error)
        return self._outcome(result, error)

    def _attempt(self, stopped_by: list[str]) -> tuple[Any, BaseException | None]:
        """One fit of the run's trainer (resuming from its folder's latest checkpoint):
        Ray's result, or the error it failed with."""
        from ray.util.queue import Queue

        queue = Queue(actor_options={"num_cpus": 0})  # the run's CPUs are its workers'

        def trainer() -> Any:
            return build_trainer(
                self.train_config, self.info, self.folder, report_to_tune=False,
                callbacks=[ReportForwarder(queue)], started_at=self.started,
                resume_from=set_aside_torn_snapshot(self.folder))

        box: dict[str, Any] = {}
        thread = threading.Thread(target=_fit, args=(trainer, self.train_config, box),
                                  name="peftpipe-fit", daemon=True)
        thread.start()
        _follow(thread, queue, self._on_report, stopped_by, self.status)
        if not thread.is_alive():  # a stopped run's controller may still report into it
            queue.shutdown()
        return box.get("result"), box.get("error")

    def _on_report(self, record: dict[str, Any]) -> None:
        result = {**record, "trial_id": self.trial_id,
                  "training_iteration": len(self.reports) + 1,
                  "time_total_s": time.time() - self.started}
        self.reports.append(result)
        self.runs.log(self.run_id, result)
        if self.status is not None:
            self._say(f"{self.status.step(result)}  {self.status.line(result)}")

    def _last(self) -> dict[str, Any]:
        return self.reports[-1] if self.reports else {}

    def _record_end(self, error: BaseException | None) -> None:
        """The run's MLflow run ends, with the adapter; a failure leaves ``error.txt``."""
        if error is None:
            ckpt = self._last().get(CHECKPOINT_PATH_KEY)
            self.runs.complete(self.run_id, Path(ckpt) / ADAPTER if ckpt else None,
                               stopped=stopped_early(self._last(), self.runs.expected_reports,
                                                     self.train_config.max_steps),
                               checkpoint=ckpt)
            self._say("done")
            return
        error_file = self.folder / "error.txt"
        error_file.parent.mkdir(parents=True, exist_ok=True)
        error_file.write_text("".join(traceback.format_exception(error)))
        self.runs.failed(self.run_id, error_file)
        self._say("FAILED (see the trial's error.txt)")

    def _outcome(self, result: Any, error: BaseException | None) -> dict[str, Any]:
        """The run as a search's trial outcome (trials.json); its history is the whole
        run's, steps trained before a resume included, once it has ended."""
        last = self._last()
        done = TrainResult.from_ray(result) if result is not None else None
        return trial_outcome(
            self.trial_id, self.method, self.train_config.lr, last,
            history=history_of(done.history if done and done.history else self.reports),
            status=trial_status(error is not None, last, self.runs.expected_reports,
                                self.train_config.max_steps),
            checkpoint=last.get(CHECKPOINT_PATH_KEY) or (done.checkpoint_dir if done else None),
            run_id=self.run_id,
            error=f"{type(error).__name__}: {error}" if error is not None else None)


def _fit(trainer: Callable[[], Any], train: TrainConfig, box: dict[str, Any]) -> None:
    """The fit thread's body: Ray's result or the run's failure (building its trainer
    included, as a search's trial driver fails), for the main thread."""
    try:
        box["result"] = scheduling.fit(trainer(), train)
    except BaseException as e:  # any failure is the run's, reported by the main thread
        box["error"] = e


def _follow(thread: threading.Thread, queue: Any, on_report: Callable[[dict[str, Any]], None],
            stopped_by: list[str], status: StatusLines | None) -> None:
    """Each report to ``on_report`` as it arrives while the fit thread runs (between them
    the waiting line, when the workers wait for resources), until a signal stops the run;
    then the reports put before the fit returned."""
    from ray.util.queue import Empty

    while thread.is_alive() and not stopped_by:
        try:
            on_report(queue.get(timeout=POLL_S))
        except Empty:
            if status is not None:
                status.waiting_notice(pending=0, running=1)
    while not stopped_by and not queue.empty():
        on_report(queue.get_nowait())
