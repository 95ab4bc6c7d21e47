"""Driver-side Ray Tune callbacks: MLflow child runs per trial and a concise live status.

Tune pickles the callbacks with the experiment when the search starts and a restored search
(``Tuner.restore``, a new driver) runs with those copies: ``Tuner.restore`` takes no new
callbacks. So each callback keeps only its configuration across pickling and rebuilds its
per-process state when unpickled (``__setstate__``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from ..tracking import SearchTracker
from ..train.packed import STOPPED, member_adapter
from ..train.scheduling import pending_demand
from .packing import member_names

ADAPTER = "adapter"
CHECKPOINT_PATH_KEY = "checkpoint_path"  # set by Ray's TuneReportCallback


def stopped_early(last: dict[str, Any], expected_reports: int,
                   max_steps: int | None = None) -> bool:
    """Whether a trial ended before its last step (ASHA stopped it). By the training step
    where the report has one: a trial Tune ran again after a failure resumes at its
    checkpoint's step but counts its reports (``training_iteration``) from 1 again."""
    if max_steps is not None and "step" in last:
        return int(last["step"]) < max_steps
    return int(last.get("training_iteration", 0)) < expected_reports


class MlflowTrialCallback(Callback):
    """Logs each trial as a nested MLflow run from the driver (workers need no MLflow access).

    Params once at start, the fixed metrics at every report (a step already logged is
    skipped, so a resumed search logs nothing twice), the final adapter folder as artifact,
    and a terminal status: FINISHED (with ``peftpipe.stopped_early``) or FAILED.
    """

    def __init__(self, tracker: SearchTracker, expected_reports: int, extra_params: dict[str, Any]):
        self.tracker = tracker
        self.expected_reports = expected_reports
        self.extra_params = extra_params
        self.runs: dict[str, str] = {}  # trial (or pack member) id -> run id
        self.ended: set[str] = set()  # runs of pack members already finished

    def __getstate__(self) -> dict[str, Any]:
        # trial -> run ids of this driver: a restored driver finds them again by tags
        return {**self.__dict__, "runs": {}, "ended": set()}

    def _run(self, trial) -> str:
        if trial.trial_id not in self.runs:
            t = trial.config["trial"]
            self.runs[trial.trial_id] = self.tracker.trial_run(
                trial.trial_id,
                {"method": t["method"], "lr": t["lr"], **self.extra_params},
                name=f"{t['method']['name']}-{trial.trial_id}",
            )
        return self.runs[trial.trial_id]

    def _member_runs(self, trial) -> dict[str, str]:
        """A pack trial's members' runs by member id (each its own run, as a solo trial's),
        tagged with the pack."""
        specs = trial.config["trial"]["pack"]
        out = {}
        for name, spec in zip(member_names(trial.trial_id, len(specs)), specs):
            if name not in self.runs:
                self.runs[name] = self.tracker.trial_run(
                    name, {"method": spec["method"], "lr": spec["lr"], "pack": trial.trial_id,
                           "pack_size": len(specs), **self.extra_params},
                    name=f"{spec['method']['name']}-{name}")
            out[name] = self.runs[name]
        return out

    def _finish_member(self, run_id: str, record: dict[str, Any], ckpt: str | None,
                       name: str) -> None:
        adapter = member_adapter(ckpt, name) if ckpt else None
        self.tracker.finish(run_id, "FINISHED",
                            artifacts={ADAPTER: adapter} if adapter else None,
                            tags={"peftpipe.stopped_early": record.get("status") == STOPPED,
                                  "peftpipe.checkpoint": ckpt or ""})
        self.ended.add(run_id)

    def on_trial_start(self, iteration, trials, trial, **info):
        if _is_pack(trial):
            self._member_runs(trial)
        else:
            self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get("step", result.get("training_iteration", 0)))
        if not _is_pack(trial):
            self.tracker.log_metrics(self._run(trial), result, step)
            return
        shared = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
        for name, run_id in self._member_runs(trial).items():
            rec = (result.get("members") or {}).get(name)
            if rec is None or rec.get("step") != step or run_id in self.ended:
                continue  # a member that left the pack earlier repeats its last record
            self.tracker.log_metrics(run_id, {**shared, **rec}, step)
            if rec.get("status") == STOPPED:
                self._finish_member(run_id, rec, result.get(CHECKPOINT_PATH_KEY), name)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        ckpt = last.get(CHECKPOINT_PATH_KEY)
        if _is_pack(trial):
            records = last.get("members") or {}
            for name, run_id in self._member_runs(trial).items():
                if run_id not in self.ended:
                    self._finish_member(run_id, records.get(name, {}), ckpt, name)
            return
        adapter = Path(ckpt) / ADAPTER if ckpt else None
        stopped = stopped_early(last, self.expected_reports, self.extra_params.get("max_steps"))
        self.tracker.finish(self._run(trial), "FINISHED",
                            artifacts={ADAPTER: adapter} if adapter else None,
                            tags={"peftpipe.stopped_early": stopped,
                                  "peftpipe.checkpoint": ckpt or ""})

    def _trial_runs(self, trial) -> list[str]:
        if _is_pack(trial):
            return [r for r in self._member_runs(trial).values() if r not in self.ended]
        return [self._run(trial)]

    def on_trial_recover(self, iteration, trials, trial, **info):
        # the trial failed and Tune runs it again (tune.max_trial_failures): its run goes on
        for run_id in self._trial_runs(trial):
            self.tracker.client.set_tag(run_id, "peftpipe.trial_failures",
                                        str(getattr(trial, "num_failures", "")))

    def on_trial_error(self, iteration, trials, trial, **info):
        for run_id in self._trial_runs(trial):
            self.tracker.finish(run_id, "FAILED",
                                tags={"peftpipe.error": str(getattr(trial, "error_file", ""))})


