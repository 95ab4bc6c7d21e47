"""Evaluate a saved adapter on a split of a prepared dataset, in this process.

Used to compare a promotion candidate with the champion on the held-out ``test`` split;
the metric code is the training stage's own final evaluation
(:func:`pipelines.train.evaluation.final_eval`), so the numbers mean the same thing in both places:
a classifier's scores include ``eval_ece`` and ``eval_nll``, and a fitted ``laplace_lora`` is
scored by its posterior predictive (what serving answers with), its MAP scores kept as
``eval_map_*``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import peft_core

from . import models
from .serve import pipeline_info
from .train.data import Collator, DatasetError, eval_batches, read_manifest, read_split
from .train.evaluation import final_eval
from .train.objectives import objective_for


def evaluate_adapter(adapter_dir: str | Path, manifest: Any, *, split: str = "test",
                     batch_size: int = 16, max_batches: int | None = None) -> dict[str, float]:
    """``eval_loss`` and ``eval_accuracy``, ``eval_ece``, ``eval_nll`` (classification) or
    ``perplexity`` (LMs) of the adapter on ``split``; ``rows`` evaluated."""
    info = read_manifest(manifest)
    rows = read_split(info, split)
    if not rows:
        raise DatasetError(f"dataset {info.dataset_id}: split {split!r} is empty")
    meta = pipeline_info(adapter_dir)
    if meta.get("task") != info.task:
        raise DatasetError(
            f"adapter {adapter_dir} was trained for {meta.get('task')!r}, dataset "
            f"{info.dataset_id} is {info.task!r}"
        )
    base = models.load_model(meta["model"], info.task, num_labels=info.num_labels,
                             quantization=meta.get("quantization"))
    pm = peft_core.load_adapter(base, adapter_dir)
    pm.eval()
    batches = eval_batches(rows, Collator(info), batch_size=batch_size, rank=0, world=1,
                           max_batches=max_batches)
    with torch.no_grad():  # the posterior predictive turns gradients on where it needs them
        out = final_eval(pm, pm, batches, batches[0], objective_for(info), torch.device("cpu"))
    pm.eval()  # the training stage's evaluate switches back to train mode
    return {**out, "rows": float(sum(b["input_ids"].shape[0] for b in batches if b is not None))}
