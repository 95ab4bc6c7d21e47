"""What the driver records of a trial while it trains: its MLflow child run and its console
status lines.

A search's Tune callbacks (:mod:`pipelines.tune.callbacks`: one record per Tune trial, or per
member of a pack) and a single training run (:mod:`pipelines.single_run`) both record
through these classes, so a run reads the same in MLflow and on the console whichever way
it was started. No Ray Tune here: a single run does not import it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..tracking import SearchTracker
from ..train.scheduling import pending_demand

if TYPE_CHECKING:
    from ..train import TrainConfig

ADAPTER = "adapter"  # the child run's artifact folder with the trial's adapter
#: a report's checkpoint folder (the key Ray's TuneReportCallback gives it)
CHECKPOINT_PATH_KEY = "checkpoint_path"
#: the curves a trial's outcome keeps (``history`` in trials.json)
CURVES = ("eval_loss", "train_loss", "eval_accuracy")


def expected_reports(train: TrainConfig) -> int:
    """How many reports a trial that trains to its last step makes (every ``eval_every``
    steps and at the end)."""
    return math.ceil(train.max_steps / train.eval_every)


def trial_params(train: TrainConfig, dataset_id: str) -> dict[str, Any]:
    """What every trial's run logs besides its method and learning rate."""
    return {"dataset_id": dataset_id, "max_steps": train.max_steps,
            "batch_size": train.batch_size, "zero_stage": train.zero.stage}


def stopped_early(last: Mapping[str, Any], expected_reports: int,
                  max_steps: int | None = None) -> bool:
    """Whether a trial ended before its last step (ASHA stopped it). By the training step
    where the report has one: a trial Tune ran again after a failure resumes at its
    checkpoint's step but counts its reports (``training_iteration``) from 1 again."""
    if max_steps is not None and "step" in last:
        return int(last["step"]) < max_steps
    return int(last.get("training_iteration", 0)) < expected_reports


def trial_status(failed: bool, last: Mapping[str, Any], expected_reports: int,
                 max_steps: int | None = None) -> str:
    """A trial's status in trials.json: ``error``, ``stopped early`` or ``completed``."""
    if failed:
        return "error"
    return "stopped early" if stopped_early(last, expected_reports, max_steps) else "completed"