def _is_pack(trial) -> bool:
    return "pack" in trial.config["trial"]


class StatusCallback(Callback):
    """One line per trial event (method, step, metric) instead of Ray's wall of logs; and,
    after ``waiting_notice_s`` without a line while trials wait for resources (a Tune trial
    pending, or Ray's placement groups pending: a trial's workers not yet placed), a line
    saying so with Ray's pending demand, repeated at most that often."""

    def __init__(self, metric: str, stream=None, total_steps: int | None = None,
                 waiting_notice_s: float = 60.0):
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

    def _say(self, trial, text: str) -> None:
        t = trial.config["trial"]
        label = (f"pack of {len(t['pack'])}" if "pack" in t else t["method"]["name"])
        self.last_event = time.time()
        self._print(f"{trial.trial_id} {label:<16} {text}")

    def _line(self, result: dict[str, Any]) -> str:
        v = result.get(self.metric)
        val = f"{v:.4f}" if isinstance(v, float) else v
        loss = result.get("train_loss")
        # a step-0 report (evaluation before training) has no training loss yet
        train = f"  train_loss={loss:.4f}" if isinstance(loss, float) and loss == loss else ""
        return f"{self.metric}={val}{train}"

    def on_step_end(self, iteration, trials, **info):
        now = time.time()
        if min(now - self.last_line, now - self.last_look) < self.waiting_notice_s:
            return
        self.last_look = now
        pending = sum(t.status == "PENDING" for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
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

    def on_trial_start(self, iteration, trials, trial, **info):
        self._say(trial, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = f"{result.get('step', '?'):>4}{self.total}"
        if not _is_pack(trial):
            self._say(trial, f"step {step}  {self._line(result)}")
            return
        specs = trial.config["trial"]["pack"]
        for name, spec in zip(member_names(trial.trial_id, len(specs)), specs):
            rec = (result.get("members") or {}).get(name)
            if rec is None or rec.get("step") != result.get("step"):
                continue
            ended = "  (stopped early)" if rec.get("status") == STOPPED else ""
            self.last_event = time.time()
            self._print(f"{name} {spec['method']['name']:<16} step {step}  "
                        f"{self._line(rec)}{ended}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._say(trial, "done")

    def on_trial_recover(self, iteration, trials, trial, **info):
        n = getattr(trial, "num_failures", "?")
        self._say(trial, f"failed (failure {n}); running again from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(trial, "FAILED (see the trial's error.txt)")
