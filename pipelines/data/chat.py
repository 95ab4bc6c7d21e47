"""Conversations: the chat data users have, read into one form and rendered for training.

Three row shapes are read, each into a list of OpenAI-style turns ``{"role", "content"}``
(plus ``tool_calls``/``name`` where present), the form ``tokenizer.apply_chat_template``
takes:

- ``messages``: OpenAI's ``{"messages": [{"role": ..., "content": ...}, ...]}``, roles
  ``system``, ``user``, ``assistant``, ``tool``;
- ``sharegpt``: ``{"conversations": [{"from": ..., "value": ...}, ...]}``, its usual role
  names mapped (``human`` -> user, ``gpt`` -> assistant, ``function_call`` -> assistant,
  ``observation`` -> tool, ...);
- ``alpaca``: ``{"instruction", "input" (optional), "output"}``: one user turn (the
  instruction, then the input after a blank line) and one assistant turn.

Rendering (:func:`render`) finds the assistant turns' tokens from the tokenizer's own chat
template, never from guessed marker strings: the text of turn ``i`` is what rendering the
first ``i + 1`` turns adds to rendering the first ``i`` with the generation prompt. The
trained span of an assistant turn is its content and the end-of-turn marker the template
writes after it; the separator whitespace after that marker is not trained (nothing is
learnt from it, and it is where TRL's generation markers end a turn). The token ids
are the whole rendered text tokenized once, as serving tokenizes a rendered prompt;
:func:`check_template` refuses a template whose prompt for an assistant turn does not
tokenize to a prefix of the conversation's tokens, so a conversation rendered for
``/v1/chat/completions`` (its turns so far plus the generation prompt) is token for token
the prefix trained on.

Pure functions over Python rows, no Ray: the data stage's tokenizer actors call them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from .config import DataError
from .rejects import Reject

IGNORE = -100
ChatFormat = Literal["messages", "sharegpt", "alpaca"]
CHAT_FORMATS: tuple[str, ...] = ("messages", "sharegpt", "alpaca")
TrainOn = Literal["assistant", "last_assistant", "all"]

#: the column each format is recognised by (``data.chat_format: auto``)
FORMAT_COLUMNS = {"messages": "messages", "sharegpt": "conversations", "alpaca": "instruction"}
ROLES = ("system", "user", "assistant", "tool")
#: ShareGPT's role names (and other exporters' spellings) -> OpenAI roles
ROLE_ALIASES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant",
    "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "model": "assistant", "function_call": "assistant", "tool": "tool", "function": "tool",
    "observation": "tool", "ipython": "tool",
}
#: reject kinds of a conversation (listed with the others in rejects.KINDS)
CHAT_KINDS = ("not_a_list", "empty_conversation", "bad_turn", "unknown_role", "empty_turn",
              "no_assistant_turn", "role_order")
#: the source columns each format reads
SOURCE_COLUMNS = {"messages": ("messages",), "sharegpt": ("conversations",),
                  "alpaca": ("instruction", "input", "output", "system")}


class ChatTemplateError(DataError):
    """The tokenizer's chat template cannot mark the assistant turns (names the fix)."""


def detect_format(columns: Iterable[str]) -> str | None:
    """The conversation format a table's columns show, or None (a prompt/response table)."""
    cols = set(columns)
    for fmt, col in FORMAT_COLUMNS.items():
        if col in cols:
            return fmt
    return None


def conversation(row: Mapping[str, Any], fmt: str) -> list[dict[str, Any]] | Reject:
    """One row as OpenAI-style turns, or the reason it is not a conversation."""
    if fmt == "alpaca":
        turns = _alpaca(row)
    else:
        key = FORMAT_COLUMNS[fmt]
        raw = row.get(key)
        if not isinstance(raw, (list, tuple)):
            return Reject("not_a_list", f"{key!r}: expected a list of turns, got "
                                        f"{type(raw).__name__}")
        turns = _turns(raw, key, sharegpt=fmt == "sharegpt")
    if isinstance(turns, Reject):
        return turns
    return check_turns(turns)


