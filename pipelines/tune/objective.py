"""What a search optimises: a metric and mode, optionally under a parameter budget, and the
Pareto front of quality against trainable parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Objective(BaseModel):
    """Best ``metric`` (``mode``) among trials whose trainable fraction is within budget."""

    model_config = ConfigDict(extra="forbid")

    metric: str = "eval_accuracy"
    mode: Literal["max", "min"] = "max"
    max_trainable_fraction: float | None = Field(None, gt=0, le=1)

    def eligible(self, result: dict[str, Any]) -> bool:
        value = result.get(self.metric)
        if value is None or value != value:  # missing or NaN
            return False
        frac = result.get("trainable_fraction")
        return self.max_trainable_fraction is None or (
            frac is not None and frac <= self.max_trainable_fraction
        )

    def best(self, results: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        """The winning result (None if no trial is within budget)."""
        ok = [r for r in results if self.eligible(r)]
        if not ok:
            return None
        key = (lambda r: r[self.metric]) if self.mode == "max" else (lambda r: -r[self.metric])
        return max(ok, key=key)


def pareto_front(results: Sequence[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Trials not dominated in (quality, trainable parameters): no other trial is at least
    as good on both and strictly better on one. Sorted by trainable parameters."""
    sign = 1.0 if mode == "max" else -1.0
    pts = [r for r in results
           if r.get(metric) is not None and r.get("trainable_params") is not None]
    front = []
    for r in pts:
        q, p = sign * r[metric], r["trainable_params"]
        dominated = any(
            (sign * o[metric] >= q and o["trainable_params"] <= p)
            and (sign * o[metric] > q or o["trainable_params"] < p)
            for o in pts
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r["trainable_params"])
