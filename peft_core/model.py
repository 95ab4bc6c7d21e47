"""``apply(model, config) -> PeftModel``: freeze the base, inject the method, expose it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import targets
from .config import MethodConfig
from .errors import ConfigError, PeftError
from .files import FORMAT_VERSION, atomic_folder, write_adapter_folder
from .fingerprint import fingerprint
from .method import Method
from .registry import get
from .version import __version__

#: the adapter config's section for the method's run-time state (:meth:`Method.run_state`)
METHOD_STATE = "method_state"


def apply(model: nn.Module, config: MethodConfig | Mapping[str, Any]) -> PeftModel:
    """Wrap ``model`` (modified in place) with the PEFT method described by ``config``.

    ``config`` is a :class:`MethodConfig` or its dict form (``{"name": "lora", "rank": 8}``).
    """
    if isinstance(model, PeftModel):
        raise PeftError("model already has a PEFT method applied; apply to the base model")
    if not isinstance(config, MethodConfig):
        config = MethodConfig.from_dict(dict(config))
    else:
        config.validate()
    method = get(config.name)(config)
    if method.writes_base_weights and targets.has_quantized_layers(model):
        raise PeftError(
            f"method {config.name!r} trains the base weights themselves, and this base model's "
            "linear layers are quantized (bitsandbytes); load the base in full precision, or "
            "use a method that keeps the base frozen (lora, dora, ia3, vera, adapters, prompts)"
        )
    base_fp = fingerprint(model)
    targets.keep_4bit_layers_differentiable(model)
    model.requires_grad_(False)
    if config.train_head:
        for head in targets.new_task_heads(model):
            if targets.has_quantized_layers(model.get_submodule(head)):
                raise PeftError(
                    f"task head {head!r} is quantized, so it cannot be trained; keep it in full "
                    "precision (bitsandbytes' llm_int8_skip_modules; model.quantization does)"
                )
            model.get_submodule(head).requires_grad_(True)
    method.inject(model)
    return PeftModel(model, method, base_fp)


class PeftModel(nn.Module):
    """A base model with one PEFT method injected.

    Attribute access falls through to the base model, so ``peft_model.config`` or
    ``peft_model.device`` work as on the original.
    """

    def __init__(self, base_model: nn.Module, method: Method, base_fingerprint: dict[str, Any]):
        super().__init__()
        self.base_model = base_model
        self.method = method
        self.base_fingerprint = base_fingerprint
        self.merged = False
        self._adapter_keys: list[str] = []
        self.record_adapter_keys()

    @property
    def method_config(self) -> MethodConfig:
        return self.method.config

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def record_adapter_keys(self) -> None:
        """Remember which tensors make up the adapter (call after a structural change)."""
        trainable = [n for n, p in self.base_model.named_parameters() if p.requires_grad]
        self._adapter_keys = trainable + self.method.extra_state_keys(self.base_model)
        if not self._adapter_keys:
            raise PeftError(f"method {self.method.config.name!r} left nothing trainable")

    # -- running -----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.method.forward(self.base_model, *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.method.generate(self.base_model, *args, **kwargs)

    def regularizer(self) -> torch.Tensor | None:
        return self.method.regularizer(self.base_model)

    def prepare(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        self.method.prepare(self, batches)
        self.record_adapter_keys()  # prepare may add or resize adapter tensors (SAM's masks)

    def finalize(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        self.method.finalize(self, batches)

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing that still back-propagates into a frozen base.

        With every base weight frozen the checkpointed segments' inputs would not require
        grad, so no gradient would reach the adapters; make the input embeddings require it.
        """
        self.base_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        self.base_model.enable_input_require_grads()

    # -- parameters --------------------------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.base_model.named_parameters() if p.requires_grad]

    def summary(self) -> dict[str, Any]:
        """Trainable and total parameter counts (ZeRO-3 safe) and the trainable fraction."""
        total = sum(targets.numel(p) for p in self.base_model.parameters())
        trainable = sum(targets.numel(p) for _, p in self.trainable_parameters())
        return {
            "method": self.method.config.name,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_fraction": trainable / total if total else 0.0,
        }

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups (never empty), e.g. LoRA+'s separate rate for B."""
        if lr <= 0:
            raise ConfigError(f"lr: expected a positive learning rate, got {lr!r}")
        return self.method.param_groups(self.trainable_parameters(), lr, weight_decay)

    # -- adapter state -----------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors only (detached CPU copies), keyed by base-model names.

        Under ZeRO-3 call it inside ``deepspeed.zero.GatheredParameters`` over the trainable
        parameters, or the partitioned tensors read as empty.
        """
        full = self.base_model.state_dict(keep_vars=True)
        state = {}
        for k in self._adapter_keys:
            t = full[k].detach()
            if t.numel() == 0 and getattr(full[k], "ds_numel", 0):
                raise PeftError(
                    f"adapter tensor {k!r} is partitioned (ZeRO-3); gather it before saving"
                )
            state[k] = t.cpu().clone().contiguous()
        return self.method.encode_state(self.base_model, state)

    def load_adapter_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load tensors from :meth:`adapter_state_dict`; keys and shapes must match exactly."""
        state = self.method.decode_state(self.base_model, dict(state))
        expected, got = set(self._adapter_keys), set(state)
        if expected != got:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise PeftError(
                f"adapter state does not fit this model: missing {missing[:8]}, "
                f"unexpected {extra[:8]}"
            )
        full = self.base_model.state_dict(keep_vars=True)
        with torch.no_grad():
            for k, v in state.items():
                dst = full[k]
                if tuple(dst.shape) != tuple(v.shape):
                    raise PeftError(
                        f"adapter tensor {k!r}: shape {tuple(v.shape)} != model's "
                        f"{tuple(dst.shape)}"
                    )
                dst.copy_(v.to(dtype=dst.dtype, device=dst.device))

    # -- merging -----------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the adapter into the base weights (exact for methods that allow it)."""
        if self.merged:
            raise PeftError("adapter is already merged")
        self.method.merge(self.base_model)
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge`, restoring the original base weights."""
        if not self.merged:
            raise PeftError("adapter is not merged")
        self.method.unmerge(self.base_model)
        self.merged = False

    def restore_run_state(self, run_state: Mapping[str, Any]) -> None:
        """Bring a freshly applied model into a saved run-time state (:meth:`Method.run_state`)
        before its adapter weights load; the adapter's tensors may change with it."""
        self.method.restore_run_state(self, run_state)
        self.record_adapter_keys()

    # -- files -------------------------------------------------------------------------------
    def save(self, path: str | Path, **extra: Any) -> Path:
        """Write the adapter folder, ``adapter_config.json`` + ``adapter.safetensors``
        (loaded by :func:`peft_core.load_adapter`); ``extra`` goes in the config."""
        state = self.adapter_state_dict()
        run_state = self.method.run_state()
        cfg = {
            "format_version": FORMAT_VERSION,
            "peft_core_version": __version__,
            "method": self.method.config.to_dict(),
            "base_model": self.base_fingerprint,
            "base_model_name_or_path": getattr(
                getattr(self.base_model, "config", None), "_name_or_path", None
            ),
            # only methods with run-time state write the section (configs stay as they were)
            **({METHOD_STATE: run_state} if run_state else {}),
            **extra,
        }
        return write_adapter_folder(path, cfg, state)

    def export_hf(self, path: str | Path) -> Path:
        """Write Hugging Face ``peft``'s format (for methods that exist there)."""
        return atomic_folder(path, lambda tmp: self.method.export_hf(self, tmp))
