"""Driver-side Ray Tune callbacks: MLflow child runs per trial and a concise live status,
recorded through :mod:`pipelines.tune.trial_log` (as a single run records its own).

Tune pickles the callbacks with the experiment when the search starts and a restored search
(``Tuner.restore``, a new driver) runs with those copies: ``Tuner.restore`` takes no new
callbacks. So each callback keeps only its configuration across pickling and rebuilds its
per-process state when unpickled (``__setstate__``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune import Callback

from ..tracking import SearchTracker
from ..train.engines import STOPPED, member_adapter
from .packing import member_names
from .trial_log import ADAPTER, CHECKPOINT_PATH_KEY, StatusLines, TrialRuns, stopped_early


class MlflowTrialCallback(TrialRuns, Callback):
    """Logs each trial (each member of a pack) as a nested MLflow run from the driver
    (:class:`~pipelines.tune.trial_log.TrialRuns`); a pack member's run ends with its
    adapter when the member leaves the pack."""

    def __init__(self, tracker: SearchTracker, expected_reports: int, extra_params: dict[str, Any]):
        TrialRuns.__init__(self, tracker, expected_reports, extra_params)
        self.ended: set[str] = set()  # runs of pack members already finished

    def __getstate__(self) -> dict[str, Any]:
        # trial -> run ids of this driver: a restored driver finds them again by tags
        return {**self.__dict__, "runs": {}, "ended": set()}

    def _run(self, trial) -> str:
        t = trial.config["trial"]
        return self.open(trial.trial_id, t["method"], t["lr"])

    def _member_runs(self, trial) -> dict[str, str]:
        """A pack trial's members' runs by member id (each its own run, as a solo trial's),
        tagged with the pack."""
        specs = trial.config["trial"]["pack"]
        return {name: self.open(name, spec["method"], spec["lr"], pack=trial.trial_id,
                                pack_size=len(specs))
                for name, spec in zip(member_names(trial.trial_id, len(specs)), specs)}

    def _finish_member(self, run_id: str, record: dict[str, Any], ckpt: str | None,
                       name: str) -> None:
        self.complete(run_id, member_adapter(ckpt, name) if ckpt else None,
                      stopped=record.get("status") == STOPPED, checkpoint=ckpt)
        self.ended.add(run_id)

    def on_trial_start(self, iteration, trials, trial, **info):
        if _is_pack(trial):
            self._member_runs(trial)
        else:
            self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not _is_pack(trial):
            self.log(self._run(trial), result)
            return
        step = int(result.get("step", result.get("training_iteration", 0)))
        shared = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
        for name, run_id in self._member_runs(trial).items():
            rec = (result.get("members") or {}).get(name)
            if rec is None or rec.get("step") != step or run_id in self.ended:
                continue  # a member that left the pack earlier repeats its last record
            self.log(run_id, {**shared, **rec})
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
        stopped = stopped_early(last, self.expected_reports, self.extra_params.get("max_steps"))
        self.complete(self._run(trial), Path(ckpt) / ADAPTER if ckpt else None,
                      stopped=stopped, checkpoint=ckpt)

    def _trial_runs(self, trial) -> list[str]:
        if _is_pack(trial):
            return [r for r in self._member_runs(trial).values() if r not in self.ended]
        return [self._run(trial)]

    def on_trial_recover(self, iteration, trials, trial, **info):
        # the trial failed and Tune runs it again (tune.max_trial_failures): its run goes on
        for run_id in self._trial_runs(trial):
            self.recovered(run_id, getattr(trial, "num_failures", ""))

    def on_trial_error(self, iteration, trials, trial, **info):
        for run_id in self._trial_runs(trial):
            self.failed(run_id, getattr(trial, "error_file", ""))


def _is_pack(trial) -> bool:
    return "pack" in trial.config["trial"]


class StatusCallback(StatusLines, Callback):
    """The search's console lines (:class:`~pipelines.tune.trial_log.StatusLines`): one per
    trial event, and the waiting line while trials wait for resources."""

    def _say(self, trial, text: str) -> None:
        t = trial.config["trial"]
        self.say(trial.trial_id, f"pack of {len(t['pack'])}" if "pack" in t
                 else t["method"]["name"], text)

    def on_step_end(self, iteration, trials, **info):
        self.waiting_notice(pending=sum(t.status == "PENDING" for t in trials),
                            running=sum(t.status == "RUNNING" for t in trials))

    def on_trial_start(self, iteration, trials, trial, **info):
        self._say(trial, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not _is_pack(trial):
            self._say(trial, f"{self.step(result)}  {self.line(result)}")
            return
        specs = trial.config["trial"]["pack"]
        for name, spec in zip(member_names(trial.trial_id, len(specs)), specs):
            rec = (result.get("members") or {}).get(name)
            if rec is None or rec.get("step") != result.get("step"):
                continue
            ended = "  (stopped early)" if rec.get("status") == STOPPED else ""
            self.say(name, spec["method"]["name"],
                     f"{self.step(result)}  {self.line(rec)}{ended}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._say(trial, "done")

    def on_trial_recover(self, iteration, trials, trial, **info):
        n = getattr(trial, "num_failures", "?")
        self._say(trial, f"failed (failure {n}); running again from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(trial, "FAILED (see the trial's error.txt)")
