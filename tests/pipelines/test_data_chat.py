"""The data stage on conversations: OpenAI messages, ShareGPT and Alpaca files made from the
shipped chatterbot corpus, loss on the assistant turns only, bad conversations as rejects
with their reason and line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.data import DataConfig, builtin, prepare
from pipelines.data.chat import IGNORE
from pipelines.data.config import SPLITS, SplitFractions
from pipelines.data.split import split_of

pytestmark = pytest.mark.timeout(600)

SYSTEM = "You are a friendly chatbot."
#: one bad conversation of each kind, as JSONL lines of a messages file
BAD = {
    "not_a_list": {"messages": "hello"},
    "empty_conversation": {"messages": []},
    "bad_turn": {"messages": ["hi"]},
    "unknown_role": {"messages": [{"role": "robot", "content": "beep"}]},
    "empty_turn": {"messages": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "  "}]},
    "no_assistant_turn": {"messages": [{"role": "user", "content": "anyone there?"}]},
    "missing_field": {"text": "not a conversation"},
}


def conversations() -> list[list[dict]]:
    return builtin.chatterbot_conversations()


@pytest.fixture(scope="module")
def tok():
    from pipelines.models import load_tokenizer

    return load_tokenizer("builtin:smollm2")


def _rows(m, split):
    return pq.read_table(m.split_path(split)).to_pylist()


def _prepare(src, root, **over):
    return prepare(DataConfig(sources=[str(src)], task="instruction", tokenizer="builtin:smollm2",
                              max_length=128, data_root=str(root), **over))


def test_messages_file_trains_on_every_assistant_turn_and_rejects_bad_rows(
        ray_cluster, tok, tmp_path) -> None:
    convs = [[{"role": "system", "content": SYSTEM}, *c] if i % 3 == 0 else c
             for i, c in enumerate(conversations())]
    src = tmp_path / "chat.jsonl"
    lines = [json.dumps({"messages": c}) for c in convs]
    lines += [json.dumps(b) for b in BAD.values()]
    src.write_text("\n".join(lines) + "\n")
    m = _prepare(src, tmp_path / "data")
    assert m.template["chat_format"] == "messages" and m.template["train_on"] == "assistant"
    assert m.rejected_by_kind == {k: 1 for k in BAD}
    rejects = [json.loads(x) for x in (Path(m.path) / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in rejects) == list(range(len(convs) + 1, len(lines) + 1))
    # every kept row: ids are the rendered conversation tokenized whole, labels its
    # assistant turns (content and <|im_end|>), as transformers' generation mask gives
    fr = SplitFractions()
    by_split = {s: [] for s in SPLITS}
    for c in convs:
        first = next(i for i, t in enumerate(c) if t["role"] == "assistant")
        key = json.dumps(c[:first], ensure_ascii=False, sort_keys=True)
        by_split[SPLITS[split_of(key, 0, fr)]].append(c)
    trained = 0
    for split in SPLITS:
        got = _rows(m, split)
        assert len(got) == len(by_split[split]) == m.rows[split]
        for row, c in zip(got, by_split[split]):
            text = tok.apply_chat_template(c, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert row["input_ids"] == ids[:len(row["input_ids"])]
            answers = [t["content"] + "<|im_end|>" for t in c if t["role"] == "assistant"]
            kept = tok.decode([x for x in row["labels"] if x != IGNORE])
            whole = len(row["input_ids"]) == len(ids)
            assert kept == "".join(answers) if whole else "".join(answers).startswith(kept)
            assert row["labels"][0] == IGNORE  # the first token is the template's, never trained
            trained += sum(x != IGNORE for x in row["labels"])
    assert sum(m.trained_tokens.values()) == trained > 0


def test_sharegpt_and_alpaca_files_give_the_messages_dataset(ray_cluster, tmp_path) -> None:
    convs = conversations()[:120]
    names = {"user": "human", "assistant": "gpt"}
    msgs = tmp_path / "m.jsonl"
    msgs.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    share = tmp_path / "s.jsonl"
    share.write_text("".join(json.dumps({"conversations": [
        {"from": names[t["role"]], "value": t["content"]} for t in c]}) + "\n" for c in convs))
    a = _prepare(msgs, tmp_path / "d1")
    b = _prepare(share, tmp_path / "d2")
    assert b.template["chat_format"] == "sharegpt"
    for split in SPLITS:
        assert _rows(a, split) == _rows(b, split)
    pairs = [c[:2] for c in convs]
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": u["content"], "input": "",
                                          "output": r["content"]}) + "\n" for u, r in pairs))
    two = tmp_path / "two.jsonl"
    two.write_text("".join(json.dumps({"messages": p}) + "\n" for p in pairs))
    c = _prepare(alpaca, tmp_path / "d3")
    d = _prepare(two, tmp_path / "d4")
    assert c.template["chat_format"] == "alpaca" and c.rows == d.rows
    for split in SPLITS:
        assert _rows(c, split) == _rows(d, split)
