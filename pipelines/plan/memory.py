"""The per-rank memory model: bytes each ZeRO stage and offload choice holds per rank, term
by term, for a model described by :mod:`.meta_model`.

Per rank, for ``N`` ranks, compute dtype ``d`` bytes (fp32 4, bf16 2), trainable count ``T``
and frozen count ``F`` (the accounting follows DeepSpeed 0.19's optimizers):

- parameters: ``(F + T) d``, divided by ``N`` under ZeRO-3 (tensors smaller than the
  persistence threshold stay whole), nothing on the device with parameter offload;
- gradients: ``T d`` (stage 0-1) or ``T d / N`` (stage 2-3), plus the fp32 copy the
  optimizer steps on when ``d`` is 2;
- optimizer states: fp32 master copy + Adam's two moments, ``12 T / N`` under ZeRO 1-3
  (``8 T``, the moments only, for fp32 at stage 0; ``12 T`` for bf16 at stage 0);
  on the host with optimizer offload;
- ZeRO buffers: the gradient-reduction bucket (``reduce_bucket_size`` elements; on a GPU it
  is allocated whole, on CPU only what is written counts), and under ZeRO-3 the gathered
  working set (the largest module's parameters, the prefetch bucket, and what DeepSpeed keeps
  gathered for reuse within ``stage3_max_reuse_distance``);
- activations: the peak of live tensors over one training step (forward, loss, backward,
  with the recipe's gradient checkpointing) run on the meta model and counted op by op;
  parameters and their gradients are not in it;
- fixed overhead: the process itself (measured, see :data:`CPU_PROCESS_OVERHEAD_BYTES`);
  on CPU also the freed activation memory glibc keeps (:data:`CPU_HEAP_RETENTION`).

On CPU (no GPUs) memory is RAM per process (peak RSS, what the training stage reports as
``peak_mem_mb``), and the peak is the larger of loading (each rank of stages 0-2 loads the
whole model; ZeRO-3 loads its partition, one tensor whole at a time) and training. Three CPU
terms are measured or fitted rather than derived (see their constants): glibc's retained
heap, the memory-mapped checkpoint pages the ZeRO-3 loader reads, and the RSS cost of gloo
all-gathers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .inputs import PlanError
from .meta_model import ModelDescription
from .result import OFFLOADS, Choice, Offload

#: Peak RSS of a Ray Train worker of the training stage holding a tiny Llama (~0.1 MB of
#: weights) under DeepSpeed ZeRO-0, i.e. python + torch + transformers + DeepSpeed + Ray
#: Train + gloo + the data reader before any real weight: 612 MB with 1 and with 2 workers.
#: Measured on this project's CPU machine (2 cores, torch 2.13 CPU, DeepSpeed 0.19.8) by
#: ``python benchmarks/plan_check.py --measure-overhead`` -> benchmarks/results/plan_overhead.json
#: (a bare process importing the same stack and taking DeepSpeed steps peaks at 576 MB).
CPU_PROCESS_OVERHEAD_BYTES = 612 * 2**20
#: What a ZeRO-3 worker holds on top (its partitioning hooks and buffers, same measurement:
#: 657 MB against 612 MB at ZeRO-0).
CPU_ZERO3_EXTRA_BYTES = 45 * 2**20
#: glibc keeps freed heap memory in the process, so on CPU a training step's peak RSS exceeds
#: its peak of live tensors: over 7 measurements (random Llama 113M, LoRA r=8, fp32, micro
#: 2-8 x 128-1024 tokens, with and without checkpointing, one process) RSS grew by 1.44-1.64x
#: the live-tensor peak this module predicts (which matches a tensor-by-tensor count of the
#: same step exactly); the retained part is reused by later allocations (full fine-tuning's
#: gradients and Adam states: 0.98x predicted), so it counts only where it exceeds them.
CPU_HEAP_RETENTION = 0.5

#: On CPU (gloo), ZeRO-3 with 2+ ranks: RSS beyond the partition and the step, per byte of
#: the gathered set (the gathered tensors and the staging copies gloo's all-gather makes)
#: plus a constant (communication buffers and the heap glibc keeps from the per-module
#: gather/release churn); a single rank gathers nothing. And while loading: the
#: memory-mapped checkpoint pages each rank reads, per byte of its partition, plus a constant.
#: Fitted (not derived) on three 2-worker ZeRO-3 runs of the training stage (random Llama
#: 120M and 1B from benchmarks/results/scale.json, 320M run the same way for this fit; LoRA
#: r=8, fp32, 1 x 128 tokens, this project's ZeRO-3 loader, DeepSpeed's default bucket and
#: reuse settings): peaks 0.94 / 1.00 / 1.00, load peaks 1.02 / 0.88 / 1.06 of measured.
#: No point outside the fit checks them yet; refit when the loader or the settings change.
CPU_ZERO3_GATHER_FACTOR = 1.93
CPU_ZERO3_GATHER_CONST_BYTES = 460 * 2**20
CPU_ZERO3_LOAD_PAGES_FACTOR = 0.5
CPU_ZERO3_LOAD_CONST_BYTES = 330 * 2**20

#: GPU memory a training process holds outside its tensors: the CUDA context (287 MB with
#: lazy module loading, the default since CUDA 12.2, 667 MB eager, as measured in
#: pytorch/pytorch#86509), cuBLAS/cuDNN workspaces, NCCL's communicator buffers, and the
#: caching allocator's fragmentation. Not measured here (this project's machine has no GPU);
#: 1.5 GiB is a deliberately generous sum of those published orders of magnitude.
GPU_PROCESS_OVERHEAD_BYTES = 1536 * 2**20

#: DeepSpeed's defaults where our DeepSpeed config does not set them
#: (deepspeed/runtime/zero/config.py)
_DS_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
                "stage3_param_persistence_threshold": 1e5, "stage3_max_live_parameters": 1e9,
                "stage3_max_reuse_distance": 1e9}


def ds_settings(train_cfg: Any, device_type: str,
                overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """Bucket sizes and thresholds as our DeepSpeed config sets them for ``device_type``
    (DeepSpeed's defaults otherwise); ``overrides`` (``stage3_`` prefix optional) win."""
    from ..train.deepspeed_config import build

    try:
        ds = build(train_cfg.model_copy(update={"precision": "fp32"}), device_type=device_type)
    except TypeError:  # pragma: no cover - a build() without device_type
        ds = build(train_cfg.model_copy(update={"precision": "fp32"}))
    zero = ds.get("zero_optimization", {})
    out = dict(_DS_DEFAULTS)
    for k in out:
        if k in zero:
            out[k] = float(zero[k])
    for k, v in (overrides or {}).items():
        key = k if k in out else f"stage3_{k}"
        if key not in out:
            raise PlanError(f"zero settings: unknown {k!r}; expected one of {sorted(out)}")
        out[key] = float(v)
    return out


def choices(m: ModelDescription, *, world: int, d: int, gpu: bool, ds: Mapping[str, float],
            device_mem: int) -> tuple[Choice, ...]:
    """One :class:`Choice` per ZeRO stage and the offloads it allows (optimizer offload from
    stage 1, parameter offload at stage 3), in stage order."""
    overhead = GPU_PROCESS_OVERHEAD_BYTES if gpu else CPU_PROCESS_OVERHEAD_BYTES
    out = []
    for stage in (0, 1, 2, 3):
        for off in OFFLOADS:
            if (off == "optimizer" and stage == 0) or (off == "optimizer+param" and stage != 3):
                continue
            out.append(_choice(m, stage=stage, offload=off, world=world, d=d, gpu=gpu,
                               ds=ds, overhead=overhead, device_mem=device_mem))
    return tuple(out)


def _choice(m: ModelDescription, *, stage: int, offload: Offload, world: int, d: int,
            gpu: bool, ds: Mapping[str, float], overhead: int, device_mem: int) -> Choice:
    n = world
    persist = ds["stage3_param_persistence_threshold"]
    # On CPU the "device" is host RAM: offloading moves bytes within the same process.
    moved: Offload = offload if gpu else "none"
    base, train_p, host = _parameters(m, stage=stage, n=n, d=d, persist=persist, moved=moved)
    grad_low, grad_fp32 = _gradients(m.trainable, stage=stage, n=n, d=d, moved=moved)
    optim = _optimizer_states(m.trainable, stage=stage, n=n, d=d)
    if moved != "none":
        host += optim + grad_fp32
        optim, grad_fp32 = 0, 0
        if stage == 3:
            grad_low = 0  # ZeRO-3's gradient partitions live with the offloaded optimizer
    buffers = _zero_buffers(m, stage=stage, n=n, d=d, gpu=gpu, ds=ds)
    act = m.activations.peak
    heap = 0 if gpu else int(CPU_HEAP_RETENTION * act)
    load = _load_peak(m, stage=stage, d=d, gpu=gpu, moved=moved, resident=base + train_p)
    if stage == 3 and not gpu:
        overhead += CPU_ZERO3_EXTRA_BYTES
    c = Choice(stage, offload, base, train_p, grad_low + grad_fp32, optim, buffers, act, heap,
               overhead, load, host, fits=False)
    return dataclasses.replace(c, fits=c.peak <= device_mem)


def _parameters(m: ModelDescription, *, stage: int, n: int, d: int, persist: float,
                moved: Offload) -> tuple[int, int, int]:
    """(frozen, trainable) parameter bytes one rank holds on its device, and the bytes
    parameter offload moves to the host."""

    def resident(train_flag: bool) -> int:
        """Elements of frozen (False) or trainable (True) parameters held by one rank."""
        total = 0
        for k, t in m.numels:
            if t != train_flag:
                continue
            total += k if (stage < 3 or k < persist) else -(-k // n)
        return total

    base = resident(False) * d
    train_p = resident(True) * d
    if stage == 3 and moved == "optimizer+param":
        whole = sum(k for k, _ in m.numels if k < persist) * d  # persistent ones stay
        return whole, 0, base + train_p
    return base, train_p, 0


def _gradients(trainable: int, *, stage: int, n: int, d: int,
               moved: Offload) -> tuple[int, int]:
    """(dtype-d gradients, fp32 gradients) per rank before offload: the dtype-d gradients
    are partitioned from stage 2, the fp32 copy the optimizer steps on from stage 1 (the
    bf16 stage-0/1 wrappers keep it whole)."""
    grad_low = trainable * d if stage < 2 else -(-trainable // n) * d
    if d == 4:
        grad_fp32 = 0 if stage == 0 else -(-trainable // n) * 4
    else:
        grad_fp32 = trainable * 4 if stage <= 1 and moved == "none" else -(-trainable // n) * 4
    return grad_low, grad_fp32


def _optimizer_states(trainable: int, *, stage: int, n: int, d: int) -> int:
    """Adam's two fp32 moments, and the fp32 master copy where the weights are not fp32."""
    master = trainable * 4 if d == 2 else 0
    moments = trainable * 8
    if stage == 0:
        return master + moments
    return (trainable * 4 + moments) // n  # ZeRO keeps an fp32 partition even in fp32


def _zero_buffers(m: ModelDescription, *, stage: int, n: int, d: int, gpu: bool,
                  ds: Mapping[str, float]) -> int:
    """The gradient-reduction bucket (stage 1+) and ZeRO-3's gathered parameters."""
    # reduction bucket: a GPU allocates it whole; on CPU only the pages written count
    buffers = 0
    if stage >= 1:
        bucket = ds["reduce_bucket_size"]
        buffers += int(bucket if gpu else min(bucket, m.trainable)) * (4 if stage == 1 else d)
    if stage == 3:
        # Gathered parameters: the module running, the prefetch bucket, and every parameter
        # DeepSpeed keeps because it is used again within stage3_max_reuse_distance elements
        # of the step's module trace (partitioned_param_coordinator.__params_to_release): a
        # layer's forward use comes back in backward after twice the parameters behind it,
        # so about half that distance stays gathered at the turn from forward to backward.
        # Never more than the whole model.
        live = min(m.largest_module + ds["stage3_prefetch_bucket_size"]
                   + ds["stage3_max_reuse_distance"] / 2, sum(k for k, _ in m.numels))
        if gpu or n == 1:
            buffers += int(live * d)
        else:
            buffers += int(live * d * CPU_ZERO3_GATHER_FACTOR) + CPU_ZERO3_GATHER_CONST_BYTES
    return buffers


def _load_peak(m: ModelDescription, *, stage: int, d: int, gpu: bool, moved: Offload,
               resident: int) -> int:
    """Model bytes a rank holds while loading; ``resident``: its parameter bytes on the
    device once loaded."""
    # stages 0-2 build the whole model on each rank; ZeRO-3 loads partitioned
    # (each rank keeps its slice, one tensor is whole at a time)
    if stage != 3:
        return sum(k for k, _ in m.numels) * d
    biggest = max((k for k, _ in m.numels), default=0) * d
    load = (0 if moved == "optimizer+param" else resident) + biggest
    if not gpu:
        # the memory-mapped checkpoint pages this rank reads (see the constants)
        load += int(CPU_ZERO3_LOAD_PAGES_FACTOR * resident) + CPU_ZERO3_LOAD_CONST_BYTES
    return load
