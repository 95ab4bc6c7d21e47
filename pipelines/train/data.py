"""The tokenized dataset as the trainer sees it: the manifest, per-rank batches, padding.

Each worker reads the Parquet splits written by ``pipelines.data`` with pyarrow (the data
is already materialised, so no Ray Data tasks compete with the train workers for CPUs) and
takes its share of every global batch. Batch order is a function of ``(seed, step)`` only:
a resumed or restarted run sees exactly the batches an uninterrupted run would have, and
every ZeRO stage sees the same data for the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# read_manifest and DatasetError are re-exported: the training stage's users (evaluate,
# benchmarks) import them from here
from ..data.manifest import DatasetError, Manifest, read_manifest

__all__ = ["Collator", "DatasetError", "TrainBatches", "eval_batches",
           "find_dataset", "read_manifest", "read_split"]


def find_dataset(data_root: str | Path, dataset_id: str) -> Path:
    """The folder of ``dataset_id`` under ``data_root``, or an error listing what exists."""
    root = Path(data_root).expanduser()
    folder = root / dataset_id
    if not (folder / "manifest.json").is_file():
        known = sorted(p.parent.name for p in root.glob("*/manifest.json")) if root.is_dir() else []
        raise DatasetError(
            f"dataset_id: {dataset_id!r} not found under {str(root)!r}; "
            f"available: {known or 'none (run the data stage first)'}"
        )
    return folder


def read_split(info: Manifest, split: str) -> list[dict[str, Any]]:
    """All rows of one split as Python lists (``input_ids``, ``attention_mask``, ``labels``)."""
    import pyarrow.dataset as pads

    folder = Path(info.path) / split
    files = sorted(str(p) for p in folder.rglob("*.parquet"))
    if not files:
        return []
    table = pads.dataset(files, format="parquet").to_table(
        columns=["input_ids", "attention_mask", "labels"]
    )
    cols = table.to_pydict()
    return [
        {"input_ids": i, "attention_mask": m, "labels": y}
        for i, m, y in zip(cols["input_ids"], cols["attention_mask"], cols["labels"])
    ]


class Collator:
    """Pads a list of rows to the longest one, on the manifest's side with its pad id."""

    def __init__(self, info: Manifest):
        self.pad_id = int(info.pad_token_id or 0)
        self.left = info.padding_side == "left"
        self.is_lm = info.is_lm

    def _pad(self, seqs: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        out = torch.full((len(seqs), width), value, dtype=torch.long)
        for r, s in enumerate(seqs):
            if s:
                if self.left:
                    out[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
                else:
                    out[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        return out

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {
            "input_ids": self._pad([r["input_ids"] for r in rows], self.pad_id),
            "attention_mask": self._pad([r["attention_mask"] for r in rows], 0),
        }
        if self.is_lm:
            batch["labels"] = self._pad([r["labels"] for r in rows], -100)
        else:
            batch["labels"] = torch.tensor([int(r["labels"]) for r in rows], dtype=torch.long)
        return batch


class TrainBatches:
    """Micro-batches of one rank: global batch ``step`` is rows ``perm_e[k*B:(k+1)*B]`` of
    the epoch's seeded permutation; within it, micro-batch ``a`` of rank ``r`` is slot
    ``a * world + r`` (so every accumulation step spreads over all ranks)."""

    def __init__(self, rows: list[dict[str, Any]], collate: Collator, *, batch_size: int,
                 micro_batch_size: int, rank: int, world: int, seed: int):
        if len(rows) < batch_size:
            raise DatasetError(
                f"batch_size: the train split has {len(rows)} rows, fewer than one batch of "
                f"{batch_size}"
            )
        self.rows, self.collate = rows, collate
        self.batch_size, self.micro = batch_size, micro_batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.steps_per_epoch = len(rows) // batch_size
        self._perm: tuple[int, torch.Tensor] | None = None

    def position(self, step: int) -> dict[str, int]:
        """Where global step ``step`` (0-based) reads: epoch and batch index within it."""
        return {"epoch": step // self.steps_per_epoch, "batch": step % self.steps_per_epoch}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.rows), generator=g))
        return self._perm[1]

    def micro_batches(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        pos = self.position(step)
        perm = self._permutation(pos["epoch"])
        start = pos["batch"] * self.batch_size
        accum = self.batch_size // (self.micro * self.world)
        for a in range(accum):
            slot = a * self.world + self.rank
            idx = perm[start + slot * self.micro: start + (slot + 1) * self.micro]
            yield self.collate([self.rows[int(i)] for i in idx])

    def common_batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        """``n`` micro-batches that are the same on every rank (for prepare/finalize passes:
        a mask chosen from data must agree across ranks)."""
        perm = self._permutation(0)
        n = min(n, math.ceil(len(self.rows) / self.micro))
        return [
            self.collate([self.rows[int(i)] for i in perm[k * self.micro:(k + 1) * self.micro]])
            for k in range(n)
        ]


def eval_batches(rows: list[dict[str, Any]], collate: Collator, *, batch_size: int, rank: int,
                 world: int, max_batches: int | None) -> list[dict[str, torch.Tensor] | None]:
    """This rank's eval batches, the same count on every rank: ``None`` marks a slot where
    this rank has no rows left (it still runs a forward pass, because ZeRO-3's forward is a
    collective, but its result is discarded)."""
    shard = rows[rank::world]
    per_rank = math.ceil(len(rows) / world)
    n = math.ceil(per_rank / batch_size)
    if max_batches is not None:
        n = min(n, max_batches)
    out: list[dict[str, torch.Tensor] | None] = []
    for k in range(n):
        chunk = shard[k * batch_size:(k + 1) * batch_size]
        out.append(collate(chunk) if chunk else None)
    return out
