"""Which form an instruction dataset's rows take, decided once per prepare: ``data.
chat_format: auto`` becomes the format the first row shows (OpenAI ``messages``, ShareGPT
``conversations``, Alpaca ``instruction``/``output``), or ``prompt_response``."""

from __future__ import annotations

from typing import Any

from .chat import detect_format
from .config import CONVERSATIONS, DataConfig
from .rejects import Reject

#: columns read to recognise a row's form
_PROBE_COLUMNS = ["messages", "conversations", "instruction", "output", "prompt", "response"]


def resolved(config: DataConfig, srcs: list[Any]) -> DataConfig:
    """``config`` with ``chat_format`` decided (never ``auto`` for an instruction task)."""
    if config.task != "instruction" or config.chat_format != "auto":
        return config
    row = _first_row(config, srcs)
    fmt = None if row is None else _format_of(config, row)
    return config.model_copy(update={"chat_format": fmt or "prompt_response"})


def _first_row(config: DataConfig, srcs: list[Any]) -> dict[str, Any] | None:
    from .readers import parse

    columns = _PROBE_COLUMNS + ([config.messages_field] if config.messages_field else [])
    for src in srcs:
        for _, row, _ in parse(src, columns):
            if isinstance(row, dict) and not isinstance(row, Reject) and row:
                return row
    return None


def _format_of(config: DataConfig, row: dict[str, Any]) -> str | None:
    if config.messages_field and isinstance(row.get(config.messages_field), list):
        turns = row[config.messages_field]
        first = turns[0] if turns and isinstance(turns[0], dict) else {}
        return "sharegpt" if "from" in first or "value" in first else "messages"
    fmt = detect_format(row)
    return fmt if fmt in CONVERSATIONS else None
