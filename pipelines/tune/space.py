"""The search space of a recipe: method names and each method's own hyperparameters.

Written in YAML as one entry per method, so spaces are conditional by construction
(``rank`` only for LoRA-family methods, ``num_virtual_tokens`` only for soft prompts)::

    methods:
      lora: {rank: [4, 8, 16], alpha: 16}
      prompt_tuning: {num_virtual_tokens: [10, 20]}
      full: {}
    lr: {min: 1.0e-4, max: 1.0e-2, log: true}

A method may carry its own ``lr`` domain (soft prompts want learning rates ~10x LoRA's);
it replaces the shared one for that method's trials.

A list is a choice, ``{min, max[, log, int]}`` a range, anything else a fixed value. Method
names and hyperparameter names are checked against the peft_core registry, so any
registered method is searchable without new code here.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import peft_core


class Range(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min: float
    max: float
    log: bool = False
    int: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.min < self.max:
            raise ValueError(f"range: min ({self.min}) must be < max ({self.max})")
        if self.log and self.min <= 0:
            raise ValueError(f"range: a log range needs min > 0, got {self.min}")
        return self

    def sample(self, rng: random.Random) -> float | int:
        if self.log:
            v = math.exp(rng.uniform(math.log(self.min), math.log(self.max)))
        else:
            v = rng.uniform(self.min, self.max)
        return int(round(v)) if self.int else v

    def grid(self) -> list[float | int]:
        """Grid search over a range uses its two ends and the (log-)midpoint."""
        mid = math.sqrt(self.min * self.max) if self.log else (self.min + self.max) / 2
        vals = [self.min, mid, self.max]
        return [int(round(v)) for v in vals] if self.int else vals


Domain = Range | list[Any] | str | int | float | bool | None


class SearchSpace(BaseModel):
    """Methods to try with their hyperparameter domains, plus the learning rate."""

    model_config = ConfigDict(extra="forbid")

    methods: dict[str, dict[str, Domain]] = Field(min_length=1)
    lr: Domain = 1e-3

    @field_validator("methods")
    @classmethod
    def _known(cls, methods: dict[str, dict[str, Domain]]) -> dict[str, dict[str, Domain]]:
        for name, params in methods.items():
            method_cls = peft_core.get(name)  # unknown name: ConfigError listing the available
            fields = {f.name for f in dataclasses.fields(method_cls.config_cls)}
            unknown = sorted(set(params or {}) - fields - {"lr"})
            if unknown:
                raise ValueError(
                    f"methods.{name}: unknown hyperparameter(s) {unknown}; "
                    f"{name} has {sorted(fields)}"
                )
            for key, dom in (params or {}).items():
                if isinstance(dom, list) and not dom:
                    raise ValueError(f"methods.{name}.{key}: an empty list leaves nothing to try")
        return {k: dict(v or {}) for k, v in methods.items()}

    # -- materialising trials -----------------------------------------------------------------
    def sample(self, rng: random.Random) -> dict[str, Any]:
        """One random trial config: ``{"method": {...}, "lr": ...}``."""
        name = rng.choice(sorted(self.methods))
        params, lr = self._split(name)
        method = {"name": name, **{k: _sample(v, rng) for k, v in params.items()}}
        return {"method": method, "lr": _sample(lr, rng)}

    def _split(self, name: str) -> tuple[dict[str, Domain], Domain]:
        """(the method's own hyperparameters, its learning-rate domain)."""
        params = dict(self.methods[name])
        return params, params.pop("lr", self.lr)

    def grid(self) -> list[dict[str, Any]]:
        """Every combination, method by method (a fixed grid for ablations)."""
        out = []
        for name in sorted(self.methods):
            params, lr = self._split(name)
            lrs = _grid(lr)
            keys = sorted(params)
            for combo in itertools.product(*(_grid(params[k]) for k in keys)):
                for lr in lrs:
                    out.append({"method": {"name": name, **dict(zip(keys, combo))}, "lr": lr})
        return out

    def validate_trials(self, trials: list[dict[str, Any]]) -> None:
        """Build every method config once so a bad value fails before anything starts."""
        for t in trials:
            peft_core.MethodConfig.from_dict(t["method"])

    def suggest(self, trial) -> dict[str, Any]:
        """Optuna define-by-run: the method first, then only that method's hyperparameters."""
        name = trial.suggest_categorical("method", sorted(self.methods))
        method = {"name": name}
        params, lr = self._split(name)
        for key, dom in params.items():
            method[key] = _suggest(trial, f"{name}.{key}", dom)
        own_lr = "lr" in self.methods[name]
        return {"method": method, "lr": _suggest(trial, f"{name}.lr" if own_lr else "lr", lr)}


def _sample(dom: Domain, rng: random.Random) -> Any:
    if isinstance(dom, Range):
        return dom.sample(rng)
    if isinstance(dom, list):
        return rng.choice(dom)
    return dom


def _grid(dom: Domain) -> list[Any]:
    if isinstance(dom, Range):
        return dom.grid()
    if isinstance(dom, list):
        return list(dom)
    return [dom]


def _suggest(trial, key: str, dom: Domain) -> Any:
    if isinstance(dom, Range):
        if dom.int:
            return trial.suggest_int(key, int(dom.min), int(dom.max), log=dom.log)
        return trial.suggest_float(key, dom.min, dom.max, log=dom.log)
    if isinstance(dom, list):
        return trial.suggest_categorical(key, dom)
    return dom
