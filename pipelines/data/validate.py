"""Check one parsed row against the task's schema.

A row is a dict from a reader. It passes when every field the task needs is there, has the
right type and is not blank; the result is the fields as clean strings under their
canonical names (``text``, ``label``, ``prompt``, ``response``; a conversation's turns
as JSON under ``conversation``). Otherwise the result is a
:class:`Reject` whose ``kind`` is one of :data:`KINDS` and whose ``reason`` names the
column and what was expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .chat import FORMAT_COLUMNS, SOURCE_COLUMNS, conversation
from .rejects import KINDS, Reject  # noqa: F401  (the kinds rows are checked for)


def _surrogates(s: str) -> bool:
    # Readers decode with errors="surrogateescape": bytes that are not UTF-8 come back as
    # lone surrogates U+DC80..U+DCFF, which this finds without a second decode.
    return any("\udc80" <= ch <= "\udcff" for ch in s) if not s.isascii() else False


@dataclass(frozen=True)
class RowSpec:
    """The task's columns (canonical -> source name) and, optionally, the allowed labels."""

    fields: tuple[tuple[str, str], ...]
    labels: frozenset[str] | None = None
    max_chars: int | None = None
    chat: str | None = None  # a conversation format: the row is read by pipelines.data.chat

    @classmethod
    def of(cls, fields: dict[str, str], labels: list[str] | None = None,
           max_chars: int | None = None, chat: str | None = None) -> RowSpec:
        return cls(tuple(fields.items()), frozenset(labels) if labels is not None else None,
                   max_chars, chat)

    @property
    def columns(self) -> list[str]:
        if self.chat == "alpaca":
            return list(SOURCE_COLUMNS["alpaca"])
        return [src for _, src in self.fields]

    def check_conversation(self, row: dict[str, Any]) -> dict[str, str] | Reject:
        """A conversation row as ``{"conversation": its turns as JSON}``, or a Reject."""
        if self.chat != "alpaca":
            ((_, col),) = self.fields
            if row.get(col) is None:
                return Reject("missing_field", f"missing field {col!r}")
            row = {FORMAT_COLUMNS[self.chat]: row[col]}
        turns = conversation(row, self.chat)
        if isinstance(turns, Reject):
            return turns
        text = "".join(t["content"] or "" for t in turns)
        if _surrogates(text):
            return Reject("undecodable", "a turn has bytes that are not UTF-8")
        if self.max_chars is not None and len(text) > self.max_chars:
            return Reject("oversized", f"the turns hold {len(text):,} characters, more than "
                                       f"data.max_chars ({self.max_chars:,})")
        return {"conversation": json.dumps(turns, ensure_ascii=False)}

    def check(
        self, row: Any, class_names: dict[str, list[str]] | None = None
    ) -> dict[str, str] | Reject:
        if not isinstance(row, dict):
            return Reject("invalid_json", f"row is not an object (got {type(row).__name__})")
        if self.chat is not None:
            return self.check_conversation(row)
        out: dict[str, str] = {}
        for canon, col in self.fields:
            v = row.get(col)
            if v is None:
                return Reject("missing_field", f"missing field {col!r}")
            if canon == "label":
                if class_names and col in class_names and isinstance(v, int):
                    names = class_names[col]
                    if not 0 <= v < len(names):
                        return Reject("unknown_label", f"{col!r}: class index {v} outside "
                                                       f"the {len(names)} ClassLabel names")
                    v = names[v]
                got = _label(v)
                if isinstance(got, Reject):
                    return Reject(got.kind, f"{col!r}: {got.reason}")
                if self.labels is not None and got not in self.labels:
                    return Reject("unknown_label", f"{col!r}: label {got!r} is not one of "
                                                   f"{sorted(self.labels)}")
                out[canon] = got
                continue
            if isinstance(v, (bytes, bytearray)):
                try:
                    v = bytes(v).decode("utf-8")
                except UnicodeDecodeError:
                    return Reject("undecodable", f"{col!r}: bytes that are not UTF-8")
            if not isinstance(v, str):
                return Reject("wrong_type", f"{col!r}: expected a string, got "
                                            f"{type(v).__name__} {_short(v)}")
            if _surrogates(v):
                return Reject("undecodable", f"{col!r}: bytes that are not UTF-8")
            if not v.strip():
                return Reject("empty", f"{col!r}: empty text")
            if self.max_chars is not None and len(v) > self.max_chars:
                return Reject("oversized", f"{col!r}: {len(v):,} characters, more than "
                                           f"data.max_chars ({self.max_chars:,})")
            out[canon] = v
        return out


def _label(v: Any) -> str | Reject:
    """Labels are compared as text: ``1``, ``1.0`` and ``"1"`` are the same class."""
    if isinstance(v, bool):
        return Reject("wrong_type", f"expected a string or an integer label, got bool {v}")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (bytes, bytearray)):
        try:
            v = bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            return Reject("undecodable", "bytes that are not UTF-8")
    if isinstance(v, str):
        if _surrogates(v):
            return Reject("undecodable", "bytes that are not UTF-8")
        if not v.strip():
            return Reject("empty", "empty label")
        return v.strip()
    return Reject("wrong_type", f"expected a string or an integer label, got "
                                f"{type(v).__name__} {_short(v)}")


def _short(v: Any, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def sort_labels(labels: list[str]) -> list[str]:
    """Inferred label order: numeric when every label is an integer, else alphabetical."""
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


def is_integer_label(label: str) -> bool:
    """``"3"`` or ``"-1"``: what an integer label looks like once read as text."""
    return label.lstrip("-").isdigit()


def label_type_drift(labels: list[str]) -> tuple[list[int], str] | None:
    """Positions of the labels whose type differs from the majority's (integers against
    words), and why; None when all labels have one type. A word among integer labels is
    far more often a shifted column or a stray header than a new class."""
    ints = [is_integer_label(x) for x in labels]
    n_int = sum(ints)
    if n_int in (0, len(labels)):
        return None
    keep_ints = n_int >= len(labels) - n_int
    odd = [i for i, v in enumerate(ints) if v != keep_ints]
    kind = "integer" if keep_ints else "non-integer"
    return odd, f"{len(labels) - len(odd)} other labels are {kind}"
