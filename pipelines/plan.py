"""Memory per device before launch: what each ZeRO stage and offload choice would hold.

    from pipelines.plan import plan, parse_size
    p = plan(recipe, gpus=8, gpu_mem_bytes=parse_size("80GB"), nodes=1)
    for c in p.choices: print(c.stage, c.offload, c.peak, c.fits)

The model is built from its config only, on PyTorch's ``meta`` device (shapes, no storage,
no weights read), so an 8B or 70B model is planned in seconds on a laptop. The recipe's
method is injected on that empty model to count its trainable parameters, and one training
step on it (the same transformers and peft_core code that trains, at the recipe's
micro-batch and length) is counted tensor by tensor for the activations.

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

On CPU (no ``gpus``) the ranks are the recipe's ``train.num_workers`` processes, memory is
RAM per process (peak RSS, what the training stage reports as ``peak_mem_mb``), and the peak
is the larger of loading (each rank of stages 0-2 loads the whole model; ZeRO-3 loads its
partition, one tensor whole at a time) and training. Three CPU terms are measured or fitted
rather than derived (see their constants): glibc's retained heap, the memory-mapped
checkpoint pages the ZeRO-3 loader reads, and the RSS cost of gloo all-gathers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

#: Nodes with more GPUs than this are not built (8 per HGX/DGX board, the largest common).
MAX_GPUS_PER_NODE = 8

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

Offload = Literal["none", "optimizer", "optimizer+param"]
OFFLOADS: tuple[Offload, ...] = ("none", "optimizer", "optimizer+param")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class PlanError(ValueError):
    """Bad input to the planner; the message starts with the field (``--gpus: ...``)."""


def parse_size(text: str, field: str = "--gpu-mem") -> int:
    """Bytes in ``80GB`` (10^9), ``80GiB`` (2^30), ``512MB``, ``1.5TB``; a unit is required."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise PlanError(f"{field}: cannot read {text!r} as a memory size; expected a number "
                        f"and a unit, e.g. 80GB, 80GiB or 512MB (units: {', '.join(_UNITS)})")
    value = float(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise PlanError(f"{field}: {text!r} is not a usable memory size; expected more than 0")
    return int(value)


# -- results ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Choice:
    """Predicted bytes per rank on the device (GPU memory, or RAM per process on CPU) for
    one ZeRO stage and offload choice; ``host`` is what offload moves to host RAM per rank."""

    stage: int
    offload: Offload
    base_params: int
    trainable_params: int
    gradients: int
    optimizer_states: int
    zero_buffers: int
    activations: int
    heap_retained: int  # CPU only: freed activation memory glibc keeps (0 on GPUs)
    overhead: int
    load_peak: int  # model bytes resident while loading (before training starts)
    host: int
    fits: bool

    @property
    def steady(self) -> int:
        """Bytes at the training step's peak (without the fixed overhead). Retained heap is
        reused by gradients and optimizer states, so only what exceeds them adds."""
        return (self.base_params + self.trainable_params + self.zero_buffers + self.activations
                + max(self.heap_retained, self.gradients + self.optimizer_states))

    @property
    def peak(self) -> int:
        """The rank's peak: the fixed overhead plus the larger of loading and training."""
        return self.overhead + max(self.steady, self.load_peak)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The planned model and run, and one :class:`Choice` per stage and offload."""

    model: str
    architecture: str
    base_params: int  # the model's own parameters (what its config defines)
    total_params: int  # with the method's added parameters
    trainable_params: int
    trainable_source: str  # how the trainable count was obtained
    method: str
    precision: Literal["fp32", "bf16"]
    device: Literal["cuda", "cpu"]
    world_size: int
    nodes: int
    ranks_per_node: int
    device_mem: int
    micro_batch_size: int
    max_length: int
    gradient_checkpointing: bool
    recipe_choice: tuple[int, Offload]
    choices: tuple[Choice, ...]
    notes: tuple[str, ...] = ()

    def choice(self, stage: int, offload: Offload = "none") -> Choice:
        for c in self.choices:
            if c.stage == stage and c.offload == offload:
                return c
        raise KeyError((stage, offload))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["choices"] = [{**dataclasses.asdict(c), "peak": c.peak} for c in self.choices]
        return d


# -- the model, from its config ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Activations:
    peak: int  # live tensors at the step's peak, parameters and their gradients excluded
    saved: int  # what autograd keeps at the end of the forward pass
    per_block: tuple[int, ...]  # of which saved inside each transformer block
    gradient_checkpointing: bool = False
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class _Model:
    architecture: str
    numels: tuple[tuple[int, bool], ...]  # (elements, trainable) per parameter tensor
    largest_module: int  # parameters one module owns directly (what ZeRO-3 gathers at once)
    base_params: int
    trainable: int
    trainable_source: str
    activations: _Activations


def _hf_config(name: str):
    from transformers import AutoConfig

    from . import models

    try:
        return AutoConfig.from_pretrained(models.resolve(name))
    except Exception as e:  # transformers raises OSError/ValueError/KeyError variously
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"model: cannot read the config of {name!r}: {first}") from None


def _attention(module, query, key, value, attention_mask, **kwargs):
    """Stands in for SDPA on the meta model, keeping what flash / memory-efficient kernels
    save for backward (q, k, v, output, fp32 log-sum-exp); on meta tensors PyTorch would
    take the math path, which stores the full attention matrix, which no training kernel
    does (on CPU the flash kernel runs too)."""
    import torch

    class _Saved(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = torch.empty_like(q)
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            # the gradients the real kernels return (their values do not matter here)
            q, k, v, _, _ = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    out = _Saved.apply(query, key, value)
    return out.transpose(1, 2).contiguous(), None


_ATTN = "peftpipe_plan_meta"


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTN, _attention)


def _meta_model(cfg, task: str, dtype, num_labels: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _register_attention()
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    kwargs = {"num_labels": num_labels} if task == "classification" else {}
    try:
        if kwargs:
            cfg.num_labels = num_labels
        with torch.device("meta"):
            return cls.from_config(cfg, dtype=dtype, attn_implementation=_ATTN)
    except Exception as e:
        raise PlanError(f"model: transformers cannot build {cfg.model_type!r} for task "
                        f"{task!r}: {e}") from None


def _inject(model, method_cfg: Mapping[str, Any]):
    """``(PeftModel or None, method)``: the method on the meta model; None where the method
    must read weight values to inject (PaFi picks the smallest |W|)."""
    import peft_core
    from peft_core import targets

    try:
        pm = peft_core.apply(model, method_cfg)
        return pm, pm.method
    except NotImplementedError:
        # apply() fingerprints the base by sampling weight values, which meta tensors do not
        # have; do what apply does after that (freeze, train new heads, inject) by hand.
        pass
    config = peft_core.MethodConfig.from_dict(dict(method_cfg))
    method = peft_core.get(config.name)(config)
    model.requires_grad_(False)
    if config.train_head:
        for head in targets.new_task_heads(model):
            model.get_submodule(head).requires_grad_(True)
    try:
        method.inject(model)
    except NotImplementedError:
        return None, method
    return peft_core.PeftModel(model, method, {}), method


def _count(model, method_cfg: Mapping[str, Any]) -> tuple[Any, int, str, list[str]]:
    """(module to run forward on, trainable count, how it was counted, notes)."""
    import peft_core

    notes = []
    try:
        pm, method = _inject(model, method_cfg)
    except peft_core.PeftError as e:  # e.g. target modules this architecture does not have
        raise PlanError(f"train.method: {e}") from None
    formula = method.expected_trainable_params
    name = method.config.name
    if pm is None:
        if formula is None:
            raise PlanError(f"train.method: {name!r} reads weight values when it is injected and "
                            "documents no expected_trainable_params; it cannot be planned from a "
                            "config alone")
        notes.append(f"{name} chooses its weights from their values at injection: trainable count "
                     "from its expected_trainable_params, activations of the frozen base model "
                     "alone (an underestimate)")
        return model, int(formula(model)), "expected_trainable_params", notes
    counted = pm.summary()["trainable_params"]
    if formula is not None:
        # The documented count once training runs (SAM's mask exists only after prepare).
        expected = int(formula(pm.base_model))
        if expected != counted:
            notes.append(f"{name}: {counted:,} trainable at injection, {expected:,} once its "
                         "prepare pass has chosen them (planned with the latter; activations "
                         "as at injection, an underestimate)")
        return pm, expected, "expected_trainable_params", notes
    return pm, counted, "counted on the meta model", notes


@contextlib.contextmanager
def _saved_tensors(model) -> Iterator[dict[str, Any]]:
    """Record every tensor autograd saves during a forward, once per storage, attributed to
    the transformer block that saved it; parameters and buffers (weights kept for the input
    gradient) are not activations and are skipped."""
    import torch

    from peft_core import targets

    blocks = [m for _, m in targets.blocks(model)] if _has_blocks(model) else []
    skip = {id(t.untyped_storage()) for t in [*model.parameters(), *model.buffers()]}
    state: dict[str, Any] = {"block": None, "per_block": [0] * len(blocks), "outside": 0,
                             "seen": set(), "keep": []}

    def pack(t):
        st = t.untyped_storage()
        key = id(st)
        if key in skip or key in state["seen"]:
            return t
        state["seen"].add(key)
        state["keep"].append(st)  # ids stay unique while the storages live
        n = st.nbytes()
        if state["block"] is None:
            state["outside"] += n
        else:
            state["per_block"][state["block"]] += n
        return t

    def enter(i):
        def hook(_, __):
            state["block"] = i
        return hook

    def leave(_, __, ___):
        state["block"] = None

    handles = []
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(enter(i)))
        handles.append(b.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield state
    finally:
        for h in handles:
            h.remove()


def _has_blocks(model) -> bool:
    from peft_core import targets

    try:
        return bool(targets.blocks(model))
    except Exception:  # an architecture peft_core has no table entry for
        return False


@contextlib.contextmanager
def _live_tensors(existing: Iterable[Any] = ()) -> Iterator[dict[str, int]]:
    """Bytes of every tensor an op creates while the context is open, alive and at peak;
    views of the ``existing`` tensors (parameters: ``W.t()`` in every linear) are not new.

    Isolated here because it uses ``torch.utils._python_dispatch.TorchDispatchMode``, the
    documented ``__torch_dispatch__`` extension point (the module name is underscored): it
    sees each op's outputs, including backward's, on the meta device too, where PyTorch's
    memory statistics do not exist. A storage is counted once, freed when it is collected.
    """
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    state = {"now": 0, "peak": 0}
    keep = [t.untyped_storage() for t in existing]  # alive, so their ids stay theirs
    seen: set[int] = {id(st) for st in keep}

    def free(key: int, n: int) -> None:
        state["now"] -= n
        seen.discard(key)

    class _Live(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    if id(st) in seen:
                        continue
                    seen.add(id(st))
                    n = st.nbytes()
                    state["now"] += n
                    state["peak"] = max(state["peak"], state["now"])
                    weakref.finalize(st, free, id(st), n)
            return out

    with _Live():
        yield state


def _activations(runner, task: str, micro: int, seq: int, *, gradient_checkpointing: bool,
                 grad_bytes: int) -> _Activations:
    """One training step (forward, loss, backward) of ``runner`` on the meta device at
    ``micro`` x ``seq`` tokens: the peak of live tensors, with the output (logits) kept alive
    through backward as the training loop keeps it."""
    import torch

    base = getattr(runner, "base_model", runner)
    note = None
    if gradient_checkpointing:
        try:
            with warnings.catch_warnings():  # transformers' renaming notice is not the user's
                warnings.simplefilter("ignore", FutureWarning)
                runner.enable_gradient_checkpointing()
        except Exception as e:  # prefix methods refuse it
            gradient_checkpointing, note = False, f"planned without gradient checkpointing: {e}"
    runner.train()
    ids = torch.empty((micro, seq), dtype=torch.long, device="meta")
    labels = torch.empty((micro,), dtype=torch.long, device="meta") if task == "classification" \
        else ids
    with _live_tensors([*runner.parameters(), *runner.buffers()]) as live:
        with _saved_tensors(base) as saved:
            out = runner(input_ids=ids, labels=labels)
        forward_end = live["now"]
        out.loss.backward()
        del out
    # The trainable parameters' gradients appear during backward; the planner counts them
    # as gradients, so they are taken out here (all of them: an upper bound on those alive
    # at the peak), never below what the forward pass left.
    peak = max(live["peak"] - grad_bytes, forward_end)
    return _Activations(peak, saved["outside"] + sum(saved["per_block"]),
                        tuple(saved["per_block"]), gradient_checkpointing, note)


def describe_model(name: str, method_cfg: Mapping[str, Any], *, task: str, micro: int,
                   seq: int, precision: str, num_labels: int = 2,
                   gradient_checkpointing: bool = False) -> tuple[_Model, list[str]]:
    """Parameter counts and activation bytes of ``name`` with the method, from its config."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    cfg = _hf_config(name)
    model = _meta_model(cfg, task, dtype, num_labels)
    largest_module = max((sum(p.numel() for p in m.parameters(recurse=False))
                          for m in model.modules()), default=0)
    base_params = sum(p.numel() for p in model.parameters())
    runner, trainable, source, notes = _count(model, method_cfg)
    numels = tuple((p.numel(), p.requires_grad) for p in model.parameters())
    if source == "expected_trainable_params":
        counted = sum(n for n, t in numels if t)
        if counted != trainable:
            # The extra trainable tensors appear in prepare; plan them as one more tensor.
            numels += ((trainable - counted, True),) if trainable > counted else ()
    grad_bytes = trainable * (2 if precision == "bf16" else 4)
    kw = dict(gradient_checkpointing=gradient_checkpointing, grad_bytes=grad_bytes)
    try:
        acts = _activations(runner, task, micro, seq, **kw)
    except Exception as e:  # a method's forward that needs real values
        try:
            acts = _activations(getattr(runner, "base_model", runner), task, micro, seq, **kw)
            acts = dataclasses.replace(acts, note=f"activations of the base model alone: the "
                                       f"method's forward cannot run on an empty model ({e})")
        except Exception as e2:
            acts = _Activations(0, 0, (), note=f"activations not estimated: {e2}")
    if acts.note:
        notes.append(acts.note)
    arch = type(model).__name__
    return _Model(arch, numels, largest_module, base_params, trainable, source, acts), notes


# -- the accounting ---------------------------------------------------------------------------

def _ds_settings(train_cfg, device_type: str,
                 overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """Bucket sizes and thresholds as our DeepSpeed config sets them for ``device_type``
    (DeepSpeed's defaults otherwise); ``overrides`` (``stage3_`` prefix optional) win."""
    from .train.deepspeed_config import build

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


def _choice(m: _Model, *, stage: int, offload: Offload, world: int, d: int, gpu: bool,
            ds: Mapping[str, float], overhead: int, device_mem: int) -> Choice:
    n = world
    trainable = m.trainable
    persist = ds["stage3_param_persistence_threshold"]

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
    # On CPU the "device" is host RAM: offloading moves bytes within the same process.
    moved: Offload = offload if gpu else "none"
    if stage == 3 and moved == "optimizer+param":
        host_params = base + train_p
        whole = sum(k for k, _ in m.numels if k < persist) * d  # persistent ones stay
        base, train_p = whole, 0
    else:
        host_params = 0
    # gradients: the dtype-d gradients (partitioned from stage 2), and the fp32 copy the
    # optimizer steps on (partitioned from stage 1; the bf16 stage-0/1 wrappers keep it whole)
    grad_low = trainable * d if stage < 2 else -(-trainable // n) * d
    if d == 4:
        grad_fp32 = 0 if stage == 0 else -(-trainable // n) * 4
    else:
        grad_fp32 = trainable * 4 if stage <= 1 and moved == "none" else -(-trainable // n) * 4
    master = trainable * 4 if d == 2 else 0
    moments = trainable * 8
    if stage == 0:
        optim = master + moments
    else:
        optim = (trainable * 4 + moments) // n  # ZeRO keeps an fp32 partition even in fp32
    host = host_params
    if moved != "none":
        host += optim + grad_fp32
        optim, grad_fp32 = 0, 0
        if stage == 3:
            grad_low = 0  # ZeRO-3's gradient partitions live with the offloaded optimizer
    grads = grad_low + grad_fp32
    # reduction bucket: a GPU allocates it whole; on CPU only the pages written count
    buffers = 0
    if stage >= 1:
        bucket = ds["reduce_bucket_size"]
        buffers += int(bucket if gpu else min(bucket, trainable)) * (4 if stage == 1 else d)
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
    act = m.activations.peak
    heap = 0 if gpu else int(CPU_HEAP_RETENTION * act)
    # loading: stages 0-2 build the whole model on each rank; ZeRO-3 loads partitioned
    # (each rank keeps its slice, one tensor is whole at a time)
    if stage == 3:
        biggest = max((k for k, _ in m.numels), default=0) * d
        load = (0 if moved == "optimizer+param" else base + train_p) + biggest
        if not gpu:
            # the memory-mapped checkpoint pages this rank reads (see the constants)
            load += int(CPU_ZERO3_LOAD_PAGES_FACTOR * (base + train_p)) + CPU_ZERO3_LOAD_CONST_BYTES
    else:
        load = sum(k for k, _ in m.numels) * d
    if stage == 3 and not gpu:
        overhead += CPU_ZERO3_EXTRA_BYTES
    c = Choice(stage, offload, base, train_p, grads, optim, buffers, act, heap, overhead, load,
               host, fits=False)
    return dataclasses.replace(c, fits=c.peak <= device_mem)


def _world(gpus: int | None, nodes: int | None, workers: int) -> tuple[int, int, int]:
    """(world size, nodes, ranks per node), checking that such a cluster can exist."""
    if gpus is None:
        if nodes not in (None, 1):
            raise PlanError("--nodes: a multi-node plan needs --gpus (the total GPU count)")
        return workers, 1, workers
    if nodes is None:
        nodes = 1
    if nodes < 1:
        raise PlanError(f"--nodes: expected at least 1 node, got {nodes}")
    if gpus < 1:
        raise PlanError(f"--gpus: expected at least 1 GPU, got {gpus}")
    if gpus % nodes:
        raise PlanError(f"--gpus: {gpus} GPUs cannot be split evenly over {nodes} nodes; "
                        f"expected a multiple of {nodes}")
    per = gpus // nodes
    if per > MAX_GPUS_PER_NODE:
        raise PlanError(f"--gpus: {gpus} GPUs on {nodes} node(s) is {per} per node; a node has "
                        f"at most {MAX_GPUS_PER_NODE} (use --nodes {-(-gpus // MAX_GPUS_PER_NODE)} "
                        "or more)")
    return gpus, nodes, per


def _ram_per_rank(ranks: int) -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        raise PlanError("--gpu-mem: cannot read this machine's RAM; give the memory per "
                        "rank") from None
    return total // ranks


def plan_train(train: Any, *, max_length: int, task: str = "causal_lm", gpus: int | None = None,
               gpu_mem_bytes: int | None = None, nodes: int | None = None,
               num_labels: int = 2, zero_settings: Mapping[str, float] | None = None) -> Plan:
    """Plan a :class:`pipelines.train.TrainConfig` (or its dict) at sequence ``max_length``.

    ``gpus``: total GPUs over ``nodes`` nodes (None plans CPU ranks: ``train.num_workers``
    processes); ``gpu_mem_bytes``: memory per device (per process on CPU; default the
    machine's RAM split over the ranks). ``zero_settings``: DeepSpeed ZeRO values to plan
    with instead of our config's (e.g. ``{"max_reuse_distance": 0}``, what a past run used).
    """
    from pydantic import ValidationError

    from .train.config import TrainConfig

    if not isinstance(train, TrainConfig):
        try:
            train = TrainConfig.model_validate(dict(train))
        except ValidationError as e:
            from .recipe import format_errors

            raise PlanError(format_errors(e, source="train")) from None
    if max_length < 1:
        raise PlanError(f"data.max_length: expected a positive length, got {max_length}")
    world, nodes, per_node = _world(gpus, nodes, train.num_workers)
    gpu = gpus is not None
    if gpu_mem_bytes is not None and gpu_mem_bytes < 1:
        raise PlanError(f"--gpu-mem: expected more than 0 bytes, got {gpu_mem_bytes}")
    mem = gpu_mem_bytes if gpu_mem_bytes is not None else (
        None if gpu else _ram_per_rank(per_node))
    if mem is None:
        raise PlanError("--gpu-mem: the memory of one GPU is needed with --gpus (e.g. 80GB)")
    precision = train.precision if train.precision != "auto" else ("bf16" if gpu else "fp32")
    d = 2 if precision == "bf16" else 4
    model, notes = describe_model(train.model.name, train.method, task=task,
                                  micro=train.micro_batch_size, seq=max_length,
                                  precision=precision, num_labels=num_labels,
                                  gradient_checkpointing=train.gradient_checkpointing)
    ds = _ds_settings(train, "cuda" if gpu else "cpu", zero_settings)
    overhead = GPU_PROCESS_OVERHEAD_BYTES if gpu else CPU_PROCESS_OVERHEAD_BYTES
    choices = []
    for stage in (0, 1, 2, 3):
        for off in OFFLOADS:
            if (off == "optimizer" and stage == 0) or (off == "optimizer+param" and stage != 3):
                continue
            choices.append(_choice(model, stage=stage, offload=off, world=world, d=d, gpu=gpu,
                                   ds=ds, overhead=overhead, device_mem=mem))
    z = train.zero
    current: tuple[int, Offload] = (z.stage, "optimizer+param" if z.offload_param else
                                    "optimizer" if z.offload_optimizer else "none")
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
    return Plan(
        model=train.model.name, architecture=model.architecture,
        base_params=model.base_params,
        total_params=sum(k for k, _ in model.numels), trainable_params=model.trainable,
        trainable_source=model.trainable_source, method=train.method["name"],
        precision=precision, device="cuda" if gpu else "cpu", world_size=world, nodes=nodes,
        ranks_per_node=per_node, device_mem=mem, micro_batch_size=train.micro_batch_size,
        max_length=max_length, gradient_checkpointing=train.gradient_checkpointing,
        recipe_choice=current, choices=tuple(choices), notes=tuple(notes))


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


# -- printing ---------------------------------------------------------------------------------

def _gib(b: int) -> str:
    return f"{b / 2**30:.2f}"


def format_plan(p: Plan) -> str:
    """The plan as the table ``peftpipe plan`` prints (GiB per rank)."""
    where = (f"{p.world_size} GPU(s) on {p.nodes} node(s), {_gib(p.device_mem)} GiB each"
             if p.device == "cuda" else
             f"{p.world_size} CPU rank(s) (train.num_workers), {_gib(p.device_mem)} GiB RAM each")
    lines = [
        f"model {p.model} ({p.architecture}): {p.base_params / 1e9:.3f}B parameters; "
        f"{p.method} trains {p.trainable_params:,} "
        f"({100 * p.trainable_params / max(1, p.total_params):.3f}%, "
        f"{p.trainable_source})",
        f"{where}; {p.precision}; micro-batch {p.micro_batch_size} x {p.max_length} tokens; "
        f"gradient checkpointing {'on' if p.gradient_checkpointing else 'off'}",
        "",
        "GiB per rank" + (" (device)" if p.device == "cuda" else " (RSS)"),
    ]
    cols = ["zero", "offload", "base", "trainable", "grads", "optim", "buffers", "activ",
            *(["heap"] if p.device == "cpu" else []), "overhead", "load", "peak", "host", "fits"]
    rows = []
    for c in p.choices:
        mark = "*" if (c.stage, c.offload) == p.recipe_choice else ""
        rows.append([f"{c.stage}{mark}", c.offload, _gib(c.base_params), _gib(c.trainable_params),
                     _gib(c.gradients), _gib(c.optimizer_states), _gib(c.zero_buffers),
                     _gib(c.activations), *([_gib(c.heap_retained)] if p.device == "cpu" else []),
                     _gib(c.overhead), _gib(c.load_peak), _gib(c.peak),
                     _gib(c.host), "yes" if c.fits else "no"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(cols)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(cols, widths)))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines.append("")
    lines.append("* the recipe's train.zero; peak = overhead + max(load, the training terms); "
                 "host = RAM per rank that offload uses")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
