"""``plan`` and ``plan_train``: check the run's inputs, describe the model on the meta
device, and put each ZeRO stage and offload through the memory model into one :class:`Plan`
with the notes that explain it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from . import memory
from .inputs import PlanError, cluster_shape, ram_per_rank
from .meta_model import ModelDescription, describe_model
from .result import Choice, Offload, Plan


def _train_config(train: Any) -> Any:
    """``train`` as a :class:`pipelines.train.TrainConfig` (validated from a dict)."""
    from pydantic import ValidationError

    from ..train.config import TrainConfig

    if isinstance(train, TrainConfig):
        return train
    try:
        return TrainConfig.model_validate(dict(train))
    except ValidationError as e:
        from ..recipe import format_errors

        raise PlanError(format_errors(e, source="train")) from None


def _device_mem(gpu_mem_bytes: int | None, gpu: bool, per_node: int) -> int:
    """Memory per rank: the given bytes, or on CPU this machine's RAM split over the ranks."""
    if gpu_mem_bytes is not None and gpu_mem_bytes < 1:
        raise PlanError(f"--gpu-mem: expected more than 0 bytes, got {gpu_mem_bytes}")
    mem = gpu_mem_bytes if gpu_mem_bytes is not None else (
        None if gpu else ram_per_rank(per_node))
    if mem is None:
        raise PlanError("--gpu-mem: the memory of one GPU is needed with --gpus (e.g. 80GB)")
    return mem


def _notes(model: ModelDescription, choices: tuple[Choice, ...], *, gpu: bool, precision: str,
           d: int, per_node: int) -> list[str]:
    """What the table alone does not say: precision advice, how CPU treats offload, and
    what loading and offload cost per node."""
    notes = []
    if gpu and precision == "fp32":
        notes.append("fp32 on GPUs: set train.precision: bf16 to halve parameter and "
                     "activation memory")
    if not gpu:
        notes.append("CPU: offload keeps the same bytes in the same RAM (planned as without)")
    if not gpu and any(c.stage < 3 for c in choices):
        notes.append(f"CPU: each of stages 0-2 loads the whole model in every rank "
                     f"({sum(k for k, _ in model.numels) * d / 2**30:.2f} GiB) before training")
    if gpu:
        whole = sum(k for k, _ in model.numels) * d
        notes.append(f"stages 0-2 build the whole model in host RAM in every rank before moving "
                     f"it to its GPU: {whole / 2**30:.1f} GiB per rank, "
                     f"{per_node * whole / 2**30:.1f} GiB per node while loading")
    if gpu and any(c.offload != "none" for c in choices):
        notes.append("offload moves the 'host' bytes to CPU RAM per rank: a node needs "
                     f"{per_node} x that")
    return notes


def plan_train(train: Any, *, max_length: int, task: str = "causal_lm", gpus: int | None = None,
               gpu_mem_bytes: int | None = None, nodes: int | None = None,
               num_labels: int = 2, zero_settings: Mapping[str, float] | None = None) -> Plan:
    """Plan a :class:`pipelines.train.TrainConfig` (or its dict) at sequence ``max_length``.

    ``gpus``: total GPUs over ``nodes`` nodes (None plans CPU ranks: ``train.num_workers``
    processes); ``gpu_mem_bytes``: memory per device (per process on CPU; default the
    machine's RAM split over the ranks). ``zero_settings``: DeepSpeed ZeRO values to plan
    with instead of our config's (e.g. ``{"max_reuse_distance": 0}``, what a past run used).
    """
    train = _train_config(train)
    if max_length < 1:
        raise PlanError(f"data.max_length: expected a positive length, got {max_length}")
    world, nodes, per_node = cluster_shape(gpus, nodes, train.num_workers)
    gpu = gpus is not None
    mem = _device_mem(gpu_mem_bytes, gpu, per_node)
    precision = train.precision if train.precision != "auto" else ("bf16" if gpu else "fp32")
    d = 2 if precision == "bf16" else 4
    model, notes = describe_model(train.model.name, train.method, task=task,
                                  micro=train.micro_batch_size, seq=max_length,
                                  precision=precision, num_labels=num_labels,
                                  gradient_checkpointing=train.gradient_checkpointing)
    ds = memory.ds_settings(train, "cuda" if gpu else "cpu", zero_settings)
    choices = memory.choices(model, world=world, d=d, gpu=gpu, ds=ds, device_mem=mem)
    z = train.zero
    current: tuple[int, Offload] = (z.stage, "optimizer+param" if z.offload_param else
                                    "optimizer" if z.offload_optimizer else "none")
    notes += _notes(model, choices, gpu=gpu, precision=precision, d=d, per_node=per_node)
    return Plan(
        model=train.model.name, architecture=model.architecture,
        base_params=model.base_params,
        total_params=sum(k for k, _ in model.numels), trainable_params=model.trainable,
        trainable_source=model.trainable_source, method=train.method["name"],
        precision=precision, device="cuda" if gpu else "cpu", world_size=world, nodes=nodes,
        ranks_per_node=per_node, device_mem=mem, micro_batch_size=train.micro_batch_size,
        max_length=max_length, gradient_checkpointing=train.gradient_checkpointing,
        recipe_choice=current, choices=choices, notes=tuple(notes))


def plan(recipe: Any, *, gpus: int | None = None, gpu_mem_bytes: int | None = None,
         nodes: int | None = None) -> Plan:
    """Plan a :class:`pipelines.recipe.Recipe`: its model, method, micro-batch, precision,
    gradient checkpointing and ``data.max_length`` (the longest sequence a batch can hold)."""
    labels = recipe.data.labels
    p = plan_train(recipe.train, max_length=recipe.data.max_length, task=recipe.data.task,
                   gpus=gpus, gpu_mem_bytes=gpu_mem_bytes, nodes=nodes,
                   num_labels=len(labels) if labels else 2)
    k = recipe.tune.pack if recipe.tune is not None else 1
    if k > 1:
        # not modelled: the table is one trial's; say what a pack adds to it
        p = dataclasses.replace(p, notes=(*p.notes, (
            f"tune.pack {k}: this plan is one trial's; a packed worker holds the base once "
            f"plus {k} adapters with their gradients and optimizer states, and {k} "
            "micro-batches of activations (about trainable, grads, optim and activ times "
            f"{k})")))
    return p
