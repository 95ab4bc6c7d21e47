"""A new user's chat data through the CLI: the minimal recipe (``model: builtin:smollm2``,
``data: {sources: [file], task: instruction}``) on an OpenAI-messages file trains; a file of
bad conversations exits 2 with one line. The files are made from the shipped chatterbot
corpus. (That ShareGPT and Alpaca files give the messages file's dataset is tested
in-process, in tests/pipelines/test_data_chat.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from pipelines.data import builtin
from tests.e2e.test_inputs import peftpipe, ray_address  # noqa: F401  (the module's Ray)

pytestmark = pytest.mark.timeout(900)

SMALL = ["--set", "data.max_rows=160", "--set", "data.max_length=96"]


def _recipe(tmp: Path, src: Path) -> Path:
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": "builtin:smollm2", "run_dir": str(tmp / "runs"),
                                      "data": {"sources": [str(src)], "task": "instruction"}}))
    return recipe


def _files(tmp: Path) -> dict[str, Path]:
    convs = [c for c in builtin.chatterbot_conversations() if len(c) >= 2][:200]
    names = {"user": "human", "assistant": "gpt"}
    rows = {
        "messages": [{"messages": c} for c in convs],
        "sharegpt": [{"conversations": [{"from": names[t["role"]], "value": t["content"]}
                                        for t in c]} for c in convs],
        "alpaca": [{"instruction": c[0]["content"], "input": "", "output": c[1]["content"]}
                   for c in convs],
    }
    out = {}
    for fmt, rs in rows.items():
        out[fmt] = tmp / f"{fmt}.jsonl"
        out[fmt].write_text("".join(json.dumps(r) + "\n" for r in rs))
    return out


SUMMARY = re.compile(r"conversations \((\w+), train_on assistant\): (\d+) tokens trained")


def test_the_minimal_recipe_trains_on_a_messages_file(ray_address, tmp_path) -> None:  # noqa: F811
    src = _files(tmp_path)["messages"]
    out = peftpipe("train", str(_recipe(tmp_path, src)), "--address", ray_address, *SMALL,
                   "--set", "train.max_steps=2", "--set", "train.eval_every=2",
                   "--set", "train.max_eval_batches=1", cwd=tmp_path, timeout=800)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    said = SUMMARY.search(out.stdout + out.stderr)
    assert said and said.group(1) == "messages" and int(said.group(2)) > 0, out.stdout[-2000:]
    trials = json.loads((tmp_path / "runs" / "trials.json").read_text())
    (trial,) = trials["trials"]
    assert trial["status"] == "completed" and trial["metrics"]["eval_loss"] > 0


def test_a_file_of_bad_conversations_exits_2_with_one_line(ray_address, tmp_path) -> None:  # noqa: F811
    src = tmp_path / "bad.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [
        {"messages": []}, {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": "not a list"}]))
    out = peftpipe("prepare", str(_recipe(tmp_path, src)), "--address", ray_address,
                   cwd=tmp_path)
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-3000:])
    errors = [x for x in out.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "all 3 rows were rejected" in errors[0], out.stderr[-2000:]
    assert "empty_conversation" in out.stderr and "no_assistant_turn" in out.stderr
    assert "Traceback" not in out.stderr
