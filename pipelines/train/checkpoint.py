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

import contextlib
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "train_state.json"
ADAPTER_DIR = "adapter"
DS_DIR = "deepspeed"
DS_TAG = "state"


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed under the current configuration."""


@contextlib.contextmanager
def gathered(params: Sequence[torch.nn.Parameter], stage: int, modifier_rank: int | None = None
             ) -> Iterator[None]:
    """Under ZeRO-3, materialise ``params`` on every rank for the block (a collective: every
    rank must enter); a no-op for stages 0-2, whose parameters are always whole."""
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank):
            yield
    else:
        yield


def save_adapter(peft_model: Any, folder: Path, *, stage: int, rank: int, **extra: Any) -> None:
    """Write ``folder/adapter`` on rank 0 from the gathered trainable parameters."""
    params = [p for _, p in peft_model.trainable_parameters()]
    with gathered(params, stage):
        if rank == 0:
            peft_model.save(folder / ADAPTER_DIR, **extra)


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


def load_resume_state(engine: Any, folder: Path, *, rank: int, world: int, stage: int
                      ) -> dict[str, Any]:
    """Restore optimizer, scheduler, trainable weights and RNG; return the saved record."""
    folder = Path(folder)
    state = read_state(folder)
    if stage > 0 and (state["world_size"] != world or state["zero_stage"] != stage):
        raise ResumeError(
            f"{folder}: written by {state['world_size']} workers under ZeRO-{state['zero_stage']}; "
            f"ZeRO-{stage} optimizer shards only resume with the same num_workers and stage "
            f"(now {world} workers)"
        )
    if stage == 0 and state["zero_stage"] != 0:
        raise ResumeError(
            f"{folder}: written under ZeRO-{state['zero_stage']}; resume it with that stage"
        )
    # Frozen base weights were excluded on save, so the module load is not strict.
    path, _ = engine.load_checkpoint(str(folder / DS_DIR), tag=DS_TAG, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise ResumeError(f"{folder}: DeepSpeed found no checkpoint under {DS_DIR}/{DS_TAG}")
    load_rng(folder, rank=rank)
    return state
