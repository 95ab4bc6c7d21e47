"""Packed trials (``tune.pack: K``): up to K of a search's trials trained in one worker group
over one copy of the base model (:mod:`pipelines.train.packed`).

The search's trials (grid or seeded random draws) are cut, in order, into packs of K; Ray
Tune runs one trial per pack, and each member keeps its own identity: its id
(``<pack trial id>-<k>``), MLflow run, metrics, checkpointed adapter and entry in
``trials.json``. Early stopping stays per member: ASHA's rule (asynchronous successive
halving, the same rungs and cutoff as Ray Tune's ``ASHAScheduler``) runs in one small actor
per search that every pack's rank 0 asks at each report, so a weak member is stopped
against all of the search's members, wherever they train, and its pack goes on.

No Ray at import: the recipe checks a pack (:func:`check`) before anything starts.
"""

from __future__ import annotations

from typing import Any

RUNGS_NAMESPACE = "peftpipe"


def check(train: Any, tune: Any) -> None:
    """A ``ValueError`` naming the field when ``tune.pack`` > 1 cannot run: the packed
    loop shares one whole, frozen base among LoRA-family members."""
    if tune.pack == 1:
        return
    from peft_core import PeftError
    from peft_core.pack import check_member

    if tune.searcher == "optuna":
        raise ValueError("tune.pack: packs are cut from the search's trials before it runs; "
                         "searcher optuna suggests one trial at a time (use grid or random, "
                         "or tune.pack: 1)")
    if train.zero.stage == 3:
        raise ValueError("tune.pack: a pack shares one whole base model, ZeRO-3 partitions "
                         "it; use train.zero.stage 0, 1 or 2 (or tune.pack: 1)")
    if train.gradient_checkpointing:
        raise ValueError("tune.pack: packed members cannot recompute activations "
                         "(train.gradient_checkpointing: false, or tune.pack: 1)")
    for trial in tune.space.grid():  # every value a trial could get
        method = trial["method"]
        try:
            check_member(method)
        except PeftError as e:
            raise ValueError(f"tune.space.methods.{method['name']}: cannot be packed "
                             f"(tune.pack: {tune.pack}): {e}") from None


def packs(trials: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """The trials cut, in order, into packs of at most ``size``."""
    return [trials[i:i + size] for i in range(0, len(trials), size)]


def member_names(trial_id: str, n: int) -> list[str]:
    """The ids of a pack trial's ``n`` members (each a trial of the search)."""
    return [f"{trial_id}-{k}" for k in range(n)]


class SuccessiveHalving:
    """Asynchronous successive halving over members' reports, the rule of Ray Tune's
    ``ASHAScheduler`` (one bracket): rungs at ``grace_period * reduction_factor**k``
    reports; the first report of a member at or past a rung is recorded there, and the
    member stops when it is worse than the rung's ``1 - 1/reduction_factor`` quantile of
    the members recorded before it."""

    def __init__(self, *, mode: str, grace_period: int, reduction_factor: int, max_t: int):
        self.sign = 1.0 if mode == "max" else -1.0
        self.rf = reduction_factor
        self.milestones: list[int] = []
        t = grace_period
        while t <= max_t:
            self.milestones.append(t)
            t *= reduction_factor
        self.rungs: dict[int, dict[str, float]] = {t: {} for t in self.milestones}

    def decide(self, member: str, report_index: int, value: float | None) -> bool:
        """Whether ``member`` stops at its ``report_index``-th report with ``value``."""
        import numpy as np

        if value is None or value != value:
            return False
        v = self.sign * float(value)
        for t in reversed(self.milestones):
            rung = self.rungs[t]
            if report_index < t or member in rung:
                continue
            cutoff = (float(np.percentile(list(rung.values()), (1 - 1 / self.rf) * 100))
                      if rung else None)
            rung[member] = v
            return cutoff is not None and v < cutoff
        return False


def start_rungs(search_id: str, *, mode: str, grace_period: int, reduction_factor: int,
                max_t: int) -> tuple[str, Any]:
    """The search's :class:`SuccessiveHalving` as a named actor owned by this driver (it
    ends with it; a resumed search starts its rungs afresh); returns its name and handle.
    Ray ends an actor once no handle refers to it: the caller keeps the handle while the
    search runs."""
    import ray

    name = f"rungs-{search_id}"
    handle = ray.remote(SuccessiveHalving).options(
        name=name, namespace=RUNGS_NAMESPACE, get_if_exists=True, num_cpus=0,
    ).remote(mode=mode, grace_period=grace_period, reduction_factor=reduction_factor,
             max_t=max_t)
    return name, handle


class MemberStopper:
    """What a packed run's rank 0 calls at each report: the search's rungs actor decides
    on the member's ``metric``. Picklable (it travels in the workers' config)."""

    def __init__(self, actor_name: str, metric: str):
        self.actor_name = actor_name
        self.metric = metric

    def __call__(self, member: str, report_index: int, metrics: dict[str, Any]) -> bool:
        import ray

        actor = ray.get_actor(self.actor_name, namespace=RUNGS_NAMESPACE)
        return bool(ray.get(actor.decide.remote(member, report_index, metrics.get(self.metric))))
