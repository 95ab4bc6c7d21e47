"""The optimisation side of a pack member (:mod:`peft_core.pack` holds the model side).

Each member of a pack has its own optimizer, learning-rate schedule and gradient clipping,
as it would in a solo run: one optimizer over the whole pack would clip the members' joint
gradient norm and tie each member's step to the others'::

    pack = PackedModel(base_model)
    member = pack.add("a", {"name": "lora", "rank": 8}, seed=0)
    opt = MemberOptimizer(member.peft, lr=1e-3, grad_clip=1.0)
    pack.backward({"a": batch})   # per micro-batch, then once per step:
    opt.step()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError

if TYPE_CHECKING:
    from peft_core import PeftModel

#: ``optimizer(param_groups) -> optimizer``
OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
#: ``scheduler(optimizer) -> scheduler`` (e.g. ``LambdaLR``), stepped after each step
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class MemberOptimizer:
    """One pack member's own AdamW, learning-rate schedule and gradient clipping.

    The optimizer is built over :meth:`PeftModel.param_groups` (``torch.optim.AdamW`` unless
    ``optimizer``), exactly as a solo run builds its own, so a member given the same data
    and seed follows the solo run's trajectory. ``grad_clip`` bounds the norm of *this
    member's* gradient only: clipping the pack's joint norm would make the members depend
    on each other.
    """

    def __init__(
        self,
        peft: PeftModel,
        *,
        lr: float,
        weight_decay: float = 0.0,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        grad_clip: float | None = None,
    ) -> None:
        if grad_clip is not None and not grad_clip > 0:
            raise InputError(f"grad_clip: expected a number > 0 or None, got {grad_clip!r}")
        self.peft = peft
        self.grad_clip = grad_clip
        groups = peft.param_groups(lr, weight_decay)
        self.optimizer: torch.optim.Optimizer = (
            optimizer(groups) if optimizer is not None else torch.optim.AdamW(groups))
        self.scheduler: Any = scheduler(self.optimizer) if scheduler is not None else None

    def step(self) -> None:
        """Apply the accumulated gradients: clip, step, advance the schedule, clear them."""
        if self.grad_clip is not None:
            params = [p for _, p in self.peft.trainable_parameters()]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        """The learning rate the next :meth:`step` uses (the first param group's)."""
        if self.scheduler is not None:
            return float(self.scheduler.get_last_lr()[0])
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's and the scheduler's state (``None`` without a scheduler)."""
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None
                else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def release(self) -> None:
        """Free the optimizer's moments: a member leaving the pack trains no more, and its
        AdamW state is twice its adapter's size."""
        self.optimizer.state.clear()
