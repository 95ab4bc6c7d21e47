"""Under ZeRO-3, the base model is built and loaded already partitioned: no rank ever holds it
whole.

The model is built by transformers' own DeepSpeed integration: a live ``HfDeepSpeedConfig``
makes ``from_config`` construct every module inside ``deepspeed.zero.Init``, so each weight
is partitioned the moment it exists, in the run's dtype. The weights are then read from the
safetensors checkpoint by each rank for its own partition only (a row range of each
tensor): no broadcast, no gathering, about ``1/N`` of the checkpoint read per rank.

Why not ``from_pretrained`` under the same live config (what transformers documents): its
ZeRO-3 path reads the whole checkpoint on rank 0 (memory-mapped; every page is touched as
rank 0 copies it into gathered layers) and broadcasts each layer. Measured on a 1.4 GB
fp32 Llama, 2 ranks: rank 0 peaked at 2.7 GB RSS during the load, the model's full size on
top of its partition; this loader keeps every rank at its partition plus one tensor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines import models
from pipelines.errors import InputError


class PartitionedLoadError(InputError):
    """The checkpoint cannot be loaded partitioned (names what is missing and why)."""


def load(name_or_path: str, task: str, *, num_labels: int | None, dtype: torch.dtype,
         ds_config: dict[str, Any]) -> tuple[nn.Module, Any]:
    """The base model, built partitioned by ZeRO-3 and filled from its checkpoint.

    Returns ``(model, hf_ds_config)``: keep the second alive as long as the model is used,
    since transformers consults it (weakly referenced) to know ZeRO-3 is on.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.integrations import HfDeepSpeedConfig

    path = models.resolve(name_or_path)
    files = checkpoint_files(Path(path))
    keep_alive = HfDeepSpeedConfig(ds_config)
    if task == "classification":
        if not num_labels:
            raise ValueError("num_labels: a classification model needs the number of labels")
        cfg = AutoConfig.from_pretrained(path, num_labels=num_labels)
        if cfg.pad_token_id is None:
            cfg.pad_token_id = models.load_tokenizer(name_or_path).pad_token_id
        model = AutoModelForSequenceClassification.from_config(cfg, dtype=dtype)
    else:
        cfg = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    fill(model, files)
    model.eval()  # as from_pretrained leaves it
    return model, keep_alive


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it (single file or sharded with an index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / f for k, f in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    raise PartitionedLoadError(
        f"model.name: {str(folder)!r} has no model.safetensors (or index); ZeRO-3 partitioned "
        "loading reads safetensors checkpoints only (re-save with save_pretrained, or use "
        "zero.stage 0-2)"
    )


def _checkpoint_key(name: str, prefix: str, keys: dict[str, Path]) -> str | None:
    # A head model (e.g. ...ForSequenceClassification) over a base-model checkpoint names
    # its tensors with the base model's prefix; and the other way round.
    if name in keys:
        return name
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in keys:
        return name[len(prefix) + 1:]
    if prefix and f"{prefix}.{name}" in keys:
        return f"{prefix}.{name}"
    return None


def fill(model: nn.Module, files: dict[str, Path]) -> None:
    """Copy every checkpoint tensor into this rank's partition of the model's parameter.

    Parameters the checkpoint lacks must be new task heads (initialised by transformers);
    anything else missing is an error, never a silently random weight.
    """
    from peft_core import targets

    prefix = getattr(model, "base_model_prefix", "") or ""
    heads = tuple(h + "." for h in targets.new_task_heads(model))
    missing = []
    for name, p in model.named_parameters():
        key = _checkpoint_key(name, prefix, files)
        if key is None:
            if not name.startswith(heads):
                missing.append(name)
            continue
        _fill_partition(p, files[key], key)
    for name, b in model.named_buffers():
        key = _checkpoint_key(name, prefix, files)
        if key is not None and b is not None:  # buffers are never partitioned
            with _open(files[key]) as f:
                b.copy_(f.get_tensor(key).to(b.dtype))
    if missing:
        raise PartitionedLoadError(
            f"model.name: the checkpoint has no tensor for {len(missing)} parameters, e.g. "
            f"{missing[:4]}; partitioned loading needs checkpoint names that match the model "
            "(as save_pretrained writes them)"
        )


def _open(file: Path):
    from safetensors import safe_open

    # One handle per tensor: the file's mapping, and the pages read through it, are
    # released at once, so a rank's resident memory never accumulates the checkpoint.
    return safe_open(str(file), framework="pt")


@torch.no_grad()
def _fill_partition(p: torch.Tensor, file: Path, key: str) -> None:
    import torch.distributed as dist

    with _open(file) as f:
        sl = f.get_slice(key)
        shape = list(sl.get_shape())
        full = list(getattr(p, "ds_shape", p.shape))
        if shape != full:
            raise PartitionedLoadError(
                f"{file}: tensor {key!r} has shape {shape}, the model expects {full}"
            )
        local = getattr(p, "ds_tensor", None)
        if local is None:  # not partitioned (e.g. below a persistence threshold)
            p.data.copy_(f.get_tensor(key).to(p.dtype))
            return
        numel = math.prod(shape)
        part = local.numel()
        group = getattr(p, "ds_process_group", None)
        start = dist.get_rank(group=group) * part
        end = min(start + part, numel)
        if start >= numel:
            return  # this rank's partition is all padding
        if len(shape) <= 1:
            values = sl[start:end] if shape else f.get_tensor(key).reshape(-1)
        else:
            row = numel // shape[0]
            r0, r1 = start // row, -(-end // row)
            values = sl[r0:r1].reshape(-1)[start - r0 * row: end - r0 * row]
        local.view(-1)[: end - start].copy_(values.to(local.dtype))
