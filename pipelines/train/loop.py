"""What each Ray Train worker runs: base model -> peft_core method -> DeepSpeed -> loop.

The loop knows no method by name: it calls the method's hooks (``prepare`` before training,
``on_step`` and ``regularizer`` every step, ``finalize`` after) through
:class:`peft_core.PeftModel`, and optimises the method's own parameter groups.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..data.manifest import Manifest
from . import checkpoint as ckpt
from . import metrics as M
from .config import TrainConfig, import_plugins
from .data import Collator, TrainBatches, eval_batches, read_split
from .deepspeed_config import build as build_ds_config
from .deepspeed_config import resolve_precision, setup_deepspeed


def lr_lambda(config: TrainConfig):
    """Multiplier of each group's base rate at optimizer step ``s`` (0-based): linear warmup,
    then cosine or linear decay to ``min_lr_ratio``, or constant."""
    warm, total, floor = config.warmup_steps, config.max_steps, config.min_lr_ratio

    def f(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warm) / max(1, total - warm))
        if config.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _label_tokens(batch: dict[str, torch.Tensor], is_lm: bool) -> int:
    """Targets the loss averages over: shifted non-masked labels for LMs, rows otherwise."""
    if is_lm:
        return int((batch["labels"][:, 1:] != -100).sum())
    return int(batch["labels"].numel())


class EvalSums:
    """Running sums of one model's evaluation over this rank's eval batches: token-weighted
    loss, accuracy (token accuracy for LMs) and, with ``calibrate`` (classification), the
    softmax's calibration. :meth:`result` combines every rank's sums (a collective)."""

    def __init__(self, info: Manifest, *, calibrate: bool = False):
        self.info = info
        self.loss_sum = self.weight = self.correct = self.count = 0.0
        self.calib = M.Calibration() if calibrate and not info.is_lm else None

    def add(self, loss: float, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        w = _label_tokens(batch, self.info.is_lm)
        if w:
            self.loss_sum += loss * w
            self.weight += w
        labels = batch["labels"].to(logits.device)
        if self.info.is_lm:
            # Token accuracy over trained positions; logits are tail-aligned with the labels
            # (prompt methods prepend virtual tokens to the logits, not to the labels).
            L = labels.shape[1]
            pred = logits[:, -L:][:, :-1].argmax(-1)
            tgt = labels[:, 1:]
            mask = tgt != -100
            self.correct += float((pred[mask] == tgt[mask]).sum())
            self.count += float(mask.sum())
        else:
            self.correct += float((logits.argmax(-1) == labels).sum())
            self.count += float(labels.numel())
            if self.calib is not None:
                self.calib.add(torch.softmax(logits.float(), -1), labels)

    def result(self) -> dict[str, float]:
        loss_sum, weight, correct, count = M.all_reduce(
            [self.loss_sum, self.weight, self.correct, self.count])
        eval_loss = loss_sum / weight if weight else math.nan
        out = {M.EVAL_LOSS: eval_loss}
        if self.info.is_lm:
            out[M.PERPLEXITY] = math.exp(min(eval_loss, 50.0))
            out["eval_token_accuracy"] = correct / count if count else math.nan
        else:
            out[M.EVAL_ACCURACY] = correct / count if count else math.nan
            if self.calib is not None:
                c = self.calib.summarise()
                out.update({M.EVAL_ECE: c[M.EVAL_ECE], M.EVAL_NLL: c[M.EVAL_NLL]})
        return out


@torch.no_grad()
def evaluate(engine: Any, batches: list[dict[str, torch.Tensor] | None],
             fallback: dict[str, torch.Tensor], info: Manifest, device: torch.device,
             *, calibrate: bool = False) -> dict[str, float]:
    """Token-weighted eval loss (and accuracy) over every rank's shard of the eval split;
    ``calibrate`` (classification) adds ``eval_ece`` and ``eval_nll`` of the softmax."""
    engine.eval()
    sums = EvalSums(info, calibrate=calibrate)
    for b in batches:
        real = b is not None
        out = engine(**_to(b if real else fallback, device))
        if real:  # ZeRO-3's forward is collective: a rank with no rows still takes part
            sums.add(float(out.loss), out.logits, b)
    engine.train()
    return sums.result()


def final_eval(engine: Any, peft_model: Any, batches: list[dict[str, torch.Tensor] | None],
               fallback: dict[str, torch.Tensor], info: Manifest, device: torch.device,
               stage: int) -> dict[str, float]:
    """The last evaluation of a run: :func:`evaluate` with calibration for classifiers, and
    for a fitted ``laplace_lora`` its posterior predictive in place of the MAP scores (kept
    as ``eval_map_*``), since the predictive is what serving and promotion use. Under
    ZeRO-3 the predictive is not computed here (its Jacobian pass is not a collective every
    rank would join); the MAP scores stand, ``laplace_predictive`` 0."""
    out = evaluate(engine, batches, fallback, info, device, calibrate=True)
    if info.is_lm or not M.uses_posterior(peft_model):
        return out
    if stage == 3:
        return {**out, M.LAPLACE_PREDICTIVE: 0.0}
    post = M.posterior_eval(peft_model, batches, device)
    mapped = {f"eval_map_{k[len('eval_'):]}": v for k, v in out.items() if k in post}
    return {**out, **mapped, **post, M.LAPLACE_PREDICTIVE: 1.0}


def _memory(device: torch.device) -> dict[str, float]:
    """Peak and current memory of the largest rank."""
    peak, now = M.all_reduce([M.peak_mem_mb(device), M.rss_mb()], "max")
    return {M.PEAK_MEM_MB: peak, "rss_mb": now}


def _has_hook(peft_model: Any, name: str) -> bool:
    from peft_core import Method

    return getattr(type(peft_model.method), name) is not getattr(Method, name)


def _release_freed_tensors_to_the_os() -> None:
    """Make glibc return every large freed block to the OS at once (Linux only).

    glibc serves allocations below a threshold from its heap and raises that threshold
    (up to 32 MiB) whenever a larger block is freed; under ZeRO-3 every gathered weight is
    such a block, so its successors stay in a fragmented heap that RSS keeps counting. A
    fixed 1 MiB threshold (as ``MALLOC_MMAP_THRESHOLD_`` would set at process start) maps
    large tensors separately. Measured on a 1.4 GB Llama, 2 ranks, ZeRO-3: per-rank peak
    RSS after loading 2441 -> 1676 MB, after the first step 2799 -> 1848 MB.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    m_mmap_threshold = -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 20)


