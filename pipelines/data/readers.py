"""Read each input file into validated rows: the Ray Data read side of the stage.

Each format has a record iterator that yields ``(line, row_or_reject, raw)``; ``line`` is
the 1-based physical line where the record starts for JSONL and CSV/TSV (the header is
line 1) and the 1-based row number for Parquet and Arrow. Parsing is lenient per row: a
line that is not UTF-8 or not JSON, or a CSV record with the wrong number of columns,
becomes one rejected row instead of failing the file. Bytes are decoded with
``surrogateescape`` so undecodable text is caught by :mod:`validate` per field.

:class:`CorpusDatasource` makes one read task per file that yields Arrow blocks of
*candidate rows*: the task's fields as strings, their split and dedup keys, and for a
rejected row its kind, reason and a snippet of the raw input.
"""

from __future__ import annotations

import csv
import functools
import json
import sys
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from .config import SplitFractions
from .sources import Source
from .split import dedup_key, order_of, split_input, split_of
from .validate import Reject, RowSpec

RAW_SNIPPET = 300  # characters of a rejected row kept in rejects.jsonl
Parsed = tuple[int, Any, Any]  # line, row dict or Reject, raw input


def _open(source: Source):
    return source.fs.open_input_stream(source.path, compression="detect")


def _byte_lines(stream, chunk: int = 1 << 22, limit: int = -1, first: int = 1
                ) -> Iterator[tuple[int, bytes]]:
    """Numbered lines without their end-of-line bytes, read in chunks (any file size);
    at most ``limit`` bytes when it is not -1, numbering from ``first``."""
    n, tail = first - 1, b""
    while limit:
        buf = stream.read(chunk if limit < 0 else min(chunk, limit))
        if not buf:
            break
        if limit > 0:
            limit -= len(buf)
        parts = (tail + buf).split(b"\n")
        tail = parts.pop()
        for p in parts:
            n += 1
            yield n, p.rstrip(b"\r")
    if tail:
        yield n + 1, tail.rstrip(b"\r")


def _jsonl_lines(source: Source, rng: tuple[int, int, int]) -> Iterator[tuple[int, bytes]]:
    start, end, first = rng
    if (start, end) == (0, -1):
        with _open(source) as f:
            yield from _byte_lines(f)
        return
    # a range of an uncompressed file (see sources.scan): seek, read to its end
    with source.fs.open_input_file(source.path) as f:
        f.seek(start)
        yield from _byte_lines(f, limit=-1 if end < 0 else end - start, first=first)


def read_jsonl(source: Source, rng: tuple[int, int, int] = (0, -1, 1)) -> Iterator[Parsed]:
    for n, raw in _jsonl_lines(source, rng):
        if not raw.strip():
            continue  # blank lines are layout, not rows
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield n, Reject("undecodable", f"line is not UTF-8 (byte {e.start})"), raw
            continue
        if n == 1 and text.startswith("\ufeff"):
            text = text[1:]
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            yield n, Reject("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})"), text
            continue
        yield n, row, text


def read_csv(source: Source, delimiter: str) -> Iterator[Parsed]:
    csv.field_size_limit(sys.maxsize)  # long documents are rows too
    with _open(source) as f:
        text_lines = (b.decode("utf-8", "surrogateescape") + "\n" for _, b in _byte_lines(f))
        # strict: a quote that does not close where a field ends is an error, not a field
        # that swallows the rows after it (csv's lenient default merges them silently)
        reader = csv.reader(text_lines, delimiter=delimiter, strict=True)
        try:
            header = next(reader)
        except StopIteration:
            return
        if header and header[0].startswith("\ufeff"):
            header[0] = header[0][1:]
        prev = reader.line_num
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                span = (f"lines {prev + 1}-{reader.line_num}" if reader.line_num > prev + 1
                        else f"line {prev + 1}")
                yield prev + 1, Reject("bad_row", f"CSV record at {span} cannot be split "
                                                  f"into fields ({e}; unbalanced quote?)"), ""
                prev = reader.line_num
                continue
            start, prev = prev + 1, reader.line_num
            if not rec:
                continue
            if len(rec) != len(header):
                yield start, Reject(
                    "bad_row", f"expected {len(header)} columns ({', '.join(header)}), "
                               f"got {len(rec)}"), delimiter.join(rec)
                continue
            yield start, dict(zip(header, rec)), rec


def _arrow_batches(batches, columns: list[str], total_cols: set[str]) -> Iterator[Parsed]:
    n = 0
    for batch in batches:
        present = [c for c in columns if c in total_cols]
        rows = batch.select(present).to_pylist() if present else [{}] * batch.num_rows
        for row in rows:
            n += 1
            yield n, row, row


