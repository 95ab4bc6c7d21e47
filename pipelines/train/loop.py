"""What each Ray Train worker runs: one training run, written once, over three seams chosen
when the worker starts (:mod:`.worker`): the *sharding* (weights whole or partitioned,
:mod:`.sharding`), the *engine* (one adapter under DeepSpeed, or K packed members,
:mod:`.engines`) and the *objective* (how a batch becomes a loss and metrics,
:mod:`.objectives`).

The lifecycle: setup -> resume -> steps, with a report every ``eval_every`` steps and a
checkpoint every ``checkpoint_every`` -> finish. Every second from the trial's start is
charged to one phase of the stopwatch (``phase_<name>_s`` in each report).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from . import metrics as M
from .engines import AdapterEngine, Engine, PackEngine
from .worker import Worker, start_worker


def train_loop_per_worker(loop_config: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Train's per-worker function; ``loop_config`` holds the run's
    :class:`~pipelines.train.spec.WorkerSpec`. Rank 0's return value, the reported
    history, reaches the driver as ``Result.return_value``."""
    w = start_worker(loop_config)  # first: its stopwatch starts at this function's start
    engine = (PackEngine if w.spec.packed else AdapterEngine)(w)
    engine.setup()
    run = Run(w, engine)
    if run.resume():
        return run.history
    run.train()
    return run.history


def resume_source(resume_from: str | None) -> tuple[Any, Any]:
    """``(Ray's checkpoint or None, a context manager yielding the folder to resume from)``:
    Ray's latest checkpoint of this run (a restarted worker group) before the
    ``resume_from`` folder; the manager is None when the run starts afresh."""
    import ray.train

    restored = ray.train.get_checkpoint()
    if restored is not None:
        return restored, restored.as_directory()
    return None, (contextlib.nullcontext(resume_from) if resume_from else None)


class Run:
    """The loop's own state on one worker: the step reached and the reported history."""

    def __init__(self, w: Worker, engine: Engine):
        self.w, self.engine = w, engine
        self.step, self.history = 0, []

    def resume(self) -> bool:
        """Restore from Ray's or the spec's checkpoint; True when the run had already
        ended there and its last report was sent again (nothing left to do)."""
        import ray.train

        restored, source = resume_source(self.w.spec.resume_from)
        if source is None:
            return False
        self.w.phases.switch("checkpoint")
        with source as folder:
            saved = self.engine.restore(Path(folder))
        self.step, self.history = int(saved["step"]), list(saved.get("history", []))
        ended = self.step >= self.w.config.max_steps or not self.engine.training
        if restored is not None and saved.get("finalized") and ended and self.history:
            # The run had ended (a longer max_steps extends it instead), but the driver that
            # ran it died before Tune recorded the final report (a search resumed after its
            # driver was killed): report it again, pointing at the restored checkpoint
            # (Tune's key for a report's checkpoint) rather than copying a new one.
            ray.train.report({**self.history[-1], "checkpoint_path": restored.path})
            return True
        return False

    def train(self) -> None:
        w, engine, config = self.w, self.engine, self.w.config
        static = engine.static(self.step)
        w.phases.switch("steps")
        if self.step == 0 and config.eval_before_training:
            with w.phases("eval"):
                report = engine.first_report({M.STEP: 0, **static})
            self.publish(report)
        engine.train_mode()
        static["first_step_s"] = M.all_reduce([time.perf_counter() - w.started], "max")[0]
        while self.step < config.max_steps and engine.training:
            engine.train_step(self.step)
            self.step += 1
            last = self.step == config.max_steps
            if self.step % config.eval_every and not last:
                continue
            report, checkpoint = engine.report(self.step, last, {M.STEP: self.step, **static})
            if checkpoint:
                self.checkpoint(report, last)
            else:
                self.publish(report)

    def publish(self, report: dict[str, Any]) -> None:
        """A report without a checkpoint."""
        report.update(self.w.phases.snapshot())
        self.history.append(report)
        with self.w.phases("report"):
            import ray.train

            ray.train.report(report)

    def checkpoint(self, report: dict[str, Any], last: bool) -> None:
        """A report with a checkpoint: the engine's files, then (rank 0) the train state."""
        import ray.train

        w, engine = self.w, self.engine
        with tempfile.TemporaryDirectory(prefix="peftpipe-ckpt-") as tmp:
            folder = Path(tmp)
            w.phases.switch("checkpoint")
            engine.save(folder, self.step, last, report)
            # the snapshot precedes metrics.json and the report: the checkpoint's copy to
            # storage (inside ray.train.report) is charged to the next report's phases
            report.update(w.phases.snapshot())
            self.history.append(report)
            if w.rank == 0:
                ckpt.write_state(folder, {
                    "step": self.step, "world_size": w.world,
                    "zero_stage": w.sharding.stage,
                    "position": w.batches.position(self.step), "seed": w.config.seed,
                    "finalized": engine.finalized(last), "history": self.history,
                    **engine.state()})
                (folder / "metrics.json").write_text(
                    json.dumps(report, indent=2, sort_keys=True, default=float))
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        w.phases.switch("steps")
