"""The Ray Data transforms after reading: tokenisation in an actor pool, then packing.

:class:`EncodeBatch` is a callable class, so ``map_batches`` runs it in a pool of actors that
each load the tokenizer once. Batches are Arrow tables of candidate rows (see
:mod:`readers`); rejected rows pass through untouched so they reach the rejects file, and
the template may reject more (an instruction prompt longer than ``max_length``).

Token lists become Arrow list arrays through NumPy (offsets + flat values) rather than
``pa.array(list_of_lists)``, which costs as much as the tokenisation for short rows.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import chat, store, templates
from .validate import Reject

PASS_COLUMNS = ["_split", "_src", "_line", "_kind", "_reject", "_raw"]


def list_array(lists: list[list[int] | None], dtype: Any) -> pa.Array:
    """An Arrow ``list<dtype>`` array; ``None`` entries are nulls."""
    n = len(lists)
    lengths = np.fromiter((0 if x is None else len(x) for x in lists), np.int64, n)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = itertools.chain.from_iterable(x for x in lists if x is not None)
    values = np.fromiter(flat, dtype, int(offsets[-1]))
    nulls = [x is None for x in lists]
    mask = pa.array(nulls) if any(nulls) else None
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), mask=mask)


def ones_like(ids: pa.ListArray) -> pa.Array:
    """The attention mask of unpadded rows: a 1 for every token, same offsets and nulls."""
    values = pa.array(np.ones(len(ids.values), np.int8))
    return pa.ListArray.from_arrays(ids.offsets, values,
                                    mask=ids.is_null() if ids.null_count else None)


def _lengths(ids: pa.ListArray) -> pa.Array:
    return pc.cast(pc.list_value_length(ids), pa.int32())


class EncodeBatch:
    """Template + tokenizer over a batch of candidate rows (one instance per actor)."""

    def __init__(self, *, tokenizer: templates.TokenizerSpec, task: str, max_length: int,
                 label_names: list[str] | None, use_chat: bool, packing: bool,
                 train_on: str = "assistant"):
        # One thread per actor: the pool is the parallelism, Rust threads would oversubscribe.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.enc, self.tok = tokenizer.load()
        self.facts = tokenizer.facts
        self.task = task
        self.max_length = max_length
        self.label_index = {n: i for i, n in enumerate(label_names or [])}
        self.use_chat = use_chat
        self.packing = packing
        self.train_on = train_on

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        valid = pc.is_null(batch.column("_reject")).to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(valid)
        pick = pa.array(rows, pa.int64())
        ids: list[list[int] | None] = [None] * n
        labels: list[Any] = [None] * n
        new_rejects: dict[int, tuple[Reject, str]] = {}

        if self.task == "classification":
            texts = batch.column("text").take(pick).to_pylist()
            for r, x in zip(rows, templates.classification(self.enc, texts, self.max_length)):
                ids[r] = x
            for r, lab in zip(rows, batch.column("label").take(pick).to_pylist()):
                labels[r] = self.label_index[lab]
        elif self.task == "causal_lm":
            texts = batch.column("text").take(pick).to_pylist()
            limit = None if self.packing else self.max_length
            eos = self.facts.eos_token_id
            for r, x in zip(rows, templates.causal_lm(self.enc, texts, eos, limit)):
                ids[r] = x
        elif "conversation" in batch.column_names:
            texts = batch.column("conversation").take(pick).to_pylist()
            turns = [json.loads(t) for t in texts]
            out = chat.render(self.enc, self.tok, turns, self.max_length, train_on=self.train_on)
            for r, text, got in zip(rows, texts, out):
                if isinstance(got, Reject):
                    new_rejects[int(r)] = (got, text)
                else:
                    ids[r], labels[r] = got
        else:
            prompts = batch.column("prompt").take(pick).to_pylist()
            responses = batch.column("response").take(pick).to_pylist()
            out = templates.instruction(
                self.enc, prompts, responses, self.max_length,
                chat_tok=self.tok if self.use_chat else None,
                bos=self.facts.bos_token_id, eos=self.facts.eos_token_id)
            for r, p, got in zip(rows, prompts, out):
                if isinstance(got, Reject):
                    new_rejects[int(r)] = (got, p)
                else:
                    ids[r], labels[r] = got

        input_ids = list_array(ids, np.int32)
        cols: dict[str, pa.Array] = {
            "input_ids": input_ids,
            "attention_mask": ones_like(input_ids),
        }
        if self.task == "classification":
            cols["labels"] = pa.array(labels, pa.int64())
        elif self.task == "causal_lm":
            cols["labels"] = input_ids  # the model shifts; nothing to mask without packing
        else:
            cols["labels"] = list_array(labels, np.int32)
        cols["length"] = _lengths(input_ids)
        passed = {c: batch.column(c) for c in PASS_COLUMNS}
        if new_rejects:
            split = passed["_split"].to_pylist()
            kind, reason, raw = (passed[c].to_pylist() for c in ("_kind", "_reject", "_raw"))
            for r, (rej, prompt) in new_rejects.items():
                split[r], kind[r], reason[r] = -1, rej.kind, rej.reason
                raw[r] = prompt[:300]
            passed.update(_split=pa.array(split, pa.int8()), _kind=pa.array(kind, pa.string()),
                          _reject=pa.array(reason, pa.string()), _raw=pa.array(raw, pa.string()))
        return pa.table({**cols, **passed})


def pack_batch(batch: pa.Table, *, seq_len: int) -> pa.Table:
    """Pack the documents of each split of a batch into ``seq_len`` rows (see templates.pack).

    Runs as a plain Ray task after the actor pool; packing within a batch keeps it streaming
    (batches come in a fixed order, so the result is deterministic). Rejected rows pass.
    """
    split = batch.column("_split").to_numpy(zero_copy_only=False)
    ids_col = batch.column("input_ids")
    packed_ids: list[list[int]] = []
    packed_labels: list[list[int]] = []
    docs: list[int] = []
    splits: list[int] = []
    for s in (0, 1, 2):
        sel = np.flatnonzero(split == s)
        if not len(sel):
            continue
        for i, lab, d in templates.pack(ids_col.take(pa.array(sel)).to_pylist(), seq_len):
            packed_ids.append(i)
            packed_labels.append(lab)
            docs.append(d)
            splits.append(s)
    rej = batch.filter(pc.equal(batch.column("_split"), -1))
    ids = list_array(packed_ids + [None] * rej.num_rows, np.int32)
    m = len(packed_ids)
    nulls = lambda c, t: pa.concat_arrays(  # noqa: E731
        [pa.nulls(m, t), rej.column(c).combine_chunks().cast(t)])
    return pa.table({
        "input_ids": ids,
        "attention_mask": ones_like(ids),
        "labels": list_array(packed_labels + [None] * rej.num_rows, np.int32),
        "length": _lengths(ids),
        "_docs": pa.array(docs + [0] * rej.num_rows, pa.int32()),
        "_split": pa.array(splits + rej.column("_split").to_pylist(), pa.int8()),
        "_src": nulls("_src", pa.int32()),
        "_line": nulls("_line", pa.int64()),
        "_kind": nulls("_kind", pa.string()),
        "_reject": nulls("_reject", pa.string()),
        "_raw": nulls("_raw", pa.string()),
    })


class TokenizeAndWrite:
    """The actor of the stage: template + tokenize (+ pack) a batch, write it, return counts.

    Whole blocks arrive as batches (the read's tasks hand them over), so each block becomes
    one Parquet part per split. Part files are named after the batch's first input position
    (source, line), so their names sort in input order and do not depend on which actor
    wrote them.
    """

    def __init__(self, *, folder: str, source_uris: list[str], **encode_kwargs: Any):
        self.encode = EncodeBatch(**encode_kwargs)
        self.folder = folder
        self.source_uris = source_uris

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not batch.num_rows:
            stats = store.write_part(batch, self.folder, self.encode.task, self.source_uris, "")
            return _with_facts(stats, b"", {}, 0)
        name = f"part-{batch.column('_src')[0].as_py():05d}-{batch.column('_line')[0].as_py():012d}"
        keys, examples = _facts(batch, self.encode.task)
        out = self.encode(batch)
        full = 0
        if self.encode.packing:
            out = pack_batch(out, seq_len=self.encode.max_length)  # full rows by design
        else:
            kept = pc.greater_equal(out.column("_split"), 0)
            long = pc.greater_equal(out.column("length"), self.encode.max_length)
            full = int(pc.sum(pc.and_(kept, long).cast(pa.int64())).as_py() or 0)
        stats = store.write_part(out, self.folder, self.encode.task, self.source_uris, name)
        return _with_facts(stats, keys, examples, full)


def _facts(batch: pa.Table, task: str) -> tuple[bytes, dict[str, str]]:
    """What the driver needs beyond the counts: the valid rows' duplicate keys (16 bytes
    each, concatenated: duplicates are counted over the whole corpus on the driver) and the
    first valid input of each split (an example for the user, e.g. the serve hint)."""
    valid = batch.filter(pc.is_null(batch.column("_reject")))
    keys = b"".join(k for k in valid.column("_dup").to_pylist() if k is not None)
    col = "prompt" if task == "instruction" else "text"
    if "conversation" in batch.column_names:
        col = "conversation"
    examples: dict[str, str] = {}
    for s, split_name in enumerate(store.SPLITS):
        rows = valid.filter(pc.equal(valid.column("_split"), s))
        if rows.num_rows:
            example = rows.column(col)[0].as_py()
            if col == "conversation":  # what the user asked first
                turns = json.loads(example)
                example = next((t["content"] for t in turns if t["role"] == "user"),
                               turns[0]["content"] or "")
            examples[split_name] = example[:200]
    return keys, examples


def _with_facts(stats: pa.Table, keys: bytes, examples: dict[str, str], full: int) -> pa.Table:
    import json

    # rows that fill max_length: their input was cut there (or is exactly that long)
    stats = stats.append_column("at_max_length", pa.array([full], pa.int64()))
    stats = stats.append_column("dup_keys", pa.array([keys], pa.binary()))
    return stats.append_column("examples", pa.array([json.dumps(examples)], pa.string()))
