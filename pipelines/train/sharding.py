"""The sharding seam: whether a run's weights are whole on every rank (ZeRO stages 0-2) or
partitioned across ranks (ZeRO-3), chosen once from ``train.zero.stage`` by
:func:`sharding_for`. This module is the only code of the worker that knows ZeRO-3:
partitioned loading, the gathering that injection, ``prepare``, ``finalize`` and saving
need, the external parameters selective methods read, and the allocator setting; the loop,
engines, checkpoints and evaluation ask the :class:`Sharding` object.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.manifest import Manifest
from .checkpoint import ResumeError
from .config import TrainConfig


def has_hook(peft_model: Any, name: str) -> bool:
    """Whether the run's method overrides the ``Method`` hook ``name``."""
    from peft_core import Method

    return getattr(type(peft_model.method), name) is not getattr(Method, name)


class Sharding:
    """Weights whole on every rank: ZeRO stages 0, 1 and 2 (optimizer states and gradients
    may be sharded by DeepSpeed; the model never is)."""

    partitioned = False

    def __init__(self, stage: int = 0):
        self.stage = stage  # DeepSpeed's ZeRO stage: recorded in checkpoints

    def start(self, device: torch.device) -> None:
        """Process-level set-up before the base model is built."""

    def load_base(self, config: TrainConfig, info: Manifest, ds_config: dict[str, Any],
                  dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
        """``(base model, what must live as long as it)``, in the run's compute dtype."""
        from pipelines.models import load_model

        return load_model(config.model.name, info.task, num_labels=info.num_labels,
                          dtype=dtype, quantization=config.model.quantization), None

    def adapted(self, peft_model: Any) -> None:
        """After the method's injection, before its ``prepare`` pass."""

    def prepare(self, peft_model: Any, common: list[dict[str, torch.Tensor]],
                ds_config: dict[str, Any]) -> None:
        """The method's pass before training (e.g. SAM's scoring)."""
        peft_model.prepare(common)

    def finalize(self, engine: Any, peft_model: Any,
                 common: list[dict[str, torch.Tensor]]) -> None:
        """The method's pass after training."""
        peft_model.finalize(common)

    @contextlib.contextmanager
    def gathered(self, params: Sequence[torch.nn.Parameter],
                 modifier_rank: int | None = None) -> Iterator[None]:
        """``params`` whole on every rank for the block (a collective when partitioned:
        every rank must enter)."""
        yield

    def save_adapter(self, peft_model: Any, folder: Path, *, rank: int,
                     **extra: Any) -> Path:
        """Rank 0 writes the adapter folder ``folder`` from the (gathered) trainables."""
        params = [p for _, p in peft_model.trainable_parameters()]
        with self.gathered(params):
            if rank == 0:
                peft_model.save(folder, **extra)
        return folder

    def check_resume(self, folder: Path, state: dict[str, Any], world: int) -> None:
        """Refuse a checkpoint whose DeepSpeed state this sharding cannot load."""
        saved = state["zero_stage"]
        if self.stage > 0 and (state["world_size"] != world or saved != self.stage):
            raise ResumeError(
                f"{folder}: written by {state['world_size']} workers under ZeRO-{saved}; "
                f"ZeRO-{self.stage} optimizer shards only resume with the same num_workers "
                f"and stage (now {world} workers)")
        if self.stage == 0 and saved != 0:
            raise ResumeError(f"{folder}: written under ZeRO-{saved}; resume it with that stage")


class Partitioned(Sharding):
    """ZeRO-3: every parameter partitioned across the ranks; no rank ever holds the base
    model whole, not even while loading it."""

    partitioned = True

    def __init__(self) -> None:
        super().__init__(3)

    def start(self, device: torch.device) -> None:
        import deepspeed

        import peft_core
        from pipelines.compat import release_freed_tensors_to_the_os

        release_freed_tensors_to_the_os()
        # zero.Init (inside the model's construction) needs DeepSpeed's view of the process
        # group Ray Train already set up; initialize() would do this later otherwise.
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
        peft_core.partition.use_gatherer(deepspeed.zero.GatheredParameters)

    def load_base(self, config: TrainConfig, info: Manifest, ds_config: dict[str, Any],
                  dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
        """Built partitioned by transformers inside ``zero.Init``; the second value must
        live as long as the model (transformers checks it, weakly, to know ZeRO-3 is on)."""
        from .partitioned import load

        return load(config.model.name, info.task, num_labels=info.num_labels, dtype=dtype,
                    ds_config=ds_config)

    def adapted(self, peft_model: Any) -> None:
        """Layers that compute with a wrapped base weight (selective methods) must have it
        gathered for their own forward (DeepSpeed's documented mechanism)."""
        import deepspeed

        from peft_core import partition

        for m in peft_model.modules():
            for p in partition.external_params(m):
                deepspeed.zero.register_external_parameter(m, p)

    def prepare(self, peft_model: Any, common: list[dict[str, torch.Tensor]],
                ds_config: dict[str, Any]) -> None:
        """The base weights exist only as partitions; a throwaway engine without an
        optimizer lends the pass DeepSpeed's gather/release hooks, and is torn down before
        the training engine is built over the parameters ``prepare`` may have created."""
        import deepspeed

        if not has_hook(peft_model, "prepare"):
            peft_model.prepare(common)
            return
        scratch = {k: v for k, v in ds_config.items()
                   if k not in ("optimizer", "gradient_clipping")}
        engine, *_ = deepspeed.initialize(model=peft_model, config=scratch,
                                          dist_init_required=False)
        try:
            peft_model.prepare(common)
        finally:
            engine.destroy()

    def finalize(self, engine: Any, peft_model: Any,
                 common: list[dict[str, torch.Tensor]]) -> None:
        """A pass that rewrites the method's own tensors runs on them whole (gathered, never
        the base; rank 0's result is kept); base weights are gathered by the forward hooks
        as in training."""
        if peft_model.method.finalize_writes_params:
            trainable = [p for _, p in peft_model.trainable_parameters()]
            with self.gathered(trainable, modifier_rank=0):
                peft_model.finalize(common)
            return
        peft_model.finalize(common)
        # Backward passes that stop at a layer's output (Laplace's curvature taps) leave
        # DeepSpeed's hooks holding those layers as in backward; release every parameter.
        # (Only here: a rewriting pass may have put new, not yet partitioned tensors in place.)
        engine.empty_partition_cache()

    @contextlib.contextmanager
    def gathered(self, params: Sequence[torch.nn.Parameter],
                 modifier_rank: int | None = None) -> Iterator[None]:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank):
            yield


def sharding_for(config: TrainConfig) -> Sharding:
    """The run's sharding, decided once from ``train.zero.stage``."""
    return Partitioned() if config.zero.stage == 3 else Sharding(config.zero.stage)
