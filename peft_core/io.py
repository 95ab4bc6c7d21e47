"""Adapter folders: ``adapter_config.json`` + ``adapter.safetensors``; never pickle.

Writes go to a temporary sibling folder renamed into place, so an interrupted save never
leaves a half-written adapter that later loads as if it were complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import MethodConfig
from .errors import FingerprintMismatchError, PeftError
from .fingerprint import differences, fingerprint
from .model import PeftModel, apply

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT_VERSION = 1


def _version() -> str:
    from . import __version__

    return __version__


def atomic_folder(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` then move ``tmp_dir`` to ``path``, replacing any old folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_adapter(peft_model: PeftModel, path: str | Path, **extra: Any) -> Path:
    """Save the adapter of ``peft_model`` to the folder ``path``; ``extra`` goes in the config."""
    state = peft_model.adapter_state_dict()
    cfg = {
        "format_version": FORMAT_VERSION,
        "peft_core_version": _version(),
        "method": peft_model.method.config.to_dict(),
        "base_model": peft_model.base_fingerprint,
        "base_model_name_or_path": getattr(
            getattr(peft_model.base_model, "config", None), "_name_or_path", None
        ),
        **extra,
    }

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))

    return atomic_folder(path, write)


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter folder, with a clear error if absent."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise PeftError(f"{path}: not an adapter folder ({CONFIG_FILE} not found)")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise PeftError(f"{file}: not UTF-8 text (byte {e.start}); expected peft_core's "
                        "adapter config (JSON)") from None
    except json.JSONDecodeError as e:
        raise PeftError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}, column "
                        f"{e.colno}); expected peft_core's adapter config") from None
    if not isinstance(cfg, dict):
        raise PeftError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    missing = [k for k in ("method", "base_model") if k not in cfg]
    if missing:
        hint = ("; is this a Hugging Face peft folder? peft_core reads its own format"
                if "peft_type" in cfg else "")
        raise PeftError(f"{file}: missing {' and '.join(repr(k) for k in missing)}{hint}")
    for key in ("method", "base_model"):
        if not isinstance(cfg[key], dict):
            raise PeftError(f"{file}: {key!r} must be an object, got {type(cfg[key]).__name__}")
    return cfg


def _read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """``adapter.safetensors`` of the folder: a plain file inside it (a link out of the
    folder is refused) that safetensors can read; every failure names the file."""
    folder = Path(path).resolve()
    file = Path(path) / WEIGHTS_FILE
    if not file.exists():
        raise PeftError(f"{file}: not found; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    real = file.resolve()
    if real.parent != folder or not real.is_file():
        raise PeftError(f"{file}: points outside the adapter folder ({real}); expected a "
                        "plain file inside it")
    from safetensors import SafetensorError

    try:
        return load_file(str(real))
    except (SafetensorError, OSError, ValueError) as e:
        raise PeftError(f"{file}: not a readable safetensors file ({e}); expected the "
                        f"{WEIGHTS_FILE} that peft_core saves") from None


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
        diff = differences(cfg["base_model"], fingerprint(model, quantization_invariant=invariant or None))
        if diff:
            raise FingerprintMismatchError(
                f"{path}: adapter was trained on another base model; " + "; ".join(diff)
            )
    state = _read_weights(path)  # before apply: a bad file leaves the model untouched
    peft_model = apply(model, MethodConfig.from_dict(cfg["method"]))
    peft_model.load_adapter_state_dict(state)
    return peft_model


def export_hf(peft_model: PeftModel, path: str | Path) -> Path:
    """Write the adapter in Hugging Face ``peft``'s folder format (for methods it shares)."""
    return atomic_folder(path, lambda tmp: peft_model.method.export_hf(peft_model, tmp))


def write_hf_folder(tmp: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Shared by method exporters: peft's ``adapter_config.json`` + ``adapter_model.safetensors``."""
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(tmp / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
