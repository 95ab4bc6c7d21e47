"""The training stage's public entry points.

``train(config, manifest=...)`` checks the inputs on the driver, builds a Ray Train
``TorchTrainer`` (V2 API) running :func:`pipelines.train.loop.train_loop_per_worker` on
``num_workers`` workers, fits it, and returns a :class:`TrainResult`.

A Ray Tune trial builds its own trainer with :func:`build_trainer` (same checks, its own
hyperparameters, its own run folder) and calls ``fit()`` inside the trial function; pass
``callbacks=[ray.tune.integration.ray_train.TuneReportCallback()]`` to forward each report
to Tune, or leave ``report_to_tune`` on its default, which adds it inside a Tune session.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from ..compat import default_ray_train_poll_interval
from ..data.manifest import DatasetError, Manifest, read_manifest
from . import scheduling
from .config import TrainConfig
from .spec import WorkerSpec

REPORT_POLL_S = 0.2


@dataclasses.dataclass
class TrainResult:
    """What a finished run leaves: its folder, last metrics, the whole reported history,
    and the latest checkpoint with its adapter folder (local paths where storage is local)."""

    run_dir: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    checkpoint_dir: str | None
    adapter_dir: str | None

    @classmethod
    def from_ray(cls, result: Any) -> TrainResult:
        ckpt_dir = result.checkpoint.path if result.checkpoint is not None else None
        history = list(result.return_value or [])
        metrics = dict(result.metrics or (history[-1] if history else {}))
        adapter = f"{ckpt_dir}/adapter" if ckpt_dir else None
        return cls(str(result.path), metrics, history, ckpt_dir, adapter)


def _split_run_dir(run_dir: str | Path) -> tuple[str, str]:
    """``(storage_path, name)`` for Ray's RunConfig from the run's own folder (path or URI)."""
    s = str(run_dir).rstrip("/")
    if "://" in s:
        parent, _, name = s.rpartition("/")
        return parent, name
    p = Path(s).expanduser().resolve()
    return str(p.parent), p.name


def check_inputs(config: TrainConfig, manifest: Manifest | str | Path) -> Manifest:
    """Everything that can fail before workers start: the dataset (a Manifest or its
    folder), its size against the batch, and whether the base model's config loads."""
    info = read_manifest(manifest)
    train_rows = info.rows.get("train")
    if train_rows is not None and train_rows < config.batch_size:
        raise DatasetError(
            f"batch_size: {config.batch_size} exceeds the train split of dataset "
            f"{info.dataset_id} ({train_rows} rows)"
        )
    if info.rows.get("eval") == 0:
        raise DatasetError(f"dataset {info.dataset_id}: the eval split is empty")
    _check_model(config.model.name, info)
    from .objectives import objective_for

    objective_for(info, config.objective)  # a dataset task without a default objective
    return info


def _check_model(name: str, info: Manifest) -> None:
    from transformers import AutoConfig

    from pipelines import models

    try:
        cfg = AutoConfig.from_pretrained(models.resolve(name))
    except Exception as e:  # transformers raises OSError/ValueError/KeyError variously
        raise ValueError(f"model.name: cannot load {name!r}: {e}") from e
    vocab = getattr(cfg, "vocab_size", None)
    if info.is_lm and getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"model.name: {name!r} is encoder-decoder; {info.task} needs a causal LM")
    if vocab is not None and (info.pad_token_id or 0) >= vocab:
        raise ValueError(
            f"model.name: {name!r} has {vocab} tokens but dataset {info.dataset_id} pads with "
            f"id {info.pad_token_id}; was it tokenized for another model?"
        )


def _use_gpu(config: TrainConfig) -> bool:
    if config.use_gpu is not None:
        return config.use_gpu
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) >= 1
    import torch

    return torch.cuda.is_available()


def _in_tune() -> bool:
    """Whether this process runs a Tune trial: Tune's public context has a trial id only
    there (elsewhere it returns None, with a warning meant for misplaced calls)."""
    import warnings

    from ray import tune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return tune.get_context().get_trial_id() is not None


