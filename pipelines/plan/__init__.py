"""Memory per device before launch: what each ZeRO stage and offload choice would hold.

    from pipelines.plan import plan, parse_size
    p = plan(recipe, gpus=8, gpu_mem_bytes=parse_size("80GB"), nodes=1)
    for c in p.choices: print(c.stage, c.offload, c.peak, c.fits)

The model is built from its config only, on PyTorch's ``meta`` device (shapes, no storage,
no weights read), so an 8B or 70B model is planned in seconds on a laptop. The recipe's
method is injected on that empty model to count its trainable parameters, and one training
step on it (the same transformers and peft_core code that trains, at the recipe's
micro-batch and length) is counted tensor by tensor for the activations.

On CPU (no ``gpus``) the ranks are the recipe's ``train.num_workers`` processes and memory
is RAM per process.

The modules, one job each: :mod:`.inputs` (memory sizes, the cluster's shape,
:class:`PlanError`), :mod:`.meta_model` (the model and method on the meta device, their
parameter counts), :mod:`.activations` (one training step counted op by op),
:mod:`.memory` (the per-rank accounting per ZeRO stage x offload, its measured constants),
:mod:`.result` (:class:`Plan`, :class:`Choice`), :mod:`.render` (the printed table) and
:mod:`.planner` (:func:`plan`, :func:`plan_train`: the parts put together).
"""

from .inputs import MAX_GPUS_PER_NODE, PlanError, parse_size
from .memory import (
    CPU_HEAP_RETENTION,
    CPU_PROCESS_OVERHEAD_BYTES,
    CPU_ZERO3_EXTRA_BYTES,
    CPU_ZERO3_GATHER_CONST_BYTES,
    CPU_ZERO3_GATHER_FACTOR,
    CPU_ZERO3_LOAD_CONST_BYTES,
    CPU_ZERO3_LOAD_PAGES_FACTOR,
    GPU_PROCESS_OVERHEAD_BYTES,
)
from .meta_model import ModelDescription, describe_model
from .planner import plan, plan_train
from .render import format_plan
from .result import OFFLOADS, Choice, Offload, Plan

__all__ = [
    "CPU_HEAP_RETENTION", "CPU_PROCESS_OVERHEAD_BYTES", "CPU_ZERO3_EXTRA_BYTES",
    "CPU_ZERO3_GATHER_CONST_BYTES", "CPU_ZERO3_GATHER_FACTOR", "CPU_ZERO3_LOAD_CONST_BYTES",
    "CPU_ZERO3_LOAD_PAGES_FACTOR", "GPU_PROCESS_OVERHEAD_BYTES", "MAX_GPUS_PER_NODE",
    "OFFLOADS", "Choice", "ModelDescription", "Offload", "Plan", "PlanError", "describe_model",
    "format_plan", "parse_size", "plan", "plan_train",
]
