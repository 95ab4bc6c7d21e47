"""Deterministic train/eval/test assignment and exact-duplicate detection.

A row's split is a function of its content and the seed only: ``blake2b(seed, key)`` read
as a number in [0, 1) is compared with the cumulative fractions. So the split never depends
on Ray's block order, on the file order, or on which other rows exist: adding rows to a
corpus never moves an old row to another split. The key is the model *input* (the text, or
the prompt), so the same input with two labels or two responses lands in one split and
cannot leak from train into test. Split sizes follow the fractions up to sampling noise
(binomial), not exactly.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.compute as pc

from .config import SplitFractions

_SEP = "\x1f"  # unit separator: cannot be confused with text inside a field


def split_input(task: str, row: dict[str, str]) -> str:
    """What decides a row's split: the text, or what an instruction is asked (its prompt,
    a conversation's turns before the first answer), so one question never lands in two
    splits."""
    if "conversation" in row:
        turns = json.loads(row["conversation"])
        first = next(i for i, t in enumerate(turns) if t["role"] == "assistant")
        return json.dumps(turns[:first], ensure_ascii=False, sort_keys=True)
    return row["prompt"] if task == "instruction" else row["text"]


def split_of(key: str, seed: int, fractions: SplitFractions) -> int:
    """0 (train), 1 (eval) or 2 (test)."""
    h = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8,
                        key=seed.to_bytes(8, "little", signed=True))
    u = int.from_bytes(h.digest(), "big") / 2.0**64
    if u < fractions.train:
        return 0
    if u < fractions.train + fractions.eval:
        return 1
    return 2


def dedup_key(row: dict[str, str]) -> bytes:
    """Identical rows (every task field equal) share this 16-byte key."""
    joined = _SEP.join(f"{k}={row[k]}" for k in sorted(row))
    return hashlib.blake2b(joined.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def order_of(source_index: int, line: int) -> int:
    """A global position (source, line) as one int64: the first occurrence wins a dedup."""
    return (source_index << 40) | line


def duplicates(table: pa.Table) -> pa.Array:
    """``_order`` of every valid row that repeats an earlier one (columns ``_dup``, ``_order``).

    "Earlier" is by (source, line), so which copy survives does not depend on block order.
    Duplicates always share a split (same content), so dropping them keeps the splits
    disjoint.
    """
    if table.num_rows == 0:
        return pa.array([], pa.int64())
    first = table.group_by("_dup").aggregate([("_order", "min")])
    keep = first.column("_order_min")
    mask = pc.invert(pc.is_in(table.column("_order"), value_set=keep))
    return table.column("_order").filter(mask).combine_chunks()
