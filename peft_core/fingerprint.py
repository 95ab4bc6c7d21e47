"""Identify a base model cheaply, so an adapter is never loaded onto the wrong one."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from . import partition, targets

#: elements sampled per tensor for the weight hash; enough to tell checkpoints apart
_SAMPLE = 257


def fingerprint(model: nn.Module, *, quantization_invariant: bool | None = None) -> dict[str, Any]:
    """Architecture facts plus a hash of a strided sample of every frozen base weight.

    On a quantized base (bitsandbytes linear layers; or with ``quantization_invariant``)
    the linear layers' weights enter by name and (out, in) shape only, since quantizing
    changes their values: an adapter trained on a 4-bit base then also loads onto the same
    base in full precision, still identified by every other tensor (embeddings, norms,
    biases). Such a fingerprint says so (``"hash": "linear-shapes"``).

    Freshly initialised task heads are excluded: they are part of the adapter, not the base.
    Sampling keeps this O(number of tensors), fast even for billion-parameter models; the
    samples are compared at bf16 precision, so the compute dtype a base is loaded in does
    not change its identity. Partitioned (ZeRO-3) weights are gathered one at a time.
    """
    cfg = getattr(model, "config", None)
    heads = tuple(h + "." for h in targets.new_task_heads(model))
    h = hashlib.sha256()
    count = 0
    quantized = targets.has_quantized_layers(model)
    invariant = quantized if quantization_invariant is None else quantization_invariant
    linear = {f"{n}.weight": targets.linear_dims(m) for n, m in model.named_modules()
              if invariant and targets.is_linear_like(m)}
    for name, p in model.named_parameters():
        if name.startswith(heads):
            continue
        if name in linear:
            d_in, d_out = linear[name]
            count += d_in * d_out
            h.update(name.encode())
            h.update(str((d_out, d_in)).encode())
            continue
        count += targets.numel(p)
        # One tensor at a time: a ZeRO-3 rank never holds more than the largest weight.
        with partition.whole([p]):
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLE)
            # Rounded to bf16 so that a base loaded in bf16 and the same base in fp32 (or
            # fp16) have one identity: an adapter trained on either loads onto both.
            sample = flat[::step][:_SAMPLE].to(torch.bfloat16).float().cpu()
        h.update(name.encode())
        h.update(str(tuple(getattr(p, "ds_shape", p.shape))).encode())
        h.update(sample.numpy().tobytes())
    return {
        "model_type": getattr(cfg, "model_type", None),
        "architecture": type(model).__name__,
        "hidden_size": getattr(cfg, "hidden_size", getattr(cfg, "n_embd", None)),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", None)),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "num_parameters": count,
        "weights_sha256": h.hexdigest(),
        **({"hash": "linear-shapes"} if invariant else {}),
        **({"quantized": True} if quantized else {}),
    }


def differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Human-readable list of fields that differ (whether a base is quantized is not one)."""
    return [
        f"{k}: adapter expects {expected.get(k)!r}, base model has {actual.get(k)!r}"
        for k in sorted(set(expected) | set(actual))
        if k != "quantized" and expected.get(k) != actual.get(k)
    ]
