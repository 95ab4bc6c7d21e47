"""The dataset on disk: content-addressed id, manifest, per-split Parquet parts, atomic commit.

Layout of ``{data_root}/{dataset_id}/``::

    manifest.json      written last, inside the temporary folder
    train/ eval/ test/ Parquet parts ``part-{source}-{line}.parquet``, one per block, named
                       after the block's first input row (so they sort in input order); an
                       empty split holds one empty file with the schema
    rejects.jsonl      one JSON object per rejected row: source, line, kind, reason, raw

The folder is built as ``{data_root}/.tmp-{id}-{host}-{pid}-{rand}/`` and renamed into place
in one ``os.rename``; a dataset exists only once its folder has that name and holds a
``manifest.json`` with its id. A run killed at any point leaves at most a ``.tmp-*`` folder,
which no reader looks at and the next run of the same id deletes (when its process is gone).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import SPLITS, DataConfig
from .manifest import FORMAT_VERSION, Manifest

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)
#: ``PEFTPIPE_DATA_COMMIT_DELAY_S``: fault injection for tests, a pause after every file is
#: written and before the commit (so a test can kill the run at its most complete point)
COMMIT_DELAY_ENV = "PEFTPIPE_DATA_COMMIT_DELAY_S"


def tokenizer_identity(name: str) -> str:
    """A hash of the tokenizer's files (or, for a hub id, of the loaded tokenizer).

    Files, not the loaded object, so a cache hit does not need to import transformers.
    """
    from pipelines.models import resolve

    path = Path(resolve(name))
    h = hashlib.sha256()
    if path.is_dir():
        files = [f for f in TOKENIZER_FILES if (path / f).is_file()]
        if not files:
            raise FileNotFoundError(f"tokenizer: no tokenizer files in {path}")
        for f in files:
            h.update(f.encode() + b"\0" + (path / f).read_bytes() + b"\0")
        return h.hexdigest()
    from pipelines.models import load_tokenizer

    tok = load_tokenizer(name)
    state = tok.backend_tokenizer.to_str() if getattr(tok, "is_fast", False) else repr(tok)
    h.update(state.encode())
    h.update(repr((getattr(tok, "chat_template", None), tok.special_tokens_map)).encode())
    return h.hexdigest()


def dataset_id(config: DataConfig, sources: list[dict[str, Any]], tokenizer_id: str,
               template: dict[str, Any]) -> str:
    """16 hex digits of a hash over everything that changes the output, and nothing else."""
    key = {
        "format_version": FORMAT_VERSION,
        "sources": [(s["sha256"], s["format"]) for s in sources],
        "tokenizer": tokenizer_id,
        "task": config.task,
        "fields": config.fields(),
        "labels": config.labels,
        "label_names": config.label_names,
        "max_chars": config.max_chars,
        "max_length": config.max_length,
        "template": template,
        "dedup": config.dedup,
        "split": config.split.model_dump(),
        "seed": config.seed,
        "max_rows": config.max_rows,
        # packing is done per batch, so the batch size shapes the packed rows
        "batch_size": config.batch_size if config.packing else None,
    }
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_manifest(data_root: str | Path, dataset_id: str) -> Manifest:
    """The manifest of a complete dataset; ``FileNotFoundError`` if there is none."""
    folder = Path(data_root) / dataset_id
    path = folder / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"dataset {dataset_id!r}: no complete dataset at {folder}")
    m = Manifest.model_validate_json(path.read_text())
    if m.dataset_id != dataset_id:
        raise ValueError(f"dataset {dataset_id!r}: {path} belongs to dataset {m.dataset_id!r}")
    missing = [s for s in SPLITS if not (folder / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"dataset {dataset_id!r}: split folder(s) {missing} missing "
                                f"in {folder}")
    m.path = str(folder.resolve())
    return m


def is_complete(data_root: str | Path, dataset_id: str) -> bool:
    try:
        load_manifest(data_root, dataset_id)
    except (FileNotFoundError, ValueError):
        return False
    return True


def output_schema(task: str) -> pa.Schema:
    labels = pa.int64() if task == "classification" else pa.list_(pa.int32())
    return pa.schema([("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8())),
                      ("labels", labels), ("length", pa.int32())])


STAT_KEYS = ("rows", "tokens", "documents", "trained_tokens")


def write_part(table: pa.Table, folder: str, task: str, source_uris: list[str], name: str
               ) -> pa.Table:
    """Write one batch's rows to ``{split}/{name}.parquet`` and its rejected rows to
    ``_rejects/{name}.jsonl``; return its counts as a one-row table (see :func:`merge_stats`).

    Runs in the tokenizer actors: the batch is written where it was made, with no separate
    write tasks (on a small machine every extra Ray worker process costs seconds to start).
    """
    schema = output_schema(task)
    stats: dict[str, Any] = {}
    label_counts: dict[str, dict[str, int]] = {}
    split = table.column("_split")
    for s, split_name in enumerate(SPLITS):
        part = table.filter(pc.equal(split, s))
        stats.update({f"{k}_{split_name}": 0 for k in STAT_KEYS})
        if not part.num_rows:
            continue
        out = part.select(schema.names).cast(schema)
        (Path(folder) / split_name).mkdir(exist_ok=True)
        pq.write_table(out, Path(folder) / split_name / f"{name}.parquet")
        docs = part.column("_docs") if "_docs" in part.column_names else None
        stats[f"rows_{split_name}"] = out.num_rows
        stats[f"tokens_{split_name}"] = int(pc.sum(out.column("length")).as_py() or 0)
        stats[f"documents_{split_name}"] = int(pc.sum(docs).as_py() or 0) if docs else out.num_rows
        stats[f"trained_tokens_{split_name}"] = trained_tokens(out, task)
        if task == "classification":
            counts = pc.value_counts(out.column("labels").combine_chunks()).to_pylist()
            label_counts[split_name] = {str(c["values"]): c["counts"] for c in counts}
    rejected: Counter = Counter()
    rej = table.filter(pc.equal(split, -1))
    if rej.num_rows:
        (Path(folder) / "_rejects").mkdir(exist_ok=True)
        with open(Path(folder) / "_rejects" / f"{name}.jsonl", "w") as f:
            for r in rej.select(["_src", "_line", "_kind", "_reject", "_raw"]).to_pylist():
                f.write(json.dumps({"source": source_uris[r["_src"]], "line": r["_line"],
                                    "kind": r["_kind"], "reason": r["_reject"],
                                    "raw": r["_raw"], "_src": r["_src"]},
                                   ensure_ascii=False) + "\n")
                rejected[r["_kind"]] += 1
    stats["rejected"] = json.dumps(dict(rejected))
    stats["label_counts"] = json.dumps(label_counts)
    return pa.table({k: [v] for k, v in stats.items()})


def trained_tokens(part: pa.Table, task: str) -> int:
    """Targets the loss trains on: a classifier's rows, a language model's labelled
    positions after each row's first (the model shifts labels by one)."""
    if task == "classification":
        return part.num_rows
    labels = part.column("labels").combine_chunks()
    kept = pc.list_slice(labels, 1)
    return int(pc.sum(pc.not_equal(pc.list_flatten(kept), -100).cast(pa.int64())).as_py() or 0)


