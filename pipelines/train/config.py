"""The training recipe: a pydantic ``TrainConfig`` whose errors name the offending field.

Everything that can be checked without the dataset or the model is checked here, so a bad
recipe fails on the driver before any Ray worker starts (see :mod:`pipelines.train.stage`
for the checks that need the manifest or the model's config).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import peft_core

from ..quantize import QuantizationConfig, check_method, check_zero_stage


class ModelConfig(BaseModel):
    """The base model: a ``pipelines.models`` name (``builtin:smollm2``, a folder, a hub id);
    ``quantization`` loads its linear layers quantized (:mod:`pipelines.quantize`, QLoRA)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    quantization: QuantizationConfig | None = None


class ZeroConfig(BaseModel):
    """DeepSpeed ZeRO: ``stage`` 0 (plain data parallel) to 3 (parameters partitioned).

    ``offload_optimizer`` keeps optimizer states (and the step) in CPU memory (stages 1-3);
    ``offload_param`` also keeps the partitioned parameters there (stage 3 only).
    ``param_persistence_threshold``: under ZeRO-3, tensors smaller than this stay whole on
    every rank (DeepSpeed's default 1e5); 0 partitions everything.
    """

    model_config = ConfigDict(extra="forbid")

    stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    param_persistence_threshold: int | None = Field(None, ge=0)
    # ZeRO-3 gathering: how many gathered parameters may stay live, how far ahead to
    # prefetch (elements), and how soon a released parameter counts as reused. None: the
    # memory-lean values on CPU workers (deepspeed_config.ZERO3_CPU_DEFAULTS, measured),
    # DeepSpeed's own on GPUs.
    max_live_parameters: int | None = Field(None, ge=0)
    prefetch_bucket_size: int | None = Field(None, ge=0)
    max_reuse_distance: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> ZeroConfig:
        if self.offload_optimizer and self.stage == 0:
            raise ValueError(
                "zero.offload_optimizer: optimizer offload needs ZeRO stage 1, 2 or 3, got stage 0"
            )
        if self.offload_param and self.stage != 3:
            raise ValueError(
                f"zero.offload_param: parameter offload needs ZeRO stage 3, got stage {self.stage}"
            )
        for field in ("param_persistence_threshold", "max_live_parameters",
                      "prefetch_bucket_size", "max_reuse_distance"):
            if getattr(self, field) is not None and self.stage != 3:
                raise ValueError(
                    f"zero.{field}: only meaningful with ZeRO stage 3, got stage {self.stage}"
                )
        return self


