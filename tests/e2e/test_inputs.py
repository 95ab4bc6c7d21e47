"""Malformed inputs as a new user meets them, through the CLI (subprocess): every one is
exit code 2, an ``error:`` line naming the file, field or row, no traceback on the console,
and nothing written to the run's outputs. Data cases run ``peftpipe prepare`` against one
local Ray started once for the module (``--address``); adapter cases run
``peftpipe predict`` on corrupt or hostile adapter folders (no Ray)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(600)


def peftpipe(*args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray (2 CPUs) for every case; each CLI run joins it as its own driver."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        started = True
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def _rows(n: int, label=lambda i: i % 2) -> list[dict]:
    return [{"text": f"review number {i}: the plot was {'good' if i % 2 else 'bad'}",
             "label": label(i)} for i in range(n)]


def _jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _parquet_bytes(tmp: Path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_rows(40)), tmp / "ok.parquet")
    return (tmp / "ok.parquet").read_bytes()


# (name, file, contents (bytes, or a function of tmp_path), --set overrides, expected
# substrings of stderr)
DATA_CASES = [
    ("csv-unbalanced-quote", "reviews.csv",
     b'text,label\n"an opening quote that never closes,1\nsecond row,0\nthird row,1\n', [],
     ["all 1 rows were rejected (1 bad_row)", "reviews.csv:2", "lines 2-4", "unbalanced quote"]),
    ("empty-file", "empty.csv", b"", [], ["every input file is empty (0 bytes)", "empty.csv"]),
    ("header-only", "header.csv", b"text,label\n", [], ["no rows in", "header.csv"]),
    ("all-rows-bad", "bad.jsonl", _jsonl([{"body": "no text field", "label": 1}] * 5), [],
     ["all 5 rows were rejected (5 missing_field)", "bad.jsonl:1", "missing field 'text'"]),
    ("oversized-rows", "long.jsonl",
     _jsonl([{"text": "x" * 300, "label": i % 2} for i in range(6)]),
     ["data.max_chars=100"], ["all 6 rows were rejected (6 oversized)", "data.max_chars (100)"]),
    ("mixed-label-types", "mixed.jsonl",
     _jsonl(_rows(30, label=lambda i: 0) + [{"text": "a stray header row", "label": "label"}]),
     [], ["data.label_field", "1 distinct label(s) ['0']"]),
    ("non-utf8", "latin1.csv", b"text,label\ncaf\xe9 cr\xe8me,1\nna\xefve,0\n", [],
     ["all 2 rows were rejected (2 undecodable)", "latin1.csv:2", "not UTF-8"]),
    ("truncated-jsonl", "cut.jsonl", b'{"text": "a review that was cut off', [],
     ["all 1 rows were rejected (1 invalid_json)", "cut.jsonl:1", "invalid JSON"]),
    ("unreadable-parquet", "broken.parquet", lambda tmp: _parquet_bytes(tmp)[:200], [],
     ["broken.parquet is not a readable Parquet file"]),
    ("splits-too-small", "few.jsonl", _jsonl(_rows(6)), [],
     ["data.split: the splits have train", "train needs at least 8 (train.batch_size is 8)"]),
]


@pytest.mark.parametrize(("name", "file", "content", "sets", "expected"), DATA_CASES,
                         ids=[c[0] for c in DATA_CASES])
def test_bad_data_exits_2_naming_the_file_and_row(ray_address, tmp_path, name, file, content,
                                                  sets, expected) -> None:
    src = tmp_path / file
    src.write_bytes(content(tmp_path) if callable(content) else content)
    run_dir = tmp_path / "runs"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({  # a minimal recipe: model + data
        "model": "builtin:minilm", "run_dir": str(run_dir),
        "data": {"sources": [str(src)], "task": "classification"}}))
    out = peftpipe("prepare", str(recipe), "--address", ray_address,
                   *[a for s in sets for a in ("--set", s)], cwd=tmp_path)
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-3000:])
    # (Ray's C++ core worker may print one line of its own before ours)
    assert any(x.startswith("error: ") for x in out.stderr.splitlines()), out.stderr[-3000:]
    for e in expected:
        assert e in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    # nothing of a dataset is left, not even its temporary folder; the traceback is logged
    data = run_dir / "data"
    assert not data.exists() or not any(data.iterdir()), list(data.iterdir())
    assert "Traceback" in (run_dir / "logs" / "peftpipe.log").read_text()


def test_nothing_bad_is_kept_silently(ray_address, tmp_path) -> None:
    """Rows the parser cannot split, an oversized row, a label of another type and
    duplicates: rejected or counted, shown in the summary and the manifest; duplicates
    share a split; class names flow to the manifest."""
    good = _rows(60)
    lines = ["text,label"] + [f'"{r["text"]}",{r["label"]}' for r in good]
    lines.insert(5, '"this quote does not close,1')  # swallows the next line with it
    lines += ['"review number 3: the plot was good",1'] * 3  # exact duplicates
    lines += ['"a stray word among integer labels",spam', f'"{"y" * 150_000}",1']
    lines += [f'"{"many words " * 400}",0']  # under max_chars: kept, cut at max_length
    (tmp_path / "mixed.csv").write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "runs"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": "builtin:minilm", "run_dir": str(run_dir),
        "data": {"sources": [str(tmp_path / "mixed.csv")], "task": "classification",
                 "label_names": {"0": "negative", "1": "positive"}}}))
    out = peftpipe("prepare", str(recipe), "--address", ray_address, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (manifest_path,) = run_dir.glob("data/*/manifest.json")
    m = json.loads(manifest_path.read_text())
    # the quoted line 6 swallows line 7 (one reject), the word label and the 150k row
    assert m["rejected_by_kind"] == {"bad_row": 1, "label_type": 1, "oversized": 1}
    assert sum(m["rows"].values()) == 60 - 1 + 3 + 1
    assert m["rows_at_max_length"] == 1
    assert m["duplicates"] == 3 and m["duplicates_dropped"] == 0
    assert m["label_names"] == ["negative", "positive"] and m["label_values"] == ["0", "1"]
    assert set(m["label_counts"]["train"]) <= {"negative", "positive"}
    rejects = [json.loads(x)
               for x in (manifest_path.parent / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["kind"]) for r in rejects] == [
        (6, "bad_row"), (66, "label_type"), (67, "oversized")]
    summary = out.stdout
    assert ("63 rows kept" in summary and "1 rows fill max_length 256" in summary
            and "3 rejected (1 bad_row, 1 label_type, 1 oversized" in summary)
    assert "3 duplicates found and kept" in summary and "classes: negative, positive" in summary
    # every copy of the duplicated text is in one split (the split is a hash of the text)
    import pyarrow.parquet as pq

    from pipelines.models import load_tokenizer

    ids = load_tokenizer("builtin:minilm")("review number 3: the plot was good",
                                           truncation=True, max_length=256)["input_ids"]
    where = {s: sum(r == ids for r in pq.read_table(manifest_path.parent / s).column(
        "input_ids").to_pylist()) for s in ("train", "eval", "test")}
    assert sorted(where.values()) == [0, 0, 4], where


# -- adapter folders ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    import torch

    import peft_core
    from pipelines import models

    torch.manual_seed(0)
    pm = peft_core.apply(models.load_model("builtin:minilm", "classification", num_labels=2),
                         {"name": "lora", "rank": 2})
    folder = tmp_path_factory.mktemp("adapters") / "good"
    pm.save(folder, pipeline={"model": "builtin:minilm", "task": "classification",
                              "label_names": ["negative", "positive"]})
    return folder


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _truncate_weights(d: Path) -> None:
    w = d / "adapter.safetensors"
    w.write_bytes(w.read_bytes()[:100])


def _huge_header(d: Path) -> None:
    (d / "adapter.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")


def _link_outside(d: Path) -> None:
    outside = d.parent / f"{d.name}-outside.safetensors"
    (d / "adapter.safetensors").rename(outside)
    (d / "adapter.safetensors").symlink_to(Path("..") / outside.name)


def _drop_key(key: str):
    def change(d: Path) -> None:
        cfg = json.loads((d / "adapter_config.json").read_text())
        del cfg[key]
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return change


def _truncate_config(d: Path) -> None:
    c = d / "adapter_config.json"
    c.write_text(c.read_text()[:40])


ADAPTER_CASES = [
    ("truncated-safetensors", _truncate_weights,
     ["adapter.safetensors: not a readable safetensors file"]),
    ("huge-header-safetensors", _huge_header,
     ["adapter.safetensors: not a readable safetensors file"]),
    ("path-traversal-link", _link_outside,
     ["adapter.safetensors: points outside the adapter folder"]),
    ("config-without-method", _drop_key("method"), ["adapter_config.json: missing 'method'"]),
    ("config-without-base", _drop_key("base_model"), ["adapter_config.json: missing 'base_model'"]),
    ("truncated-config", _truncate_config, ["adapter_config.json: not valid JSON"]),
]


@pytest.mark.parametrize(("name", "change", "expected"), ADAPTER_CASES,
                         ids=[c[0] for c in ADAPTER_CASES])
def test_bad_adapter_folder_exits_2_naming_the_file(adapter, tmp_path, name, change, expected
                                                    ) -> None:
    folder = _copy(adapter, tmp_path / "adapter")
    change(folder)
    out = peftpipe("predict", "--model", str(folder), "--text", "a fine film",
                   "--run-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-3000:])
    for e in expected:
        assert e in out.stderr, out.stderr[-3000:]
    if name.startswith("config-without"):  # the missing key is named exactly
        assert " or " not in out.stderr
    assert "Traceback" not in out.stderr and not out.stdout.strip()
    assert not (tmp_path / "runs" / "mlflow.db").exists()


# -- minimal recipes (no Ray: what the recipe decides before anything starts) ------------------

MINIMAL = {"model": "builtin:minilm",
           "data": {"sources": ["builtin:movie_reviews"], "task": "classification"}}


def test_minimal_recipes_take_the_tasks_defaults() -> None:
    from pipelines.recipe import load_recipe

    r = load_recipe(data=MINIMAL)
    assert (r.registry.metric, r.registry.mode) == ("eval_accuracy", "max")
    assert (r.train.num_workers, r.train.cpus_per_worker) == (2, 1.0)
    r.check_resources(2, 0, "train")  # a train run needs exactly 2 x 1 CPUs
    lm = load_recipe(data={"model": "builtin:minilm", "data": {
        "sources": ["builtin:chatterbot_qa"], "task": "instruction"}, "train": {
        "method": {"name": "lora"}}})
    assert (lm.registry.metric, lm.registry.mode) == ("eval_loss", "min")
    searched = load_recipe(data={**lm.model_dump(include={"model"}), "data": {
        "sources": ["builtin:chatterbot_qa"], "task": "instruction"},
        "tune": {"space": {"methods": {"lora": {}}}}})
    assert searched.tune.objective.metric == "eval_loss" and searched.registry.metric == "eval_loss"


@pytest.mark.parametrize(("sets", "stage", "message"), [
    (["train.num_workers=4", "train.batch_size=16"], "train",
     "train.num_workers x train.cpus_per_worker needs 4 CPUs; the Ray cluster has 2"),
    (["train.cpus_per_worker=2"], "tune",
     "tune.max_concurrent_trials x train.num_workers x train.cpus_per_worker needs 8 CPUs"),
])
def test_resource_checks_name_the_stages_fields(sets, stage, message) -> None:
    from pipelines.recipe import RecipeError, load_recipe

    r = load_recipe("demo", ["train.num_workers=2", "train.micro_batch_size=4",
                             "tune.max_concurrent_trials=2", *sets])
    with pytest.raises(RecipeError, match=message):
        r.check_resources(2, 0, stage)


def test_shortened_recipe_scales_its_warmup_and_batch_rule_is_one() -> None:
    from pipelines.recipe import RecipeError, load_recipe

    r = load_recipe("demo", ["train.max_steps=5"])  # demo warms up for 10 of 150 steps
    assert r.train.warmup_steps == 0 and "train.warmup_steps: 10 -> 0" in r.notes[0]
    with pytest.raises(RecipeError, match="warmup_steps"):  # a warmup set explicitly stays
        load_recipe("demo", ["train.max_steps=5", "train.warmup_steps=5"])
    with pytest.raises(RecipeError, match=r"batch_size: 16 is not divisible by micro_batch_size "
                                          r"\(16\) x num_workers \(3\)"):
        load_recipe("demo", ["train.num_workers=3"])