def history_of(reports: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Each curve of ``CURVES`` over the reports as ``(step, value)`` pairs; a report without
    the value (NaN: a table's empty cell; the step-0 report has no training loss) is left out."""
    rows = [r for r in reports if r.get("step") is not None and r["step"] == r["step"]]
    out: dict[str, list[tuple[int, float]]] = {}
    for col in CURVES:
        if any(col in r for r in rows):
            out[col] = [(int(r["step"]), float(r[col])) for r in rows
                        if r.get(col) is not None and r[col] == r[col]]
    return out


def trial_outcome(trial_id: str, method: dict[str, Any], lr: Any, last: Mapping[str, Any], *,
                  history: dict[str, list[tuple[int, float]]], status: str,
                  checkpoint: str | None, run_id: str, error: str | None) -> dict[str, Any]:
    """A trial's entry in trials.json (:class:`~pipelines.tune.result.SearchResult`): its
    method and lr, its last report's values, curves, status, time, adapter and MLflow run."""
    return {
        "trial_id": trial_id, "method": method, "lr": lr,
        "metrics": {k: v for k, v in last.items() if not isinstance(v, (dict, list))},
        "history": history, "status": status, "time_s": last.get("time_total_s"),
        "adapter_dir": str(Path(checkpoint) / ADAPTER) if checkpoint else None,
        "mlflow_run_id": run_id, "error": error,
    }


def finish_trial(tracker: SearchTracker, run_id: str, status: str, adapter: Path | None,
                 tags: Mapping[str, Any]) -> None:
    """End a trial's run as ``status`` with ``tags``; its adapter is logged once (a trial
    resumed after it finished already has it)."""
    if adapter is not None and any(f.path == ADAPTER
                                   for f in tracker.client.list_artifacts(run_id)):
        adapter = None
    tracker.finish(run_id, status, artifacts={ADAPTER: adapter} if adapter else None, tags=tags)


class TrialRuns:
    """Each trial as a nested MLflow run, logged from the driver (workers need no MLflow
    access). Params once at start, the fixed metrics at every report (a step already logged
    is skipped, so a resumed trial logs nothing twice), the final adapter folder as
    artifact, and a terminal status: FINISHED (with ``peftpipe.stopped_early``) or FAILED.
    """

    def __init__(self, tracker: SearchTracker, expected_reports: int,
                 extra_params: dict[str, Any]) -> None:
        self.tracker = tracker
        self.expected_reports = expected_reports
        self.extra_params = extra_params
        self.runs: dict[str, str] = {}  # trial (or pack member) id -> run id

    def open(self, trial_id: str, method: dict[str, Any], lr: float, **params: Any) -> str:
        """The trial's run, created (or found again by its tags) with its params."""
        if trial_id not in self.runs:
            self.runs[trial_id] = self.tracker.trial_run(
                trial_id, {"method": method, "lr": lr, **params, **self.extra_params},
                name=f"{method['name']}-{trial_id}")
        return self.runs[trial_id]

    def log(self, run_id: str, result: Mapping[str, Any]) -> None:
        """One report's metrics, at its training step."""
        step = int(result.get("step", result.get("training_iteration", 0)))
        self.tracker.log_metrics(run_id, result, step)

    def complete(self, run_id: str, adapter: Path | None, *, stopped: bool,
                 checkpoint: str | None) -> None:
        finish_trial(self.tracker, run_id, "FINISHED", adapter,
                     {"peftpipe.stopped_early": stopped, "peftpipe.checkpoint": checkpoint or ""})

    def recovered(self, run_id: str, failures: Any) -> None:
        """The trial failed and runs again (from its last checkpoint): its run goes on."""
        self.tracker.client.set_tag(run_id, "peftpipe.trial_failures", str(failures))

    def failed(self, run_id: str, error_file: Any) -> None:
        self.tracker.finish(run_id, "FAILED", tags={"peftpipe.error": str(error_file)})


class StatusLines:
    """One console line per trial event (method, step, metric) instead of Ray's wall of
    logs; and, after ``waiting_notice_s`` without a line while something waits for
    resources (a trial pending, or Ray's placement groups pending: a trial's workers not
    yet placed), a line saying so with Ray's pending demand, repeated at most that often."""

    def __init__(self, metric: str, stream: Any = None, total_steps: int | None = None,
                 waiting_notice_s: float = 60.0) -> None:
        self.metric = metric
        self.stream = stream  # None: this process's sys.stdout (also after unpickling)
        self.total = f"/{total_steps}" if total_steps else ""  # step 50/100: how far along
        self.waiting_notice_s = waiting_notice_s
        self._restart_clock()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a restored search's clock starts with its new driver
        self.__dict__.update(state)
        self._restart_clock()

    def _restart_clock(self) -> None:
        self.t0 = self.last_line = self.last_look = self.last_event = time.time()

    def _print(self, text: str) -> None:
        self.last_line = time.time()
        print(f"[{self.last_line - self.t0:6.0f}s] {text}", file=self.stream or sys.stdout,
              flush=True)

    def say(self, trial_id: str, label: str, text: str) -> None:
        """A trial's event: ``[   12s] 3f2a1_00000 lora             started``."""
        self.last_event = time.time()
        self._print(f"{trial_id} {label:<16} {text}")

    def line(self, result: Mapping[str, Any]) -> str:
        """A report's metrics: the objective's, and the training loss when there is one."""
        v = result.get(self.metric)
        val = f"{v:.4f}" if isinstance(v, float) else v
        loss = result.get("train_loss")
        # a step-0 report (evaluation before training) has no training loss yet
        train = f"  train_loss={loss:.4f}" if isinstance(loss, float) and loss == loss else ""
        return f"{self.metric}={val}{train}"

    def step(self, result: Mapping[str, Any]) -> str:
        """``step   50/100``: a report's step and how far along it is."""
        return f"step {result.get('step', '?'):>4}{self.total}"

    def waiting_notice(self, pending: int, running: int) -> None:
        """Called often (Tune's loop, a run's wait for its next report): prints the
        waiting line when it is due and something waits for resources."""
        now = time.time()
        if min(now - self.last_line, now - self.last_look) < self.waiting_notice_s:
            return
        self.last_look = now
        if not (pending or running):
            return
        # the State API (milliseconds; seconds at worst) once per notice, not per loop step
        demand = pending_demand()
        waits = demand.startswith("Ray's pending demand:") or (
            pending and demand.startswith("Ray's pending demand unavailable"))
        if not waits:
            return  # quiet, but nothing waits for resources: a long step, a trial starting
        self._print(f"waiting for resources, {now - self.last_event:.0f}s since a trial's "
                    "last event: "
                    f"{running} trial(s) running, {pending} pending; {demand}")