class TrainConfig(BaseModel):
    """One training run.

    Batch sizes: ``batch_size`` sequences per optimizer step in total, ``micro_batch_size``
    per worker per forward pass; the gradient-accumulation count is
    ``batch_size / (micro_batch_size * num_workers)`` and must be a whole number.
    Steps count optimizer steps. Metrics are reported (and evaluated) every ``eval_every``
    steps and at the end; a checkpoint is written every ``checkpoint_every`` steps (a
    multiple of ``eval_every``) and at the end.
    """

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "lora"})

    # -- scale ----------------------------------------------------------------------------
    num_workers: int = Field(2, ge=1)
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = Field(1.0, gt=0)
    # How a run's workers are placed on the cluster's nodes (Ray placement group strategy):
    # PACK fills few nodes, SPREAD prefers different nodes, STRICT_* insist (and wait).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # How long a run's workers may wait for their resources (Ray placement group) before the
    # run fails with Ray's pending demand (pipelines.train.scheduling); None waits for ever,
    # as Ray does by default. Long enough for a node Ray is restarting or an autoscaler.
    pending_timeout_s: float | None = Field(120.0, gt=0)

    # -- optimisation -----------------------------------------------------------------------
    batch_size: int = Field(8, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    max_steps: int = Field(100, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    zero: ZeroConfig = Field(default_factory=ZeroConfig)
    # torch's AdamW needs no compilation; "deepspeed" picks DeepSpeed's fused/CPU Adam
    # (JIT-built on first use, faster with offload on GPU machines).
    optimizer: Literal["torch", "deepspeed"] = "torch"
    # DeepSpeed's shared-memory all-reduce for CPU: a ~95 s JIT build on first use and no
    # gain at these sizes, so off unless asked for.
    shm_comm: bool = False

    # -- evaluation, checkpoints ------------------------------------------------------------
    eval_every: int = Field(50, ge=1)
    # also evaluate the untrained adapter and report it as step 0 (a baseline; adds one
    # report without train metrics, so off by default for searches)
    eval_before_training: bool = False
    eval_batch_size: int | None = Field(None, ge=1)  # default: micro_batch_size
    max_eval_batches: int | None = Field(None, ge=1)  # per worker; None: the whole split
    checkpoint_every: int | None = Field(None, ge=1)  # default: eval_every
    keep_checkpoints: int | None = Field(2, ge=1)
    prepare_batches: int = Field(4, ge=1)  # batches given to the method's prepare/finalize

    # -- run ------------------------------------------------------------------------------
    seed: int = 0
    max_failures: int = Field(0, ge=-1)
    storage_path: str = "runs/train"
    name: str | None = None  # the run's folder under storage_path; default from the config
    # modules imported in every worker before the method is built (custom registered
    # methods and objectives)
    plugins: list[str] = Field(default_factory=list)
    # how a batch becomes a loss and metrics (pipelines.train.objectives); None: the
    # dataset task's own (classification, causal_lm)
    objective: str | None = None

    @field_validator("method")
    @classmethod
    def _method_is_registered(cls, v: dict[str, Any]) -> dict[str, Any]:
        # Same validation peft_core.apply does in the workers, done here so a typo fails
        # before any worker starts. Plugins are imported first when given (see stage.py).
        try:
            return peft_core.MethodConfig.from_dict(dict(v)).to_dict()
        except peft_core.PeftError as e:
            raise ValueError(str(e)) from e

    @field_validator("objective")
    @classmethod
    def _objective_is_registered(cls, v: str | None) -> str | None:
        from .objectives import available

        if v is not None and v not in available():
            raise ValueError(f"unknown objective {v!r}; registered: {available()} (a plugin "
                             "module in train.plugins registers its own)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, data: Any) -> Any:
        if isinstance(data, dict):
            import_plugins(data.get("plugins") or [])
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        per_step = self.micro_batch_size * self.num_workers
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size: {self.batch_size} is not divisible by micro_batch_size "
                f"({self.micro_batch_size}) x num_workers ({self.num_workers}) = {per_step}"
            )
        if self.checkpoint_every is not None and self.checkpoint_every % self.eval_every:
            raise ValueError(
                f"checkpoint_every: {self.checkpoint_every} must be a multiple of eval_every "
                f"({self.eval_every}); checkpoints ride on the metric reports"
            )
        if self.warmup_steps >= self.max_steps and self.warmup_steps:
            raise ValueError(
                f"warmup_steps: {self.warmup_steps} must be below max_steps ({self.max_steps})"
            )
        check_zero_stage(self.model.quantization, self.zero.stage)
        check_method(self.model.quantization, self.method)
        return self

    @property
    def grad_accum(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.num_workers)

    @property
    def ckpt_every(self) -> int:
        return self.checkpoint_every or self.eval_every

    def run_name(self) -> str:
        """The run's folder name: ``name`` or a short hash of the config (stable)."""
        if self.name:
            return self.name
        import hashlib

        # a setting left at None that older configs lacked does not rename their runs
        unset = {"objective"} if self.objective is None else set()
        digest = hashlib.sha256(self.model_dump_json(exclude=unset).encode()).hexdigest()[:10]
        return f"{self.method['name']}-{digest}"


def import_plugins(modules: list[str]) -> None:
    """Import modules that register extra peft_core methods or objectives (idempotent)."""
    import importlib

    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError as e:
            raise ValueError(f"plugins: cannot import {m!r}: {e}") from e
