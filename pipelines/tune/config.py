"""The search recipe: space, searcher, scheduler, concurrency, objective."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .objective import Objective
from .space import SearchSpace


class TuneConfig(BaseModel):
    """A Ray Tune search over methods and their hyperparameters.

    ``searcher``: ``random`` (``num_samples`` seeded draws), ``grid`` (every combination,
    ``num_samples`` ignored) or ``optuna`` (model-based, ``num_samples`` trials).
    ``scheduler``: ``asha`` stops poor trials at their eval reports; ``fifo`` runs all to the end.
    ``max_concurrent_trials`` trials at once; each trial is one training run of the
    recipe's ``train`` section, so its workers and their CPUs are ``train.num_workers`` and
    ``train.cpus_per_worker`` (unset: the cluster's CPUs shared among the concurrent
    workers, see :mod:`pipelines.tune.resources`).
    ``max_trial_failures``: how often Ray Tune restarts a trial whose driver or training
    failed (a lost node, say; ``train.max_failures`` already restarts lost workers inside
    a trial); a restarted trial resumes from its last checkpoint. A trial that still failed
    makes the job exit 1 (after its results are saved) unless ``tolerate_failed_trials``.
    ``pack``: up to this many trials train in one worker group over one copy of the base
    model (LoRA-family methods, ZeRO 0-2, searcher grid or random; see
    :mod:`pipelines.tune.packing`); 1 runs each trial on its own.
    ``waiting_notice_s``: while trials wait for resources, a console line with Ray's
    pending demand after this long without one (then at most this often).
    """

    model_config = ConfigDict(extra="forbid")

    space: SearchSpace
    objective: Objective = Field(default_factory=Objective)
    searcher: Literal["random", "grid", "optuna"] = "random"
    scheduler: Literal["asha", "fifo"] = "asha"
    num_samples: int = Field(4, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    grace_period: int = Field(1, ge=1)  # eval reports before ASHA may stop a trial
    reduction_factor: int = Field(2, ge=2)
    seed: int = 0
    max_trial_failures: int = Field(2, ge=0)
    tolerate_failed_trials: bool = False
    waiting_notice_s: float = Field(60.0, gt=0)
    pack: int = Field(1, ge=1)
    name: str | None = None  # the search id; default: a hash of the recipe and dataset
