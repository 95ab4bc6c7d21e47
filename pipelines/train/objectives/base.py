"""The objective seam: how a batch becomes a training loss and how evaluation batches
become metrics. The training loop, both engines and :mod:`pipelines.evaluate` call an
objective and know no task; a new objective (a regression head, chat turns, preference
pairs) is one module with one :func:`register` and touches no loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ...data.manifest import Manifest
from .. import metrics as M

_OBJECTIVES: dict[str, type[Objective]] = {}


class EvalSums:
    """Running sums of one model's evaluation on this rank: the loss weighted by the
    targets it averages over. Subclasses add their own sums; :meth:`result` combines every
    rank's (a collective: every rank calls it, in the same order)."""

    def __init__(self) -> None:
        self.loss_sum = self.weight = 0.0

    def add(self, loss: float, weight: int, logits: torch.Tensor,
            batch: dict[str, torch.Tensor]) -> None:
        if weight:
            self.loss_sum += loss * weight
            self.weight += weight

    def result(self) -> dict[str, float]:
        loss_sum, weight = M.all_reduce([self.loss_sum, self.weight])
        return {M.EVAL_LOSS: loss_sum / weight if weight else math.nan}


class Objective:
    """One training objective over a dataset (:class:`~pipelines.data.manifest.Manifest`).

    The defaults are transformers' own: the model computes its loss from ``labels`` in the
    batch (``model(**batch).loss``), which keeps every method's forward (prompt methods
    label their virtual tokens -100 themselves) and the numbers a run reported before
    objectives existed. An objective that needs another loss overrides :meth:`forward`.
    """

    name: ClassVar[str]
    #: the tasks (``Manifest.task``) whose default objective this is
    default_for: ClassVar[tuple[str, ...]] = ()

    def __init__(self, info: Manifest):
        self.info = info

    def forward(self, model: Any, batch: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, logits)`` of one batch; ``model`` is the DeepSpeed engine or the
        PeftModel (both forward as the model does)."""
        out = model(**batch)
        return out.loss, out.logits

    def logits_loss(self, model: Any, logits: torch.Tensor, labels: torch.Tensor
                    ) -> torch.Tensor:
        """The loss from one pack member's logits (a pack runs the base once for K
        members and computes each loss itself): what :meth:`forward`'s loss is."""
        from peft_core.pack import hf_loss

        return hf_loss(model, logits, labels)

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """How many targets the batch's loss averages over (its weight in the mean)."""
        return int(batch["labels"].numel())

    def eval_sums(self, *, calibrate: bool = False) -> EvalSums:
        return EvalSums()

    def final_metrics(self, model: Any, metrics: dict[str, float],
                      batches: list[dict[str, torch.Tensor] | None], device: torch.device,
                      *, partitioned: bool) -> dict[str, float]:
        """The run's last evaluation, from :meth:`eval_sums`' (calibrated) ``metrics``: an
        objective may add or replace scores (a fitted Laplace posterior's predictive)."""
        return metrics


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` available as ``train.objective: <cls.name>`` (a module
    listed in ``train.plugins`` registers its own in every worker)."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__}: an objective needs a class attribute 'name'")
    _OBJECTIVES[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(_OBJECTIVES)


def get(name: str) -> type[Objective]:
    try:
        return _OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"objective: unknown {name!r}; registered: {available()}") from None


def objective_for(info: Manifest, name: str | None = None) -> Objective:
    """The objective ``name``, or the dataset task's default when None."""
    if name is not None:
        return get(name)(info)
    for cls in _OBJECTIVES.values():
        if info.task in cls.default_for:
            return cls(info)
    raise ValueError(f"objective: no default objective for task {info.task!r}; "
                     f"registered: {available()}")


LossFn = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]
