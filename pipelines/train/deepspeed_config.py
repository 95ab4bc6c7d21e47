"""The DeepSpeed config dict of a :class:`TrainConfig`, and the one-time DeepSpeed setup.

The optimizer is declared here (DeepSpeed builds it from ``model_parameters``, i.e. the
method's own parameter groups); the learning-rate schedule is a torch ``LambdaLR`` built in
:mod:`pipelines.train.loop`, because DeepSpeed's linear schedule sets one absolute rate for
every group and would flatten methods with per-group rates (LoRA+).
"""

from __future__ import annotations

from typing import Any

from .config import TrainConfig

#: ZeRO-3 gathering settings used on CPU workers when the recipe leaves them unset. On CPU
#: (gloo: no all-gather into a flat tensor, so a gathered weight transiently costs about
#: three times its bytes, and nothing overlaps communication) DeepSpeed's GPU-minded
#: defaults (1e9 live parameters, 5e7 prefetched, reuse distance 1e9) keep the whole model
#: gathered through a step. Measured by benchmarks/scale.py on the 1B Llama, 2 ranks:
#: per-rank peak RSS 8517 MB with DeepSpeed's defaults, 5296 MB with these (ZeRO-0: 5496).
#: CUDA workers keep DeepSpeed's defaults (not measured here; there prefetching overlaps).
ZERO3_CPU_DEFAULTS: dict[str, int] = {
    "stage3_max_live_parameters": 100_000_000,
    "stage3_prefetch_bucket_size": 0,
    "stage3_max_reuse_distance": 0,
}


def resolve_precision(config: TrainConfig, device_type: str) -> str:
    """``fp32`` or ``bf16``. ``auto``: bf16 on a CUDA device that supports it, else fp32.

    An explicit ``bf16`` also runs on CPU (torch's CPU kernels and DeepSpeed's CPU
    accelerator support it; slower than fp32 on CPUs without bf16 instructions, but the
    same code path as a GPU run, so it can be tested anywhere).
    """
    if config.precision == "fp32":
        return "fp32"
    import torch

    cuda_bf16 = (device_type == "cuda" and torch.cuda.is_available()
                 and torch.cuda.is_bf16_supported())
    if config.precision == "bf16":
        if device_type == "cuda" and not cuda_bf16:
            raise ValueError(
                "precision: bf16 needs a CUDA device with bf16 support; this GPU has none")
        return "bf16"
    return "bf16" if cuda_bf16 else "fp32"


def build(config: TrainConfig, *, device_type: str = "cpu") -> dict[str, Any]:
    """The ``config=`` argument of ``deepspeed.initialize`` for this run on ``device_type``."""
    z = config.zero
    zero: dict[str, Any] = {"stage": z.stage}
    if z.stage >= 1:
        # Plain collectives: no bucketed overlap threads, which buy nothing on CPU/gloo
        # and make step times noisier.
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if z.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if z.stage == 3 and z.param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = z.param_persistence_threshold
    if z.stage == 3:
        for field, key in (("max_live_parameters", "stage3_max_live_parameters"),
                           ("prefetch_bucket_size", "stage3_prefetch_bucket_size"),
                           ("max_reuse_distance", "stage3_max_reuse_distance")):
            value = getattr(z, field)
            if value is None and device_type == "cpu":
                value = ZERO3_CPU_DEFAULTS[key]
            if value is not None:
                zero[key] = value
    if z.stage == 3:
        # The adapter is gathered explicitly for saving (GatheredParameters); never let
        # DeepSpeed consolidate the whole 16-bit model on save.
        zero["stage3_gather_16bit_weights_on_model_save"] = False

    adam: dict[str, Any] = {
        "lr": config.lr,
        "betas": list(config.betas),
        "eps": 1e-8,
        "weight_decay": config.weight_decay,
    }
    if config.optimizer == "torch":
        adam["torch_adam"] = True
    precision = resolve_precision(config, device_type)
    ds: dict[str, Any] = {
        "train_batch_size": config.batch_size,
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # progress goes through ray.train.report, not stdout
        "wall_clock_breakdown": False,
    }
    if config.grad_clip is not None:
        ds["gradient_clipping"] = config.grad_clip
    if z.offload_optimizer and config.optimizer == "torch":
        # DeepSpeed insists on its compiled CPU Adam with offload unless told otherwise.
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds


def setup_deepspeed(*, shm_comm: bool) -> None:
    """Process-level DeepSpeed switches, called in each worker before ``initialize``."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    # JIT-built ops (CPU Adam, shm comm) compile once per machine, not once per process.
    from pipelines.models import cache_dir

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))
    if not shm_comm:
        from pipelines.compat import disable_deepspeed_shm_comm

        # DeepSpeed builds its CPU shared-memory all-reduce on first use (a ~95 s JIT
        # compile): no gain at these sizes
        disable_deepspeed_shm_comm()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
