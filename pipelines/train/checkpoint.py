"""Checkpoints: the adapter (peft_core format) plus what resuming needs, never the base model.

Layout of one checkpoint folder (Ray Train merges the folder each rank reports)::

    adapter/                 peft_core adapter folder (rank 0; gathered under ZeRO-3)
    train_state.json         step, data position, world size, ZeRO stage, metrics (rank 0)
    deepspeed/state/...      DeepSpeed's optimizer/scheduler/trainable-weight state, written
                             with ``exclude_frozen_parameters`` so no base weight is stored;
                             one file per rank for ZeRO stages 1-3
    rng_rank{R}.pt           each rank's RNG state (dropout continues the same stream)
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

STATE_FILE = "train_state.json"
ADAPTER_DIR = "adapter"
DS_DIR = "deepspeed"
DS_TAG = "state"


class ResumeError(InputError, RuntimeError):
    """A checkpoint cannot be resumed under the current configuration (a RuntimeError as
    before the exception tree)."""


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng(folder: Path, *, rank: int) -> None:
    """This rank's RNG state, ``rng_rank{R}.pt`` (dropout continues the same stream)."""
    torch.save(_rng_state(), Path(folder) / f"rng_rank{rank}.pt")


def load_rng(folder: Path, *, rank: int) -> None:
    """Restore :func:`save_rng`'s state of this rank, if the folder has one."""
    rng_file = Path(folder) / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))


def save_resume_state(engine: Any, folder: Path, *, rank: int) -> None:
    """Every rank: its DeepSpeed shard and RNG state (a collective: every rank calls it)."""
    ds_dir = folder / DS_DIR
    # DeepSpeed creates the folder on rank 0 only; here each rank writes to its own local
    # folder that Ray merges, so each must exist.
    (ds_dir / DS_TAG).mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(ds_dir), tag=DS_TAG, save_latest=False,
                           exclude_frozen_parameters=True)
    save_rng(folder, rank=rank)


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """Rank 0: the step, data position and metric history; its presence marks the folder
    as a training checkpoint."""
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True, default=float))


def read_state(folder: Path) -> dict[str, Any]:
    file = Path(folder) / STATE_FILE
    if not file.is_file():
        raise ResumeError(f"{folder}: not a training checkpoint ({STATE_FILE} missing)")
    return json.loads(file.read_text())


def load_resume_state(engine: Any, folder: Path, *, rank: int, world: int, sharding: Any
                      ) -> dict[str, Any]:
    """Restore optimizer, scheduler, trainable weights and RNG; return the saved record.
    ``sharding`` (:class:`~pipelines.train.sharding.Sharding`) refuses a checkpoint whose
    DeepSpeed state it cannot load."""
    folder = Path(folder)
    state = read_state(folder)
    sharding.check_resume(folder, state, world)
    # Frozen base weights were excluded on save, so the module load is not strict.
    path, _ = engine.load_checkpoint(str(folder / DS_DIR), tag=DS_TAG, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise ResumeError(f"{folder}: DeepSpeed found no checkpoint under {DS_DIR}/{DS_TAG}")
    load_rng(folder, rank=rank)
    return state