def _load_base(config: TrainConfig, info: Manifest, ds_config: dict[str, Any],
               dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """The base model: built partitioned under ZeRO-3 (no rank holds it whole), else loaded
    whole; in the run's compute dtype either way."""
    from pipelines.models import load_model

    if config.zero.stage == 3:
        from .partitioned import load

        return load(config.model.name, info.task, num_labels=info.num_labels, dtype=dtype,
                    ds_config=ds_config)
    return load_model(config.model.name, info.task, num_labels=info.num_labels, dtype=dtype,
                      quantization=config.model.quantization), None


def _prepare(peft_model: Any, common: list[dict[str, torch.Tensor]], config: TrainConfig,
             ds_config: dict[str, Any]) -> None:
    """The method's pass before training (e.g. SAM's scoring, which needs backward passes).

    Under ZeRO-3 the base weights exist only as partitions; a throwaway engine without an
    optimizer lends the pass DeepSpeed's gather/release hooks, and is torn down before the
    training engine is built over the parameters ``prepare`` may have created.
    """
    import deepspeed

    if config.zero.stage != 3 or not _has_hook(peft_model, "prepare"):
        peft_model.prepare(common)
        return
    scratch = {k: v for k, v in ds_config.items() if k not in ("optimizer", "gradient_clipping")}
    engine, *_ = deepspeed.initialize(model=peft_model, config=scratch, dist_init_required=False)
    try:
        peft_model.prepare(common)
    finally:
        engine.destroy()


def _finalize(engine: Any, peft_model: Any, common: list[dict[str, torch.Tensor]],
              stage: int) -> None:
    """The method's pass after training. A pass that rewrites the method's own tensors runs
    on them whole (ZeRO-3 gathers those, never the base; rank 0's result is kept); base
    weights are gathered by the forward hooks as in training."""
    if stage != 3:
        peft_model.finalize(common)
        return
    if peft_model.method.finalize_writes_params:
        trainable = [p for _, p in peft_model.trainable_parameters()]
        with ckpt.gathered(trainable, stage, modifier_rank=0):
            peft_model.finalize(common)
        return
    peft_model.finalize(common)
    # Backward passes that stop at a layer's output (Laplace's curvature taps) leave
    # DeepSpeed's hooks holding those layers as in backward; release every parameter.
    # (Only here: a rewriting pass may have put new, not yet partitioned tensors in place.)
    engine.empty_partition_cache()


def _register_external_params(model: torch.nn.Module) -> None:
    """Layers that compute with a wrapped base weight (selective methods) must have it
    gathered for their own forward under ZeRO-3 (DeepSpeed's documented mechanism)."""
    import deepspeed

    from peft_core import partition

    for m in model.modules():
        for p in partition.external_params(m):
            deepspeed.zero.register_external_parameter(m, p)


@dataclasses.dataclass
class Worker:
    """What a worker has once started, before its model: the run's config and dataset, its
    rank, device, batches and the stopwatch of its phases (see :func:`start_worker`)."""

    config: TrainConfig
    info: Manifest
    rank: int
    world: int
    device: torch.device
    phases: M.Phases
    started: float  # perf_counter at the train function's first line
    precision: str
    dtype: torch.dtype
    ds_config: dict[str, Any]
    batches: TrainBatches
    evals: list[dict[str, torch.Tensor] | None]
    fallback: dict[str, torch.Tensor]


def start_worker(loop_config: dict[str, Any]) -> Worker:
    """The first part of every worker's function: imports, config, rank, pid file, device,
    seeds and the data splits batched, each charged to its phase."""
    entered = time.time()  # wall clock: compared with the trial driver's ``started_at``
    started = time.perf_counter()
    phases = M.Phases("imports")
    import ray.train
    import ray.train.torch

    _charge_start(phases, loop_config.get("started_at"), entered)
    import_plugins(loop_config["train_config"].get("plugins") or [])
    config = TrainConfig.model_validate(loop_config["train_config"])
    info = Manifest.model_validate(loop_config["dataset"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if loop_config.get("pid_dir"):
        pid_dir = Path(loop_config["pid_dir"])
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
    ds_config = build_ds_config(config, device_type=device.type)
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
    return Worker(config, info, rank, world, device, phases, started, precision, dtype,
                  ds_config, batches, evals, fallback)


def resume_source(loop_config: dict[str, Any]) -> tuple[Any, Any]:
    """``(Ray's checkpoint or None, a context manager yielding the folder to resume from)``:
    Ray's latest checkpoint of this run (a restarted worker group) before the
    ``resume_from`` folder; the manager is None when the run starts afresh."""
    import ray.train

    restored = ray.train.get_checkpoint()
    if restored is not None:
        return restored, restored.as_directory()
    resume_dir = loop_config.get("resume_from")
    return None, (contextlib.nullcontext(resume_dir) if resume_dir else None)


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


def train_loop_per_worker(loop_config: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Train's per-worker function. ``loop_config``: ``train_config`` (TrainConfig as a
    dict), ``dataset`` (the :class:`~pipelines.data.manifest.Manifest`
    as a dict), optional ``resume_from`` (a
    checkpoint folder used when Ray has none) and ``pid_dir`` (each rank writes its pid)."""
    w = start_worker(loop_config)  # first: its stopwatch starts at this function's start
    import deepspeed  # imported by start_worker already
    import ray.train

    import peft_core
    config, info, rank, world, device, phases = (w.config, w.info, w.rank, w.world, w.device,
                                                  w.phases)
    started, precision, dtype, ds_config = w.started, w.precision, w.dtype, w.ds_config
    batches, evals, fallback = w.batches, w.evals, w.fallback

    # -- model and method (identical on every rank: same seed, same prepare batches) --------
    phases.switch("load")
    if config.zero.stage == 3:
        _release_freed_tensors_to_the_os()
        # zero.Init (inside the model's construction) needs DeepSpeed's view of the process
        # group Ray Train already set up; initialize() would do this later otherwise.
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
        peft_core.partition.use_gatherer(deepspeed.zero.GatheredParameters)
    # The second value must live as long as the model: transformers checks it (weakly) to
    # know that ZeRO-3 is on.
    base, _zero3_live = _load_base(config, info, ds_config, dtype)
    load_s = time.perf_counter() - started
    phases.switch("method")
    torch.manual_seed(config.seed)
    peft_model = peft_core.apply(base, config.method)
    peft_model.to(device)
    if config.zero.stage == 3:
        _register_external_params(peft_model)
    common = [_to(b, device) for b in batches.common_batches(config.prepare_batches)]
    _prepare(peft_model, common, config, ds_config)
    peft_model.record_adapter_keys()  # prepare may add or resize adapter tensors
    if config.gradient_checkpointing:
        peft_model.enable_gradient_checkpointing()
    summary = peft_model.summary()

    phases.switch("engine")
    engine, _, _, scheduler = deepspeed.initialize(
        model=peft_model,
        model_parameters=peft_model.param_groups(config.lr, config.weight_decay),
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config)),
        dist_init_required=False,
    )
    # Peak RSS (or CUDA allocator peak) once the model is loaded, adapted and sharded:
    # what loading costs, before activations and optimizer states of the steps.
    load_peak = M.all_reduce([M.peak_mem_mb(device)], "max")[0]

    # -- resume ---------------------------------------------------------------------------
    step, history = 0, []
    restored, source = resume_source(loop_config)
    if source is not None:
        phases.switch("checkpoint")
        with source as folder:
            saved = ckpt.load_resume_state(engine, Path(folder), rank=rank, world=world,
                                           stage=config.zero.stage)
        step, history = int(saved["step"]), list(saved.get("history", []))
        if restored is not None and saved.get("finalized") and step >= config.max_steps \
                and history:
            # The run had ended (a longer max_steps extends it instead), but the driver that
            # ran it died before Tune recorded the final report (a search resumed after its
            # driver was killed): report it again, pointing at the restored checkpoint
            # (Tune's key for a report's checkpoint) rather than copying a new one.
            ray.train.report({**history[-1], "checkpoint_path": restored.path})
            return history

    static = {
        # where this worker group started: 0, or the checkpoint step it resumed from
        "resumed_from": step,
        # parameter bytes resident per rank (largest rank): what ZeRO-3 divides
        "param_mem_mb": M.all_reduce([M.param_mem_mb(peft_model)], "max")[0],
        "load_peak_mem_mb": load_peak,
        # seconds from the worker's start: to the loaded base model, to the first step
        "load_s": M.all_reduce([load_s], "max")[0],
        "precision": precision,
        M.TRAINABLE_PARAMS: summary["trainable_params"],
        M.TRAINABLE_FRACTION: summary["trainable_fraction"],
        "total_params": summary["total_params"],
    }
    adapter_info = pipeline_info(config, info)
    window = M.Window()
    phases.switch("steps")
    if step == 0 and config.eval_before_training:
        with phases("eval"):
            report = {M.STEP: 0, **static, **evaluate(engine, evals, fallback, info, device)}
            report.update(_memory(device))
        report.update(phases.snapshot())
        history.append(report)
        with phases("report"):
            ray.train.report(report)
    engine.train()
    static["first_step_s"] = M.all_reduce([time.perf_counter() - started], "max")[0]
    while step < config.max_steps:
        peft_model.method.on_step(peft_model, step, config.max_steps)  # e.g. a phase change
        window.start_step()
        for mb in batches.micro_batches(step):
            mb = _to(mb, device)
            out = engine(**mb)
            loss = out.loss
            reg = peft_model.regularizer()
            total = loss if reg is None else loss + reg
            engine.backward(total)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            window.add_micro(float(loss.detach()), float(reg.detach()) if reg is not None else 0.0,
                             int(mb["attention_mask"].sum()))
        window.end_step()
        step += 1
        last = step == config.max_steps
        if step % config.eval_every and not last:
            continue
        report = {M.STEP: step, **static, **window.summarise(),
                  "lr": scheduler.get_last_lr()[0], **batches.position(step - 1)}
        window.reset()
        save = last or step % config.ckpt_every == 0
        if not save:
            with phases("eval"):
                report.update(evaluate(engine, evals, fallback, info, device))
                report.update(_memory(device))
            report.update(phases.snapshot())
            history.append(report)
            with phases("report"):
                ray.train.report(report)
            continue
        with tempfile.TemporaryDirectory(prefix="peftpipe-ckpt-") as tmp:
            folder = Path(tmp)
            phases.switch("checkpoint")
            ckpt.save_resume_state(engine, folder, rank=rank)
            if last and _has_hook(peft_model, "finalize"):
                with phases("method"):
                    _finalize(engine, peft_model, common, config.zero.stage)
            with phases("eval"):
                report.update(final_eval(engine, peft_model, evals, fallback, info, device,
                                         config.zero.stage) if last
                              else evaluate(engine, evals, fallback, info, device))
                report.update(_memory(device))
            ckpt.save_adapter(peft_model, folder, stage=config.zero.stage, rank=rank,
                              pipeline=adapter_info,
                              training={"step": step, "finalized": last,
                                        "eval_loss": report[M.EVAL_LOSS]})
            # the snapshot precedes metrics.json and the report: the checkpoint's copy to
            # storage (inside ray.train.report) is charged to the next report's phases
            report.update(phases.snapshot())
            history.append(report)
            if rank == 0:
                ckpt.write_state(folder, {
                    "step": step, "world_size": world, "zero_stage": config.zero.stage,
                    "position": batches.position(step), "seed": config.seed,
                    "finalized": last, "history": history})
                (folder / "metrics.json").write_text(_json(report))
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        phases.switch("steps")
    # Rank 0's return value reaches the driver as Result.return_value.
    return history


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


def _charge_start(phases: M.Phases, started_at: float | None, entered: float) -> None:
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


def _json(d: dict[str, Any]) -> str:
    import json

    return json.dumps(d, indent=2, sort_keys=True, default=float)
