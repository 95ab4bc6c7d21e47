"""Serving from an adapter folder: the real MiniLM classifier and a tiny causal LM."""

from __future__ import annotations

import pytest
import torch

import peft_core
from pipelines import models, serve

pytestmark = pytest.mark.timeout(180)


def test_predict_from_adapter_folder(tmp_path) -> None:
    torch.manual_seed(0)
    base = models.load_model("builtin:minilm", "classification", num_labels=2)
    pm = peft_core.apply(base, {"name": "lora", "rank": 4})
    tok = models.load_tokenizer("builtin:minilm")
    texts = ["a wonderful, moving film", "dull and far too long"]
    with torch.no_grad():
        expected = torch.softmax(pm(**tok(texts, padding=True, return_tensors="pt")).logits, -1)
    pm.save(tmp_path / "a", pipeline={"model": "builtin:minilm", "task": "classification",
                                      "label_names": ["negative", "positive"], "max_length": 64})
    loaded = serve.load(str(tmp_path / "a"))
    out = serve.predict(loaded, texts)
    assert [o["label"] for o in out] == [["negative", "positive"][int(i)] for i in expected.argmax(-1)]
    for o, p in zip(out, expected):
        assert o["probabilities"]["positive"] == pytest.approx(float(p[1]), abs=1e-5)
    with pytest.raises(serve.ServeError, match="use predict"):
        serve.generate(loaded, "hello")


def test_folder_without_pipeline_block_is_refused(tmp_path) -> None:
    base = models.load_model("builtin:minilm", "classification", num_labels=2)
    peft_core.apply(base, {"name": "linear_probe"}).save(tmp_path / "a")
    with pytest.raises(serve.ServeError, match="no 'pipeline' block"):
        serve.load(str(tmp_path / "a"))
    with pytest.raises(serve.ServeError, match="neither a models:/ URI nor a folder"):
        serve.load(str(tmp_path / "missing"))
