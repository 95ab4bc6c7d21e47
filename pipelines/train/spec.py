"""What a run's workers are told: one typed :class:`WorkerSpec`, built once on the driver
(:func:`pipelines.train.stage.build_trainer`) and checked once on each worker
(:meth:`WorkerSpec.receive`). Ray Train pickles it into every worker as the one value of
``train_loop_config``, so the method configs cross as peft_core's own typed objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import peft_core

from ..data.manifest import Manifest
from .config import TrainConfig, import_plugins

#: the key of ``train_loop_config`` that holds the spec
SPEC_KEY = "spec"


@dataclasses.dataclass(frozen=True)
class PackMember:
    """One member of a packed run: its name (``<pack trial>-<k>``), method and rate."""

    name: str
    method: peft_core.MethodConfig
    lr: float

    @classmethod
    def of(cls, member: PackMember | dict[str, Any]) -> PackMember:
        if isinstance(member, PackMember):
            return member
        return cls(str(member["name"]), peft_core.MethodConfig.from_dict(dict(member["method"])),
                   float(member["lr"]))


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """One run as every worker executes it.

    ``method``: the adapter a solo run trains (``config.method``, typed); ``members``: a
    packed run's members in its place (``tune.pack``), with ``stopper(member,
    report_index, metrics) -> bool`` asked at each report. ``resume_from``: a checkpoint
    folder used when Ray has none; ``pid_dir``: each rank writes ``rank{R}.pid`` there;
    ``started_at``: the run's start (``time.time()``), from which the workers charge the
    time before their first line to the ``wait``/``controller``/``worker_start`` phases.
    """

    config: TrainConfig
    dataset: Manifest
    method: peft_core.MethodConfig | None = None
    members: tuple[PackMember, ...] | None = None
    stopper: Callable[[str, int, dict[str, Any]], bool] | None = None
    resume_from: str | None = None
    pid_dir: str | None = None
    started_at: float | None = None

    @classmethod
    def build(cls, config: TrainConfig, dataset: Manifest, *,
              members: list[dict[str, Any]] | list[PackMember] | None = None,
              **kwargs: Any) -> WorkerSpec:
        """On the driver: the method config (or the members') parsed once, here."""
        if members is not None:
            return cls(config, dataset, members=tuple(PackMember.of(m) for m in members),
                       **kwargs)
        return cls(config, dataset, method=peft_core.MethodConfig.from_dict(dict(config.method)),
                   **kwargs)

    @property
    def packed(self) -> bool:
        return self.members is not None

    def loop_config(self) -> dict[str, Any]:
        """Ray Train's ``train_loop_config``: the spec itself."""
        return {SPEC_KEY: self}

    @classmethod
    def receive(cls, loop_config: dict[str, Any], world: int) -> WorkerSpec:
        """On a worker: the spec, checked against what only a worker knows (its world size,
        the objectives its plugins register)."""
        spec = loop_config[SPEC_KEY]
        if not isinstance(spec, cls):
            raise TypeError(f"train_loop_config[{SPEC_KEY!r}]: expected a WorkerSpec, got "
                            f"{type(spec).__name__}")
        import_plugins(spec.config.plugins)
        if world != spec.config.num_workers:
            raise ValueError(f"train.num_workers: {spec.config.num_workers}, but Ray Train "
                             f"started {world} workers")
        for m in [spec.method] if spec.method is not None else [m.method for m in spec.members]:
            m.validate()
        return spec
