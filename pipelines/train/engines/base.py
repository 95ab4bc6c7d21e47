"""The engine seam: what trains the run's adapter(s) and how their state is saved. The loop
(:mod:`pipelines.train.loop`) drives an :class:`Engine` through one lifecycle, setup ->
resume -> steps, reports, checkpoints -> finish, and knows neither DeepSpeed nor packs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .. import metrics as M
from ..worker import Worker, memory


class Engine:
    """One run's trainer on one worker. Subclasses: :class:`~.adapter.AdapterEngine` (one
    adapter under DeepSpeed) and :class:`~.packed.PackEngine` (K members over one base).

    Every method that ends in a collective (an all-reduce, a gathered save) is called on
    every rank in the same order; the loop guarantees that by calling them unconditionally.
    """

    def __init__(self, w: Worker):
        self.w = w
        self.load_s = 0.0  # seconds from the worker's start to the loaded base model
        self.load_peak = 0.0  # peak memory once loaded, adapted and sharded

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        """Base model, adapter(s), optimizer(s); phases ``load``, ``method`` (``engine``)."""
        raise NotImplementedError

    def loaded(self) -> None:
        """Call right after the base model is loaded: its time from the worker's start."""
        self.load_s = time.perf_counter() - self.w.started

    def measure_load_peak(self) -> None:
        """Peak RSS (or CUDA allocator peak) once the model is loaded, adapted and sharded:
        what loading costs, before activations and optimizer states of the steps."""
        self.load_peak = M.all_reduce([M.peak_mem_mb(self.w.device)], "max")[0]

    def static(self, step: int) -> dict[str, Any]:
        """Figures every report carries (collectives: every rank computes them)."""
        return {
            # where this worker group started: 0, or the checkpoint step it resumed from
            "resumed_from": step,
            # parameter bytes resident per rank (largest rank): what ZeRO-3 divides
            "param_mem_mb": M.all_reduce([M.param_mem_mb(self.model)], "max")[0],
            "load_peak_mem_mb": self.load_peak,
            # seconds from the worker's start: to the loaded base model, to the first step
            "load_s": M.all_reduce([self.load_s], "max")[0],
            "precision": self.w.precision,
            **self.own_static(),
        }

    @property
    def model(self) -> Any:
        """The module whose parameters this rank holds."""
        raise NotImplementedError

    def own_static(self) -> dict[str, Any]:
        return {}

    # -- resume -----------------------------------------------------------------------------
    def restore(self, folder: Path) -> dict[str, Any]:
        """Load a checkpoint folder written by :meth:`save`; returns its train state."""
        raise NotImplementedError

    # -- steps and reports ------------------------------------------------------------------
    @property
    def training(self) -> bool:
        """Whether anything is left to train (a pack whose members all stopped is not)."""
        return True

    def train_mode(self) -> None:
        raise NotImplementedError

    def train_step(self, step: int) -> None:
        """One optimizer step (its micro-batches accumulated), statistics recorded."""
        raise NotImplementedError

    def first_report(self, report: dict[str, Any]) -> dict[str, Any]:
        """The untrained adapter's evaluation (``eval_before_training``), inside the loop's
        ``eval`` phase: ``report`` completed."""
        raise NotImplementedError

    def report(self, step: int, last: bool, base: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """``(report, checkpoint)`` after optimizer step ``step``: ``base`` (step, static
        figures) completed, and whether this report carries a checkpoint (then
        :meth:`save` completes it)."""
        raise NotImplementedError

    def save(self, folder: Path, step: int, last: bool, report: dict[str, Any]) -> None:
        """Write this rank's part of a checkpoint into ``folder`` and complete ``report``."""
        raise NotImplementedError

    def finalized(self, last: bool) -> bool:
        """Whether the checkpoint just saved ends the run."""
        return last

    def state(self) -> dict[str, Any]:
        """The engine's own entries of ``train_state.json`` (rank 0)."""
        return {}

    def memory(self) -> dict[str, float]:
        return memory(self.w.device)
