"""Many adapters over one base model in one process.

Every adapter gets its own module tree (peft_core injects into the model it is given), but
the tree is a ``deepcopy`` whose memo maps each frozen base tensor to itself, so all trees
share the base weights' storage: N adapters cost one base plus N adapters. Tensors the
adapter's file overwrites (a classifier's new head, every weight of ``full``) are copied, so
one adapter never writes into another's. Eviction (an LRU) is the caller's: Ray Serve's
model multiplexing in :mod:`pipelines.serve.app`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

import peft_core
from peft_core.io import WEIGHTS_FILE

from .local import LoadedAdapter, ServeError, load_base, load_folder, pipeline_info


def _overwritten(folder: Path) -> set[str]:
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        return set(f.keys())


class SharedBase:
    """One base model (named by an adapter's ``pipeline`` block) and its fingerprint;
    :meth:`attach` puts an adapter on a copy of it that shares the frozen weights."""

    def __init__(self, info: dict[str, Any]):
        self.info = dict(info)
        self.base, self.tokenizer = load_base(self.info)
        self.base.eval().requires_grad_(False)
        self.fingerprint = peft_core.fingerprint(self.base)

    def _check(self, folder: Path, info: dict[str, Any]) -> None:
        if info["task"] != self.info["task"] or info["model"] != self.info["model"]:
            raise ServeError(
                f"{folder}: built on another base ({info['model']!r}, {info['task']}) than "
                f"this server's ({self.info['model']!r}, {self.info['task']})")
        if len(info.get("label_names") or []) != len(self.info.get("label_names") or []):
            n, own = len(info.get("label_names") or []), len(self.info.get("label_names") or [])
            raise ServeError(f"{folder}: {n} labels; this server's base has a {own}-class head")
        diff = _differences(folder, self.fingerprint)
        if diff:
            raise ServeError(f"{folder}: adapter was trained on another base model; "
                             + "; ".join(diff))

    def attach(self, folder: str | Path, *, source: str | None = None) -> LoadedAdapter:
        folder = Path(folder)
        info = pipeline_info(folder)
        self._check(folder, info)
        own = _overwritten(folder)
        memo: dict[int, Any] = {}
        for name, t in [*self.base.named_parameters(), *self.base.named_buffers()]:
            if name not in own:
                memo[id(t)] = t
        with torch.no_grad():
            model = copy.deepcopy(self.base, memo)
        # the fingerprint was checked above on the shared base; the copy has the same tensors
        adapter = load_folder(folder, source=source, base=model, tokenizer=self.tokenizer,
                              check_base=False)
        adapter.label_names = info.get("label_names")
        return adapter


def _differences(folder: Path, fingerprint: dict[str, Any]) -> list[str]:
    from peft_core.fingerprint import differences

    return differences(peft_core.read_adapter_config(folder)["base_model"], fingerprint)