def build_trainer(config: TrainConfig, manifest: Manifest | str | Path,
                  run_dir: str | Path | None = None, *, name: str | None = None,
                  callbacks: list[Any] | None = None, report_to_tune: bool | None = None,
                  resume_from: str | Path | None = None,
                  pid_dir: str | Path | None = None, started_at: float | None = None,
                  members: list[dict[str, Any]] | None = None, stopper: Any = None) -> Any:
    """A ready-to-``fit()`` ``TorchTrainer`` for ``config`` on the dataset ``manifest``.

    ``run_dir``: the run's folder (a path, or a URI for cluster storage); default
    ``{config.storage_path}/{name or config.run_name()}``. Running again with the same folder
    resumes from its latest checkpoint. ``resume_from``: a checkpoint folder to start from
    when the run folder has none. ``pid_dir``: each worker writes ``rank{R}.pid`` there
    (default ``{run_dir}/workers`` for local folders), so an operator can find it.
    ``started_at``: the ``time.time()`` the run (a Tune trial) started at, default now;
    the workers charge the time from it to their first line to the ``wait`` and
    ``worker_start`` phases (see :data:`pipelines.train.metrics.PHASES`).
    ``members``: a packed run (:mod:`pipelines.train.engines.packed`) of these ``{"name", "method",
    "lr"}`` over one base, in place of ``config.method`` and ``config.lr``; ``stopper``
    (``(member, report_index, metrics) -> bool``) stops a member early.
    """
    if started_at is None:
        started_at = time.time()
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .loop import train_loop_per_worker

    info = check_inputs(config, manifest)
    local = Path(config.model.name).expanduser()
    if local.exists():
        # Workers run in their own working directory: hand them an absolute path.
        config = config.model_copy(update={"model": config.model.model_copy(
            update={"name": str(local.resolve())})})
    if run_dir is None:
        run_dir = Path(config.storage_path) / (name or config.run_name())
    storage_path, run_name = _split_run_dir(run_dir)
    if name is not None and name != run_name:
        raise ValueError(f"name: {name!r} disagrees with run_dir {str(run_dir)!r}")
    if pid_dir is None and "://" not in storage_path:
        pid_dir = Path(storage_path) / run_name / "workers"
    if resume_from is not None and not (Path(resume_from) / "train_state.json").is_file():
        raise ValueError(f"resume_from: {str(resume_from)!r} is not a training checkpoint folder")

    # Ray Train's controller takes a worker's report only when it polls the workers (every
    # 2 s by default) and a worker's next report waits until the previous one was taken:
    # measured on a 4-step tiny trial, reports reached Tune 2.05 s apart and the last one
    # 4.1 s after the worker had sent it. Ray Train passes this variable of the process
    # that fits the trainer on to its controller; an operator's own value is kept.
    default_ray_train_poll_interval(REPORT_POLL_S)
    use_gpu = _use_gpu(config)
    resources = {"CPU": config.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    callbacks = list(callbacks or [])
    if report_to_tune or (report_to_tune is None and _in_tune()):
        from ray.tune.integration.ray_train import TuneReportCallback

        if not any(isinstance(c, TuneReportCallback) for c in callbacks):
            callbacks.append(TuneReportCallback())
    spec = WorkerSpec.build(config, info, members=members, stopper=stopper,
                            resume_from=str(resume_from) if resume_from else None,
                            pid_dir=str(pid_dir) if pid_dir else None, started_at=started_at)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.loop_config(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=config.placement_strategy),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=scheduling.failure_config(config),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            callbacks=callbacks or None,
        ),
    )


def train(config: TrainConfig | dict[str, Any], *, manifest: Manifest | str | Path,
          run_dir: str | Path | None = None, name: str | None = None,
          ray_address: str | None = None, resume_from: str | Path | None = None,
          pid_dir: str | Path | None = None) -> TrainResult:
    """Train ``config`` on the dataset ``manifest`` (a Manifest, its folder or its
    manifest.json). Uses the running Ray instance if there is one, else ``ray.init``
    (``ray_address`` or a local cluster)."""
    from ..ray_runtime import ensure_ray

    if not isinstance(config, TrainConfig):
        config = TrainConfig.model_validate(config)
    ensure_ray(ray_address)
    trainer = build_trainer(config, manifest, run_dir, name=name, resume_from=resume_from,
                            pid_dir=pid_dir, report_to_tune=False)
    return TrainResult.from_ray(scheduling.fit(trainer, config))
