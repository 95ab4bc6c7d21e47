"""The interface every PEFT method implements.

A method is a class registered by name (:func:`peft_core.registry.register`) with a config
dataclass. :func:`peft_core.apply` freezes the base model, then calls :meth:`Method.inject`;
everything else has a sensible default, so a simple method only writes ``inject``.
Methods that need passes outside the training loop (a mask selected from data, a projection
or a posterior fitted afterwards) override :meth:`prepare` / :meth:`finalize`, which the
training stage calls for every method without knowing its name; :meth:`on_step` runs
before every optimizer step (a phase change within training).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from . import targets
from .config import MethodConfig
from .errors import NotMergeableError, PeftError
from .layers import MergeableLayer


class Method:
    """One PEFT method bound to its config. All tensors live in modules injected into the
    model, so they move, shard and save with it; what else the method learns while running
    (a state its config does not say, such as an encoder folded away) is :meth:`run_state`."""

    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    #: human-readable family, shown by ``peftpipe methods``
    family: ClassVar[str] = ""
    #: whether merge()/unmerge() fold the method into the base weights exactly
    mergeable: ClassVar[bool] = False
    #: whether the freshly injected model computes exactly what the base model did
    identity_at_init: ClassVar[bool] = True
    #: ``finalize`` rewrites the method's trainable parameters (folding an encoder, pruning
    #: an update); a sharded runtime then gathers them around the pass. False for passes
    #: that only read the model and fill buffers (Laplace's posterior).
    finalize_writes_params: ClassVar[bool] = True
    #: whether the method trains or rewrites the base weights themselves (full fine-tuning,
    #: selective deltas); such a method refuses a quantized (bitsandbytes) base
    writes_base_weights: ClassVar[bool] = False
    #: Optional hook ``expected_trainable_params(model) -> int``: the trainable-parameter
    #: count in closed form, new task heads included, on the base model or the adapted one.
    #: A method defines it where counting the injected model is not the answer: it must read
    #: weight values to inject (PaFi, on a planner's weightless model) or its ``prepare``
    #: pass adds tensors (SAM). ``peftpipe plan`` counts from it and ``peftpipe methods``
    #: shows it; None (the default): the injected model's count is the count.
    expected_trainable_params: Callable[[nn.Module], int] | None = None

    def __init__(self, config: MethodConfig):
        self.config = config

    # -- construction -------------------------------------------------------------------
    def inject(self, model: nn.Module) -> None:
        """Add or unfreeze this method's parameters in ``model`` (the base is frozen already)."""
        raise NotImplementedError

    def extra_state_keys(self, model: nn.Module) -> list[str]:
        """Buffer names (beyond trainable parameters) an adapter file must carry, e.g. masks."""
        return []

    def head_params(self, model: nn.Module) -> int:
        """Parameters of the new task heads this method trains (``train_head``; see
        :func:`peft_core.targets.new_task_heads`): the term every closed-form
        ``expected_trainable_params`` adds."""
        return targets.new_task_head_params(model) if self.config.train_head else 0

    # -- running ---------------------------------------------------------------------------
    def forward(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Run the adapted model; prompt methods override this to change the inputs."""
        return model(*args, **kwargs)

    def generate(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return model.generate(*args, **kwargs)

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """An extra term added to the training loss (e.g. an L0 penalty); None if none."""
        return None

    # -- optimisation ----------------------------------------------------------------------
    def param_groups(
        self, named_params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        """Optimizer groups over the trainable parameters. Biases and norms get no decay."""
        decay = [p for n, p in named_params if not _no_decay(n, p)]
        no_decay = [p for n, p in named_params if _no_decay(n, p)]
        groups = [
            {"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]
        # DeepSpeed silently drops empty groups, which breaks schedulers that index them.
        return [g for g in groups if g["params"]]

    # -- passes outside the training loop --------------------------------------------------
    def prepare(self, peft_model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Called once before training with a few training batches (mask selection etc.)."""

    def finalize(
        self, peft_model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
    ) -> None:
        """Called once after training (projection to a budget, posterior fit, folding)."""

    def on_step(self, peft_model: nn.Module, step: int, total_steps: int) -> None:
        """Called before optimizer step ``step`` (0-based) of ``total_steps``, on every rank
        (e.g. diff pruning fixes its mask for the last part of training). It may change
        buffers and frozen tensors, not trainable ones: an optimizer that keeps master
        copies of those (DeepSpeed) would overwrite the change at its next step."""

    # -- run-time state --------------------------------------------------------------------
    def run_state(self) -> dict[str, Any]:
        """What the method reached while running that its adapter must carry beyond the
        config and the tensors (JSON-ready, e.g. a prompt encoder folded into its table);
        saved as the adapter config's ``method_state``. The default: nothing."""
        return {}

    def restore_run_state(self, peft_model: nn.Module, run_state: Mapping[str, Any]) -> None:
        """Put a freshly applied ``peft_model`` into a saved :meth:`run_state`, before its
        adapter weights load (:func:`peft_core.load_adapter` calls it)."""
        if run_state:
            raise PeftError(
                f"method {self.config.name!r} keeps no run-time state; the adapter "
                f"has {sorted(run_state)}"
            )

    # -- merging ---------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        """Fold every :class:`~peft_core.layers.MergeableLayer` into its base weight."""
        self._merge_layers(model, unmerge=False)

    def unmerge(self, model: nn.Module) -> None:
        self._merge_layers(model, unmerge=True)

    def _merge_layers(self, model: nn.Module, *, unmerge: bool) -> None:
        if not self.mergeable:
            raise NotMergeableError(
                f"method {self.config.name!r} keeps its parameters outside the base weights, "
                "so it cannot be merged into them; serve it with the adapter attached instead"
            )
        for module in model.modules():
            if isinstance(module, MergeableLayer):
                module.unmerge() if unmerge else module.merge()

    # -- file formats ----------------------------------------------------------------------
    def encode_state(
        self, model: nn.Module, state: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Transform the adapter state before saving (e.g. keep only non-zero entries)."""
        return state

    def decode_state(
        self, model: nn.Module, state: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`encode_state`."""
        return state

    def export_hf(self, peft_model: nn.Module, path: Path) -> dict[str, Any]:
        """Write Hugging Face ``peft``'s folder format; returns its adapter_config."""
        raise PeftError(
            f"method {self.config.name!r} has no Hugging Face peft equivalent to export to"
        )


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