def merge_stats(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Sum the per-batch counts: ``{"rows": {split: n}, "tokens": …, "documents": …,
    "rejected": {kind: n}}``."""
    total: dict[str, Counter] = {k: Counter() for k in (*STAT_KEYS, "rejected")}
    labels: dict[str, Counter] = {s: Counter() for s in SPLITS}
    for r in rows:
        for k in STAT_KEYS:
            for split_name in SPLITS:
                total[k][split_name] += int(r[f"{k}_{split_name}"])
        total["rejected"].update(json.loads(r["rejected"]))
        for split_name, counts in json.loads(r.get("label_counts") or "{}").items():
            labels[split_name].update(counts)
    out = {k: {n: v for n, v in c.items() if v or k != "rejected"} for k, c in total.items()}
    out["label_counts"] = {s: dict(c) for s, c in labels.items()}
    return out


def finish_rejects(folder: Path) -> None:
    """Merge the write tasks' reject parts into ``rejects.jsonl``, ordered by source and line."""
    parts = sorted((folder / "_rejects").glob("*.jsonl")) if (folder / "_rejects").is_dir() else []
    rows = [json.loads(line) for p in parts for line in p.read_text().splitlines() if line]
    rows.sort(key=lambda r: (r.pop("_src"), r["line"]))
    with open(folder / "rejects.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    shutil.rmtree(folder / "_rejects", ignore_errors=True)


def fill_empty_splits(folder: Path, task: str) -> None:
    """A split without rows still gets a folder with one empty Parquet file (its schema)."""
    schema = output_schema(task)
    for name in SPLITS:
        d = folder / name
        d.mkdir(exist_ok=True)
        if not any(d.glob("*.parquet")):
            pq.write_table(schema.empty_table(), d / "part-empty.parquet")


def temp_folder(data_root: Path, dataset_id: str) -> Path:
    data_root.mkdir(parents=True, exist_ok=True)
    name = f".tmp-{dataset_id}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path = data_root / name
    path.mkdir()
    return path


def remove_stale(data_root: Path, dataset_id: str) -> list[Path]:
    """Delete temporary folders of this id left by dead processes on this host."""
    removed = []
    host = socket.gethostname()
    for p in data_root.glob(f".tmp-{dataset_id}-*"):
        rest = p.name[len(f".tmp-{dataset_id}-"):]
        h, _, tail = rest.rpartition("-")  # host-pid, rand
        h, _, pid = h.rpartition("-")
        if h != host or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def commit(tmp: Path, final: Path, manifest: Manifest) -> bool:
    """Write the manifest and rename ``tmp`` to ``final``; False if another run won the race
    (its complete dataset is kept and ours is dropped)."""
    delay = float(os.environ.get(COMMIT_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)
    (tmp / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    _fsync_tree(tmp)
    try:
        os.rename(tmp, final)
    except OSError:
        if (final / "manifest.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise
    return True


def _fsync_tree(folder: Path) -> None:
    # The rename must not reach the disk before the files it publishes (crash, not only kill).
    for p in folder.rglob("*"):
        if p.is_file():
            with contextlib.suppress(OSError), open(p, "rb") as f:
                os.fsync(f.fileno())


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
