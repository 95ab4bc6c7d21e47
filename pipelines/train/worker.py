"""A worker's start, the same for every run: imports, the spec, rank, pid file, device,
seeds, the run's sharding and objective, and the data splits batched, each charged to its
phase of the stopwatch that starts at the worker function's first line."""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import torch

from ..data.manifest import Manifest
from . import metrics as M
from .config import TrainConfig
from .data import Collator, TrainBatches, eval_batches, read_split
from .deepspeed_config import build as build_ds_config
from .deepspeed_config import resolve_precision, setup_deepspeed
from .objectives import Objective, objective_for
from .sharding import Sharding, sharding_for
from .spec import WorkerSpec


@dataclasses.dataclass
class Worker:
    """What a worker has once started, before its model (see :func:`start_worker`)."""

    spec: WorkerSpec
    rank: int
    world: int
    device: torch.device
    phases: M.Phases
    started: float  # perf_counter at the train function's first line
    precision: str
    dtype: torch.dtype
    ds_config: dict[str, Any]
    sharding: Sharding
    objective: Objective
    batches: TrainBatches
    evals: list[dict[str, torch.Tensor] | None]
    fallback: dict[str, torch.Tensor]

    @property
    def config(self) -> TrainConfig:
        return self.spec.config

    @property
    def info(self) -> Manifest:
        return self.spec.dataset


def start_worker(loop_config: dict[str, Any]) -> Worker:
    """The first part of every worker's function, each part charged to its phase."""
    entered = time.time()  # wall clock: compared with the trial driver's ``started_at``
    started = time.perf_counter()
    phases = M.Phases("imports")
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = WorkerSpec.receive(loop_config, world)
    charge_start(phases, spec.started_at, entered)
    config, info = spec.config, spec.dataset
    if spec.pid_dir:
        import os

        pid_dir = Path(spec.pid_dir)
        pid_dir.mkdir(parents=True, exist_ok=True)
        (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))

    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    setup_deepspeed(shm_comm=config.shm_comm)
    import deepspeed  # noqa: F401  (imported here, so ``load`` is the loading alone)
    import transformers  # noqa: F401

    import peft_core  # noqa: F401

    phases.switch("data")
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    precision = resolve_precision(config, device.type)
    collate = Collator(info)
    train_rows = read_split(info, "train")
    eval_rows = read_split(info, "eval")
    batches = TrainBatches(train_rows, collate, batch_size=config.batch_size,
                           micro_batch_size=config.micro_batch_size, rank=rank, world=world,
                           seed=config.seed)
    ebs = config.eval_batch_size or config.micro_batch_size
    evals = eval_batches(eval_rows, collate, batch_size=ebs, rank=rank, world=world,
                         max_batches=config.max_eval_batches)
    fallback = collate(eval_rows[:1] or train_rows[:1])
    # Base weights in the compute dtype; DeepSpeed keeps fp32 master copies of the
    # trainable ones in bf16 mode.
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return Worker(spec, rank, world, device, phases, started, precision, dtype,
                  build_ds_config(config, device_type=device.type), sharding_for(config),
                  objective_for(info, config.objective), batches, evals, fallback)


def memory(device: torch.device) -> dict[str, float]:
    """Peak and current memory of the largest rank (a collective)."""
    peak, now = M.all_reduce([M.peak_mem_mb(device), M.rss_mb()], "max")
    return {M.PEAK_MEM_MB: peak, "rss_mb": now}


def pipeline_info(config: TrainConfig, info: Manifest) -> dict[str, Any]:
    """What an adapter folder records of its training (evaluate/serve load the base as it
    was trained on, quantized or not)."""
    return {
        "model": config.model.name,
        "quantization": (config.model.quantization.model_dump()
                         if config.model.quantization else None),
        "task": info.task,
        "tokenizer": info.tokenizer_name,
        "label_names": info.label_names,
        "max_length": info.max_length,
        "dataset_id": info.dataset_id,
    }


def _resource_wait_s() -> float:
    """How long this worker's placement group waited to be placed (GCS's record of it); 0
    outside a placement group or when the record is not there."""
    from ray.util.placement_group import get_current_placement_group, placement_group_table

    pg = get_current_placement_group()
    if pg is None:
        return 0.0
    try:
        stats = placement_group_table(pg).get("stats") or {}
    except Exception:  # an older GCS without stats: the wait stays in worker_start
        return 0.0
    return float(stats.get("end_to_end_creation_latency_ms") or 0.0) / 1000.0


def _process_started_at() -> float | None:
    """When this worker's process was created (``time.time()`` scale), None if unknown."""
    try:
        import psutil  # a dependency of ray[default]
    except ImportError:
        return None
    return psutil.Process().create_time()


def charge_start(phases: M.Phases, started_at: float | None, entered: float) -> None:
    """Charge the time from the trial's start (``started_at``, the trial driver's clock on
    the same node, or the trainer's construction) to this function's first line: the
    placement group's wait; until this worker's process was created, the rest to
    ``controller``; from then on to ``worker_start`` (all of it when the process is older
    than the trial: Ray handed out a process it had started before). A worker group started
    again after a failure counts from the same start, so its failed attempt lands here."""
    if started_at is None:
        return
    before = max(0.0, entered - started_at)
    wait = min(_resource_wait_s(), before)
    created = _process_started_at()
    until_process = (min(max(0.0, created - started_at), before)
                     if created is not None else 0.0)
    phases.add("wait", wait)
    phases.add("controller", max(0.0, until_process - wait))
    phases.add("worker_start", before - max(until_process, wait))