def _alpaca(row: Mapping[str, Any]) -> list[dict[str, Any]] | Reject:
    out = []
    for field in ("instruction", "output"):
        if not isinstance(row.get(field), str):
            return Reject("bad_turn", f"{field!r}: expected text, got "
                                      f"{type(row.get(field)).__name__}")
    extra = row.get("input")
    prompt = row["instruction"]
    if isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        out.append({"role": "system", "content": system})
    out += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return out


def _turns(raw: Sequence[Any], key: str, *, sharegpt: bool) -> list[dict[str, Any]] | Reject:
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    out = []
    for i, t in enumerate(raw):
        if not isinstance(t, Mapping):
            return Reject("bad_turn", f"{key}[{i}]: expected an object with {role_key!r} and "
                                      f"{text_key!r}, got {type(t).__name__}")
        name = t.get(role_key)
        role = ROLE_ALIASES.get(str(name).lower()) if isinstance(name, str) else None
        if role is None or (not sharegpt and name not in ROLES):
            return Reject("unknown_role", f"{key}[{i}].{role_key}: {name!r} is not one of "
                                          f"{sorted(ROLE_ALIASES) if sharegpt else list(ROLES)}")
        turn: dict[str, Any] = {"role": role, "content": t.get(text_key)}
        for extra in ("tool_calls", "name", "tool_call_id"):
            if t.get(extra) is not None:
                turn[extra] = t[extra]
        out.append(turn)
    return out


def check_turns(turns: list[dict[str, Any]]) -> list[dict[str, Any]] | Reject:
    """Turns a template can render and a run can learn from: not empty, every turn with
    text (an assistant turn may carry only ``tool_calls``), at least one assistant turn."""
    if not turns:
        return Reject("empty_conversation", "the conversation has no turns")
    for i, t in enumerate(turns):
        text = t.get("content")
        if text is None and t.get("tool_calls") and t["role"] == "assistant":
            continue
        if not isinstance(text, str):
            return Reject("bad_turn", f"turn {i} ({t['role']}): expected text content, got "
                                      f"{type(text).__name__}")
        if not text.strip():
            return Reject("empty_turn", f"turn {i} ({t['role']}) has no text")
    if not any(t["role"] == "assistant" for t in turns):
        return Reject("no_assistant_turn", "no assistant turn: nothing to train on")
    return turns


@dataclasses.dataclass(frozen=True)
class Segment:
    """A stretch of the rendered conversation: its text and whether it is trained."""

    text: str
    trained: bool


def segments(tok: Any, turns: list[dict[str, Any]], train_on: str = "assistant"
             ) -> list[Segment] | Reject:
    """The rendered conversation cut at its assistant turns' boundaries; a Reject when the
    template refuses the conversation or does not render its first turns as a prefix of
    the whole (then this conversation's turns have no stable boundary)."""
    try:
        full = _render(tok, turns, generation=False)
        assistants = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
        if train_on == "last_assistant":
            assistants = assistants[-1:]
        bounds = [(_render(tok, turns[:i], generation=True) if i else "",
                   _render(tok, turns[: i + 1], generation=False)) for i in assistants]
    except Exception as e:  # jinja's TemplateError (raise_exception in the template), ...
        return Reject("role_order", f"the chat template refuses the conversation: {e}")
    out: list[Segment] = []
    done = 0
    for head, through in bounds:
        if not (full.startswith(through) and through.startswith(head) and len(head) >= done):
            return Reject("role_order", "the chat template does not render this "
                                        "conversation's first turns as a prefix of the whole")
        end = len(through.rstrip())
        if head[done:]:
            out.append(Segment(head[done:], train_on == "all"))
        out.append(Segment(through[len(head):end], True))
        done = end
    if full[done:]:
        out.append(Segment(full[done:], train_on == "all"))
    return out


#: a conversation every chat template must cut cleanly (system, two user/assistant rounds)
PROBE = [{"role": "system", "content": "Answer briefly."},
         {"role": "user", "content": "What is 2 + 2?"},
         {"role": "assistant", "content": "4."},
         {"role": "user", "content": "And 3 + 3?"},
         {"role": "assistant", "content": "6."}]