def read_parquet(source: Source, columns: list[str]) -> Iterator[Parsed]:
    with source.fs.open_input_file(source.path) as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        cols = [c for c in columns if c in names]
        if cols:
            yield from _arrow_batches(pf.iter_batches(batch_size=8192, columns=cols), cols, names)
        else:  # none of the task's columns: every row misses them
            yield from ((i + 1, {}, {}) for i in range(pf.metadata.num_rows))


def read_arrow_stream(source: Source, columns: list[str]) -> Iterator[Parsed]:
    """A Hugging Face ``save_to_disk`` shard: an Arrow IPC stream."""
    with source.fs.open_input_stream(source.path) as f:
        reader = pa.ipc.open_stream(f)
        yield from _arrow_batches(reader, columns, set(reader.schema.names))


def parse(source: Source, columns: list[str], rng: tuple[int, int, int] = (0, -1, 1)
          ) -> Iterator[Parsed]:
    if source.format == "jsonl":
        return read_jsonl(source, rng)
    if source.format in ("csv", "tsv"):
        return read_csv(source, "," if source.format == "csv" else "\t")
    if source.format == "parquet":
        return read_parquet(source, columns)
    if source.format == "arrow_stream":
        return read_arrow_stream(source, columns)
    raise ValueError(f"format: unknown reader {source.format!r}")


def _snippet(raw: Any) -> str:
    if isinstance(raw, bytes):
        s = repr(raw)
    elif isinstance(raw, str):
        s = raw.encode("utf-8", "backslashreplace").decode("utf-8")
    else:
        s = json.dumps(raw, default=repr, ensure_ascii=False)
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s if len(s) <= RAW_SNIPPET else s[: RAW_SNIPPET - 3] + "..."


def candidate_schema(field_names: list[str]) -> pa.Schema:
    return pa.schema(
        [(f, pa.string()) for f in field_names]
        + [("_src", pa.int32()), ("_line", pa.int64()), ("_order", pa.int64()),
           ("_split", pa.int8()), ("_dup", pa.binary(16)), ("_kind", pa.string()),
           ("_reject", pa.string()), ("_raw", pa.string())]
    )


def candidates(
    source: Source, index: int, spec: RowSpec, task: str, seed: int,
    fractions: SplitFractions, block_rows: int, rng: tuple[int, int, int] = (0, -1, 1),
) -> Iterator[pa.Table]:
    """Validated candidate rows of one file (or one range of it), ``block_rows`` at a time."""
    names = [c for c, _ in spec.fields]
    schema = candidate_schema(names)
    cols: dict[str, list] = {k: [] for k in schema.names}

    def flush() -> pa.Table:
        t = pa.table({k: pa.array(v, schema.field(k).type) for k, v in cols.items()},
                     schema=schema)
        for v in cols.values():
            v.clear()
        return t

    for line, row, raw in parse(source, spec.columns, rng):
        got = row if isinstance(row, Reject) else spec.check(row, source.class_names)
        cols["_src"].append(index)
        cols["_line"].append(line)
        cols["_order"].append(order_of(index, line))
        if isinstance(got, Reject):
            for k in names:
                cols[k].append(None)
            cols["_split"].append(-1)
            cols["_dup"].append(None)
            cols["_kind"].append(got.kind)
            cols["_reject"].append(got.reason)
            cols["_raw"].append(_snippet(raw))
        else:
            for k in names:
                cols[k].append(got[k])
            cols["_split"].append(split_of(split_input(task, got), seed, fractions))
            # computed whether or not duplicates are dropped: they are always counted
            cols["_dup"].append(dedup_key(got))
            cols["_kind"].append(None)
            cols["_reject"].append(None)
            cols["_raw"].append(None)
        if len(cols["_src"]) >= block_rows:
            yield flush()
    if cols["_src"]:
        yield flush()


class CorpusDatasource(Datasource):
    """One read task per file, or per line-aligned byte range of a big JSONL file (each
    read sequentially, so line numbers hold)."""

    def __init__(self, sources: list[Source], spec: RowSpec, task: str, seed: int,
                 fractions: SplitFractions, block_rows: int):
        super().__init__()
        self._sources = sources
        self._args = (spec, task, seed, fractions, block_rows)

    def num_tasks(self) -> int:
        return sum(len(s.ranges) for s in self._sources)

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(s.size for s in self._sources)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        spec, task, seed, fractions, block_rows = self._args
        schema = candidate_schema([c for c, _ in spec.fields])
        tasks = []
        for i, s in enumerate(self._sources):
            for rng in s.ranges:
                size = (s.size if rng[1] < 0 else rng[1]) - rng[0]
                tasks.append(ReadTask(
                    functools.partial(candidates, s, i, spec, task, seed, fractions,
                                      block_rows, rng),
                    BlockMetadata(num_rows=None, size_bytes=size, input_files=[s.uri],
                                  exec_stats=None),
                    schema=schema,
                    per_task_row_limit=per_task_row_limit,
                ))
        return tasks
