"""Find the input files behind each source (paths, globs, URIs) and hash their contents.

Every source goes through ``pyarrow.fs``, so a local path, ``file://`` and ``s3://`` URIs
(and any other filesystem pyarrow was built with) take the same code path, on the driver
(here) and in the read tasks. A Hugging Face ``save_to_disk`` folder expands into its Arrow
shards (all splits of a ``DatasetDict``), each its own source.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from .config import DataError, MissingSourceError

#: file extension -> reader format (a compression suffix is looked through)
EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv", ".tab": "tsv",
    ".arrow": "arrow_stream",
}
COMPRESSION = (".gz", ".bz2", ".zst", ".lz4", ".br")
#: a JSONL file is read by several tasks, one per range of about this many bytes (ranges
#: start at line starts, found while hashing), so one big file still feeds every actor
RANGE_BYTES = 8 << 20
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class Source:
    """One input file: where it is, how to read it, and what its bytes hash to."""

    uri: str  # as shown to the user (rejects, manifest)
    path: str  # the path inside ``fs``
    fs: pafs.FileSystem
    format: str  # jsonl | parquet | csv | tsv | arrow_stream
    size: int
    sha256: str = ""
    # Hugging Face ClassLabel names per column, so integer labels read back as names
    class_names: dict[str, list[str]] = field(default_factory=dict)
    # (first byte, end byte, number of the first line) of each read task; (0, -1, 1) = all
    ranges: list[tuple[int, int, int]] = field(default_factory=lambda: [(0, -1, 1)])

    def record(self) -> dict[str, Any]:
        return {"path": self.uri, "sha256": self.sha256, "format": self.format,
                "bytes": self.size}


def _filesystem(source: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, prefix that turns such a path back into a URI).

    URI options go in the query string, as pyarrow reads them (e.g.
    ``s3://bucket/data/*.jsonl?region=eu-west-1&endpoint_override=localhost:9000``); they
    configure the filesystem and are not part of the path.
    """
    if "://" in source:
        scheme = source.split("://", 1)[0]
        where, _, query = source.partition("?")
        # from_uri rejects glob characters in the path: resolve the static prefix only.
        m = _GLOB_CHARS.search(where)
        base = where if m is None else where[: m.start()].rsplit("/", 1)[0]
        fs, base_path = pafs.FileSystem.from_uri(base + (f"?{query}" if query else ""))
        rest = where[len(base):]
        path = base_path.rstrip("/") + rest if rest else base_path
        prefix = "" if scheme == "file" else f"{scheme}://"
        return fs, path, prefix
    return pafs.LocalFileSystem(), str(Path(source).expanduser().absolute()), ""


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``**`` crosses folders, ``*`` and ``?`` stay inside one path component."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape("["))
                i += 1
            else:
                out.append(fnmatch.translate(pattern[i : j + 1])[4:-3])  # the class alone
                i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _format_of(path: str) -> str | None:
    name = path.lower()
    for c in COMPRESSION:
        if name.endswith(c):
            name = name[: -len(c)]
            break
    return EXTENSIONS.get("." + name.rsplit(".", 1)[-1]) if "." in name else None


def _read_json(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def _hf_shards(fs: pafs.FileSystem, folder: str) -> list[tuple[str, dict[str, list[str]]]]:
    """The Arrow shards of a ``save_to_disk`` folder, with ClassLabel names per column."""

    def one(split_dir: str) -> list[tuple[str, dict[str, list[str]]]]:
        state = _read_json(fs, f"{split_dir}/state.json")
        names: dict[str, list[str]] = {}
        info_path = f"{split_dir}/dataset_info.json"
        if fs.get_file_info(info_path).type == pafs.FileType.File:
            for col, feat in (_read_json(fs, info_path).get("features") or {}).items():
                if isinstance(feat, dict) and feat.get("_type") == "ClassLabel":
                    names[col] = list(feat.get("names") or [])
        return [(f"{split_dir}/{d['filename']}", names) for d in state["_data_files"]]

    if fs.get_file_info(f"{folder}/dataset_dict.json").type == pafs.FileType.File:
        splits = _read_json(fs, f"{folder}/dataset_dict.json")["splits"]
        return [s for name in splits for s in one(f"{folder}/{name}")]
    return one(folder)


def is_hf_folder(fs: pafs.FileSystem, folder: str) -> bool:
    return any(
        fs.get_file_info(f"{folder}/{n}").type == pafs.FileType.File
        for n in ("state.json", "dataset_dict.json")
    )


def _expand(i: int, src: str, fmt: str) -> tuple[pafs.FileSystem, str, list[tuple]]:
    """(filesystem, URI prefix, [(path, format, size, class names)]) of one source."""
    fs, path, prefix = _filesystem(src)
    found: list[tuple[str, str, int, dict[str, list[str]]]] = []

    def add_file(p: str, size: int, *, explicit: bool) -> None:
        f = fmt if fmt not in ("auto", "hf_disk") else _format_of(p)
        if f is None:
            if explicit:
                raise DataError(
                    f"data.sources.{i}: cannot tell the format of {src!r} from its name; "
                    f"set format to one of jsonl, parquet, csv, tsv, hf_disk"
                )
            return  # a folder may hold READMEs and the like
        found.append((p, f, size, {}))

    m = _GLOB_CHARS.search(path)
    if m:
        base = path[: m.start()].rsplit("/", 1)[0] or "/"
        rx = _glob_regex(path)
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        for info in sorted(infos, key=lambda x: x.path):
            if info.type == pafs.FileType.File and rx.match(info.path):
                add_file(info.path, info.size, explicit=True)
        return fs, prefix, found
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise MissingSourceError(f"data.sources.{i}: {src!r} does not exist")
    if info.type == pafs.FileType.Directory:
        if fmt == "hf_disk" or (fmt == "auto" and is_hf_folder(fs, path)):
            for p, names in _hf_shards(fs, path):
                found.append((p, "arrow_stream", fs.get_file_info(p).size, names))
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            for f in sorted(infos, key=lambda x: x.path):
                if f.type == pafs.FileType.File and not Path(f.path).name.startswith("."):
                    add_file(f.path, f.size, explicit=False)
    elif fmt == "hf_disk":
        raise DataError(f"data.sources.{i}: format hf_disk needs a folder, {src!r} is a file")
    else:
        add_file(path, info.size, explicit=True)
    return fs, prefix, found


def resolve(sources: list[str], fmt: str = "auto") -> list[Source]:
    """Expand paths, folders and globs into files, in a stable order, and hash them.

    Raises ``FileNotFoundError`` naming a source that matches nothing and ``ValueError``
    for a file whose format cannot be told from its name (set ``format``).
    """
    out: list[Source] = []
    seen: set[tuple[str, str]] = set()
    for i, src in enumerate(sources):
        fs, prefix, found = _expand(i, src, fmt)
        if not found:
            raise MissingSourceError(f"data.sources.{i}: {src!r} matches no readable file")
        for p, f, size, names in found:
            if (prefix, p) in seen:
                continue
            seen.add((prefix, p))
            out.append(Source(uri=prefix + p, path=p, fs=fs, format=f, size=size or 0,
                              class_names=names))
    for s in out:
        splittable = s.format == "jsonl" and not s.path.lower().endswith(COMPRESSION)
        s.sha256, s.ranges = scan(s, RANGE_BYTES if splittable else None)
        check_readable(s)
    if out and not any(s.size for s in out):
        names = ", ".join(s.uri for s in out[:3]) + (" ..." if len(out) > 3 else "")
        raise DataError(f"data.sources: every input file is empty (0 bytes): {names}")
    return out


def check_readable(source: Source) -> None:
    """Columnar files are opened here, on the driver: a truncated or foreign file is one
    clear error naming it instead of a failed read task. Row formats (JSONL, CSV) are read
    leniently row by row, so their bad rows become rejects."""
    if not source.size or source.format not in ("parquet", "arrow_stream"):
        return
    try:
        if source.format == "parquet":
            import pyarrow.parquet as pq

            with source.fs.open_input_file(source.path) as f:
                pq.ParquetFile(f).schema_arrow  # noqa: B018 - reads and checks the footer
        else:
            import pyarrow as pa

            with source.fs.open_input_stream(source.path) as f:
                pa.ipc.open_stream(f).schema  # noqa: B018
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        kind = "Parquet" if source.format == "parquet" else "Arrow IPC stream"
        raise DataError(f"data.sources: {source.uri} is not a readable {kind} file "
                        f"({source.size} bytes): {e}") from e


def scan(source: Source, range_bytes: int | None = None, chunk: int = 1 << 22
         ) -> tuple[str, list[tuple[int, int, int]]]:
    """The sha256 of the file's bytes as stored (compressed files are hashed compressed)
    and, with ``range_bytes``, line-aligned byte ranges with their first line numbers."""
    h = hashlib.sha256()
    pos, lines = 0, 0
    starts = [(0, 1)]
    cut = range_bytes
    with source.fs.open_input_stream(source.path) as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            if range_bytes:
                off = 0
                while cut < pos + len(b):
                    i = b.find(b"\n", max(cut - pos, off))
                    if i < 0:
                        break  # the next line start is in a later chunk
                    starts.append((pos + i + 1, lines + b.count(b"\n", 0, i + 1) + 1))
                    cut, off = pos + i + 1 + range_bytes, i + 1
                lines += b.count(b"\n")
            pos += len(b)
    starts = [st for st in starts if st[0] < pos] or [(0, 1)]
    ends = [st[0] for st in starts[1:]] + [-1]
    return h.hexdigest(), [(a, e, n) for (a, n), e in zip(starts, ends)]
