"""A trial's own folder (``run_dir/trials/<trial id>``): what its driver leaves there and
checks before it starts the trial's trainer, again or for the first time. Shared by a
search's trials and a single run."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from peft_core.files import atomic_write_text

from ..train.checkpoint import STATE_FILE

log = logging.getLogger(__name__)

#: where Ray Train keeps a run's checkpoint list (its file; read here only to see it is whole)
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def set_aside_torn_snapshot(folder: Path) -> Path | None:
    """A trial driver lost with its node while Ray Train rewrote the run's checkpoint list
    (written in place) leaves it empty or cut; Ray would refuse to start that run again on
    every retry. So the torn list is renamed away and the retry resumes from the newest
    complete checkpoint folder (its state file and every rank's RNG file present).
    Returns that folder; None when the list is whole or absent (Ray resumes by itself)."""
    snap = folder / RAY_SNAPSHOT
    try:
        json.loads(snap.read_text())
        return None
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        pass
    snap.rename(snap.with_name(snap.name + ".torn"))
    best: tuple[int, Path] | None = None
    for state_file in folder.glob(f"checkpoint_*/{STATE_FILE}"):
        try:
            state = json.loads(state_file.read_text())
            step, world = int(state["step"]), int(state["world_size"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        ckpt = state_file.parent
        if all((ckpt / f"rng_rank{r}.pt").is_file() for r in range(world)) and (
                best is None or step > best[0]):
            best = (step, ckpt)
    log.warning("trial folder %s: torn %s set aside; resuming from %s", folder, RAY_SNAPSHOT,
                best[1] if best else "the start")
    return best[1] if best else None


def write_pid(path: Path) -> None:
    """This process's pid, atomically: an operator (or a test) finds the trial's driver."""
    atomic_write_text(path, str(os.getpid()))