def check_template(tok: Any) -> None:
    """Refuse, at load, a tokenizer whose chat template cannot mark assistant turns: the
    probe conversation must cut into exactly its two assistant turns, each starting with
    its own content."""
    name = getattr(tok, "name_or_path", None) or type(tok).__name__
    if not getattr(tok, "chat_template", None):
        raise ChatTemplateError(f"tokenizer {name!r} has no chat template; give "
                                "data.chat_template")
    segs = segments(tok, PROBE)
    trained = [] if isinstance(segs, Reject) else [s.text for s in segs if s.trained]
    answers = [t["content"] for t in PROBE if t["role"] == "assistant"]
    if len(trained) != len(answers) or not all(
            t.startswith(a) for t, a in zip(trained, answers)):
        raise ChatTemplateError(
            f"tokenizer {name!r}: its chat template does not render a conversation's first "
            "turns as a prefix of the whole, so assistant turns cannot be found; give "
            "data.chat_template (a template that does)")
    full = _ids(tok, _render(tok, PROBE, generation=False))
    for i, t in enumerate(PROBE):
        prompt = _ids(tok, _render(tok, PROBE[:i], generation=True)) if i else []
        if t["role"] == "assistant" and full[:len(prompt)] != prompt:
            raise ChatTemplateError(
                f"tokenizer {name!r}: the prompt its chat template renders for an assistant "
                "turn tokenizes differently inside the whole conversation (a token crosses "
                "the turn's start), so a served prompt would not be the prefix trained on; "
                "give data.chat_template (a template whose turns start on a token boundary)")


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _render(tok: Any, turns: list[dict[str, Any]], *, generation: bool) -> str:
    return tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation)


def render(enc: Any, tok: Any, conversations: list[list[dict[str, Any]]], max_length: int, *,
           train_on: str = "assistant") -> list[tuple[list[int], list[int]] | Reject]:
    """``(input_ids, labels)`` per conversation, untrained positions labelled -100; or a
    Reject. ``enc`` is the data stage's :class:`~pipelines.data.templates.Encoder` (the
    rendered text's ids, no special tokens added: the template writes its own), ``tok`` the
    Hugging Face tokenizer whose template renders (:func:`check_template` first). A
    conversation longer than ``max_length`` is cut after the last trained token that fits
    (never ending in an untrained turn); one whose first trained token does not fit is a
    ``too_long`` reject."""
    out: list[tuple[list[int], list[int]] | Reject] = []
    for turns in conversations:
        segs = segments(tok, turns, train_on)
        if isinstance(segs, Reject):
            out.append(segs)
            continue
        # the whole text tokenized once, as serving tokenizes a rendered prompt; a token is
        # trained when it starts inside a trained segment
        (ids, starts), = enc.ids_and_starts(["".join(s.text for s in segs)])
        trained, pos = [], 0
        for seg in segs:
            if seg.trained:
                trained.append((pos, pos + len(seg.text)))
            pos += len(seg.text)
        labels = [t if any(a <= c < b for a, b in trained) else IGNORE
                  for t, c in zip(ids, starts)]
        out.append(_cut(ids, labels, max_length))
    return out


def _cut(ids: list[int], labels: list[int], max_length: int
         ) -> tuple[list[int], list[int]] | Reject:
    first = next((i for i, x in enumerate(labels) if x != IGNORE), None)
    if first is None:
        return Reject("too_long", "the assistant turns render to no tokens")
    if first >= max_length:
        return Reject("too_long", f"the first trained token is at position {first} and "
                                  f"max_length is {max_length}: no assistant token fits")
    if len(ids) <= max_length:  # whole: the template's closing separator stays
        return ids, labels
    # cut after the last trained token that fits: never ending in an untrained turn
    end = max(i for i in range(max_length) if labels[i] != IGNORE) + 1
    return ids[:end], labels[:end]


def trained_tokens(labels: Sequence[int]) -> int:
    """Positions a causal LM's shifted loss trains on (labels after the first)."""
    return sum(1 for x in labels[1:] if x != IGNORE)
