"""The bottom layer of adapter files: folder writes that never leave half a folder, and
reading and writing the two files of an adapter folder and of Hugging Face peft's.

Nothing here knows about models or methods, so every other module may use it:
``adapter_config.json`` (JSON) + ``adapter.safetensors`` (tensors; never pickle).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import PeftError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
#: the version of the adapter folder's layout, written into every config
FORMAT_VERSION = 1


def atomic_folder(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` then move ``tmp_dir`` to ``path``, replacing any old folder.

    The temporary folder is a sibling renamed into place, so an interrupted write never
    leaves a half-written folder that later reads as if it were complete.
    """
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


def write_adapter_folder(
    path: str | Path, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> Path:
    """Write ``config`` as ``adapter_config.json`` and ``state`` as ``adapter.safetensors``."""

    def write(tmp: Path) -> None:
        save_file(dict(state), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))

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


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """``adapter.safetensors`` of the folder: a plain file inside it (a link out of the
    folder is refused) that safetensors can read; every failure names the file."""
    folder = Path(path).resolve()
    file = Path(path) / WEIGHTS_FILE
    if not file.exists():
        raise PeftError(f"{file}: not found; an adapter folder holds {CONFIG_FILE} and "
                        f"{WEIGHTS_FILE}")
    real = file.resolve()
    if real.parent != folder or not real.is_file():
        raise PeftError(f"{file}: points outside the adapter folder ({real}); expected a "
                        "plain file inside it")
    try:
        return load_file(str(real))
    except (SafetensorError, OSError, ValueError) as e:
        raise PeftError(f"{file}: not a readable safetensors file ({e}); expected the "
                        f"{WEIGHTS_FILE} that peft_core saves") from None


def write_hf_folder(tmp: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Hugging Face peft's ``adapter_config.json`` + ``adapter_model.safetensors`` in ``tmp``
    (shared by the methods' exporters)."""
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(tmp / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
