"""Adapter folders, the user-facing functions: save, load (refusing another base model),
export to Hugging Face peft. The files themselves are :mod:`peft_core.files`; this module
sits on top of :mod:`peft_core.model`, since loading applies a method to a base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .config import MethodConfig, config_class
from .errors import ConfigError, FingerprintMismatchError
from .files import (
    CONFIG_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    atomic_folder,
    read_adapter_config,
    read_adapter_weights,
)
from .fingerprint import differences, fingerprint
from .model import METHOD_STATE, PeftModel, apply

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "atomic_folder",
    "export_hf",
    "load_adapter",
    "read_adapter_config",
    "save_adapter",
]


def save_adapter(peft_model: PeftModel, path: str | Path, **extra: Any) -> Path:
    """Save the adapter of ``peft_model`` to the folder ``path``; ``extra`` goes in the config."""
    return peft_model.save(path, **extra)


def load_adapter(model: nn.Module, path: str | Path, *, check_base: bool = True) -> PeftModel:
    """Apply the adapter saved at ``path`` to the base ``model`` and load its weights.

    With ``check_base`` (the default) a different base model is an error that names each
    differing fingerprint field.
    """
    cfg = read_adapter_config(path)
    if check_base:
        # An adapter trained on a quantized base identifies it without the linear weights'
        # values, so it is checked the same way on a full-precision base.
        invariant = cfg["base_model"].get("hash") == "linear-shapes"
        diff = differences(cfg["base_model"],
                           fingerprint(model, quantization_invariant=invariant or None))
        if diff:
            raise FingerprintMismatchError(
                f"{path}: adapter was trained on another base model; " + "; ".join(diff)
            )
    state = read_adapter_weights(path)  # before apply: a bad file leaves the model untouched
    method_cfg, run_state = _split_run_state(cfg)
    peft_model = apply(model, MethodConfig.from_dict(method_cfg))
    if run_state:
        peft_model.restore_run_state(run_state)
    peft_model.load_adapter_state_dict(state)
    return peft_model


def _split_run_state(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method config, run-time state) of an adapter config. Adapters saved by older
    versions keep some run-time state in the method config (the config class names those
    fields, ``former_fields``); it is read from there too."""
    method_cfg = dict(cfg["method"])
    run_state = dict(cfg.get(METHOD_STATE) or {})
    try:
        former = config_class(method_cfg.get("name")).former_fields
    except (ConfigError, TypeError):
        former = ()  # MethodConfig.from_dict names the problem
    for field in former:
        if field in method_cfg:
            run_state.setdefault(field, method_cfg.pop(field))
    return method_cfg, run_state


def export_hf(peft_model: PeftModel, path: str | Path) -> Path:
    """Write the adapter in Hugging Face ``peft``'s folder format (for methods it shares)."""
    return peft_model.export_hf(path)
