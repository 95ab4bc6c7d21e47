"""The bottom layer of adapter files: file and folder writes that never leave half a file
or half a folder, and reading and writing the two files of an adapter folder and of Hugging
Face peft's.

Nothing here knows about models or methods, so every other module may use it:
``adapter_config.json`` (JSON) + ``adapter.safetensors`` (tensors; never pickle).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
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


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that takes a path (``savefig``, a CSV
    writer); when the block ends without error the file is flushed to disk and renamed over
    ``path``, otherwise it is removed. A reader sees the old file or the whole new one.

    The temporary name is hidden and ends in ``.tmp``, never in ``path``'s own suffix, so
    a reader globbing ``*.pid`` or ``*.json`` in the folder never picks up half a file
    (a writer that infers its format from the name must be told the format). The file
    gets the permissions a plain ``open(path, "w")`` would give, not ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _reserve_temp(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name points at it
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that no reader ever sees half of it (see
    :func:`atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` so that no reader ever sees half of it (see
    :func:`atomic_file`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def _reserve_temp(path: Path) -> Path:
    """A new empty file beside ``path``, created with mode 0o666 so the umask applies as
    for any other file the process writes."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


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
