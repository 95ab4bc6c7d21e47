"""What becomes of a row that cannot be used: a :class:`Reject`, its kind and reason, kept
in ``rejects.jsonl`` with the row's file and line."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = (
    "missing_field",  # the column is absent or null
    "wrong_type",  # e.g. a number or a list where text is expected
    "empty",  # only whitespace
    "undecodable",  # bytes that are not UTF-8
    "invalid_json",  # a JSONL line that does not parse, or is not an object
    "bad_row",  # a CSV record with the wrong number of columns, or one the parser cannot split
    "label_type",  # a label of another type than the others (a word among integer labels)
    "oversized",  # a field longer than ``max_chars`` characters
    "unknown_label",  # a label outside the configured label set
    "too_long",  # the template leaves nothing to train on within max_length
    # conversations (pipelines.data.chat)
    "not_a_list",  # the turns column is not a list
    "empty_conversation",  # no turns
    "bad_turn",  # a turn that is not an object with a role and text
    "unknown_role",  # a role outside the format's names
    "empty_turn",  # a turn with no text
    "no_assistant_turn",  # nothing to train on
    "role_order",  # the chat template refuses the order of the roles
)


@dataclass(frozen=True)
class Reject:
    """A row left out: ``kind`` is one of :data:`KINDS`, ``reason`` names the field and what
    was expected."""

    kind: str
    reason: str
