"""Small contract-conforming datasets and saved tiny models for the training-stage tests.

The datasets follow the data-stage contract (``manifest.json`` + Parquet splits of
unpadded ``input_ids``/``attention_mask``/``labels``), with token ids drawn from a
learnable pattern so a few optimizer steps visibly reduce the loss.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests import tiny


def save_tiny(arch: str, folder: Path, *, vocab_size: int | None = None) -> Path:
    """A tiny random model saved with ``save_pretrained`` (loadable by pipelines.models);
    ``vocab_size`` widens its embeddings to fit a real tokenizer (30522 for MiniLM's)."""
    import torch

    m = tiny.model(arch)
    if vocab_size is not None:
        # A fresh model from the same config with the wider vocabulary (resizing would
        # fill the new rows with the mean embedding: every token would look alike).
        cfg = m.config
        cfg.vocab_size = vocab_size
        torch.manual_seed(1)
        m = type(m)(cfg).eval()
    m.save_pretrained(folder, safe_serialization=True)
    return folder


MINILM_VOCAB = 30522
_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
            "eleven", "twelve"]
_POSITIVE = ["great", "good", "wonderful", "excellent", "fun", "lovely", "superb", "brilliant"]
_NEGATIVE = ["bad", "awful", "boring", "terrible", "dull", "poor", "weak", "horrible"]


def prepared(root: Path, task: str = "causal_lm", *, rows: int = 80, seed: int = 0):
    """A small text corpus tokenized by the real data stage (``pipelines.data.prepare``,
    MiniLM's tokenizer, on the running Ray): counting phrases for ``causal_lm`` (a tiny LM
    learns them in a few steps), word-list sentiment for ``classification``."""
    from pipelines.data import DataConfig, prepare

    rng = random.Random(seed)
    if task == "classification":
        lines = []
        for _ in range(rows):
            label = rng.randrange(2)
            words = _POSITIVE if label else _NEGATIVE
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 7)))
            lines.append({"text": text, "label": ["negative", "positive"][label]})
    else:
        lines = []
        for _ in range(rows):
            start, n = rng.randrange(len(_NUMBERS)), rng.randint(5, 10)
            lines.append(
                {"text": " ".join(_NUMBERS[(start + k) % len(_NUMBERS)] for k in range(n))})
    src = root / f"{task}.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return prepare(DataConfig(sources=[str(src)], task=task, tokenizer="builtin:minilm",
                              max_length=24, seed=seed, data_root=str(root / "datasets"),
                              split={"train": 0.8, "eval": 0.2, "test": 0.0}))


def _lm_row(rng: random.Random, lo: int = 3, hi: int = 11) -> dict:
    # Counting sequences (t, t+1, t+2, ...) over a few token ids, wrapped into [lo, hi):
    # a random model starts near ln(vocab) and a tiny LoRA learns the token range (and
    # then the successor rule) within a few steps.
    n = rng.randint(6, tiny.SEQ)
    start = rng.randrange(lo, hi)
    ids = [lo + (start - lo + k) % (hi - lo) for k in range(n)]
    labels = [-100, -100] + ids[2:]  # first tokens untrained, as a prompt would be
    return {"input_ids": ids, "attention_mask": [1] * n, "labels": labels}


def _cls_row(rng: random.Random) -> dict:
    # Class 1 iff the sequence contains mostly "high" token ids.
    label = rng.randrange(2)
    n = rng.randint(5, tiny.SEQ)
    lo, hi = (3, 40) if label == 0 else (56, tiny.VOCAB)
    ids = [rng.randrange(lo, hi) for _ in range(n)]
    return {"input_ids": ids, "attention_mask": [1] * n, "labels": label}


def write_dataset(root: Path, task: str = "causal_lm", *, rows: int = 96, eval_rows: int = 24,
                  seed: int = 0, dataset_id: str | None = None,
                  padding_side: str = "right") -> Path:
    """Write ``{root}/{dataset_id}/`` with train/eval/test splits and its manifest."""
    rng = random.Random(seed)
    make = _cls_row if task == "classification" else _lm_row
    dataset_id = dataset_id or f"tiny-{task}-{seed}"
    folder = root / dataset_id
    counts = {"train": rows, "eval": eval_rows, "test": eval_rows}
    tokens = {}
    for split, n in counts.items():
        data = [make(rng) for _ in range(n)]
        (folder / split).mkdir(parents=True, exist_ok=True)
        label_type = pa.int64() if task == "classification" else pa.list_(pa.int32())
        table = pa.table(
            {
                "input_ids": pa.array([r["input_ids"] for r in data], pa.list_(pa.int32())),
                "attention_mask": pa.array([r["attention_mask"] for r in data],
                                           pa.list_(pa.int8())),
                "labels": pa.array([r["labels"] for r in data], label_type),
                "length": pa.array([len(r["input_ids"]) for r in data], pa.int32()),
            }
        )
        # Two files per split: readers must take the whole folder, not one file.
        half = n // 2
        pq.write_table(table.slice(0, half), folder / split / "part-0.parquet")
        pq.write_table(table.slice(half), folder / split / "part-1.parquet")
        tokens[split] = sum(len(r["input_ids"]) for r in data)
    manifest = {
        "dataset_id": dataset_id,
        "task": task,
        "tokenizer": {"name": "synthetic", "identity": "tests.tiny"},
        "max_length": tiny.SEQ,
        "pad_token_id": 0,
        "padding_side": padding_side,
        "template": {},
        "label_names": ["low", "high"] if task == "classification" else None,
        "num_labels": 2 if task == "classification" else None,
        "rows": counts,
        "rejected": 0,
        "tokens": tokens,
        "sources": [],
        "created_at": "1970-01-01T00:00:00Z",
        "path": str(folder),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder
