"""Evaluation scores: ECE and NLL against a hand-computed example, and ``evaluate_adapter``
(what promotion scores champions with) on a fitted ``laplace_lora``: its posterior
predictive, not its MAP point, checked against the predictive computed here directly.
No Ray: a tiny random BERT saved as a folder and a contract-conforming dataset."""

from __future__ import annotations

import math

import pytest
import torch

import peft_core
from pipelines import models, serve
from pipelines.evaluate import evaluate_adapter
from pipelines.train import metrics as M
from pipelines.train.data import Collator, read_manifest, read_split
from tests.pipelines import train_helpers

pytestmark = pytest.mark.timeout(180)

# five predictions; rows 0 and 4 share the top confidence bin (0.95 and 0.94 -> bin 15 of 15)
PROBS = [[0.95, 0.05], [0.35, 0.65], [0.25, 0.75], [0.15, 0.85], [0.94, 0.06]]
LABELS = [0, 0, 1, 1, 1]


def test_calibration_against_a_hand_computed_example() -> None:
    # bin 15: 2 rows, confidence (0.95 + 0.94) / 2 = 0.945, accuracy 1/2 -> |0.5 - 0.945|
    # bins of 0.65 (wrong), 0.75, 0.85 (right): |0 - 0.65|, |1 - 0.75|, |1 - 0.85|
    ece = (2 * 0.445 + 0.65 + 0.25 + 0.15) / 5
    nll = -sum(math.log(p) for p in (0.95, 0.35, 0.75, 0.85, 0.06)) / 5
    c = M.Calibration()
    # in two shards: the sums add up
    c.add(torch.tensor(PROBS[:2], dtype=torch.float64), torch.tensor(LABELS[:2]))
    c.add(torch.tensor(PROBS[2:], dtype=torch.float64), torch.tensor(LABELS[2:]))
    got = c.summarise()
    assert got[M.EVAL_ECE] == pytest.approx(ece, abs=1e-12)  # 0.388
    assert got[M.EVAL_NLL] == pytest.approx(nll, abs=1e-12)
    assert got[M.EVAL_ACCURACY] == pytest.approx(3 / 5)
    # the same definition as peft_core's (used by the Laplace benchmark)
    from peft_core.methods.laplace import calibration_metrics

    ref = calibration_metrics(torch.tensor(PROBS, dtype=torch.float64), torch.tensor(LABELS))
    assert got[M.EVAL_ECE] == pytest.approx(ref["ece"], abs=1e-12)
    assert got[M.EVAL_NLL] == pytest.approx(ref["nll"], abs=1e-12)
    # a perfectly confident, always right model has ECE 0; always wrong, ECE 1
    right = M.Calibration()
    right.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    assert right.summarise()[M.EVAL_ECE] == 0.0
    wrong = M.Calibration()
    wrong.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 0]))
    assert wrong.summarise()[M.EVAL_ECE] == 1.0
    assert math.isnan(M.Calibration().summarise()[M.EVAL_ECE])
    with pytest.raises(ValueError, match="probs"):
        c.add(torch.tensor([0.5, 0.5]), torch.tensor([0]))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    base = train_helpers.save_tiny("bert", root / "tiny-bert")
    ds = train_helpers.write_dataset(root / "data", "classification", rows=48, eval_rows=32)
    return base, ds


def _adapter(base_dir, ds, out, method: str):
    info = read_manifest(ds)
    torch.manual_seed(0)
    base = models.load_model(str(base_dir), "classification", num_labels=2)
    pm = peft_core.apply(base, {"name": method, "rank": 4})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a confident model, so MAP and predictive visibly differ
        for name, p in pm.trainable_parameters():
            if "lora_B" in name or "classifier" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 2.0)
    if method == "laplace_lora":
        train = read_split(info, "train")
        pm.finalize([Collator(info)(train[i:i + 16]) for i in range(0, len(train), 16)])
    block = {"model": str(base_dir), "task": "classification", "label_names": info.label_names,
             "max_length": info.max_length}
    return pm.save(out, pipeline=block), info


def test_laplace_lora_is_scored_by_its_posterior_predictive(data, tmp_path) -> None:
    from peft_core.methods.laplace import calibration_metrics, predictive_probs

    base_dir, ds = data
    folder, info = _adapter(base_dir, ds, tmp_path / "la", "laplace_lora")
    got = evaluate_adapter(folder, ds, split="eval")
    assert got[M.LAPLACE_PREDICTIVE] == 1.0 and got["rows"] == 32

    # by hand: the adapter loaded again, the predictive over the same rows, peft_core's metrics
    loaded = serve.load(str(folder))
    assert serve.uses_posterior(loaded)
    batch = Collator(info)(read_split(info, "eval"))
    labels = batch["labels"]
    probs = predictive_probs(loaded.model, batch)
    want = calibration_metrics(probs, labels)
    assert got[M.EVAL_NLL] == pytest.approx(want["nll"], abs=1e-5)
    assert got["eval_loss"] == got[M.EVAL_NLL]  # the loss promotion compares is the predictive's
    assert got[M.EVAL_ECE] == pytest.approx(want["ece"], abs=1e-5)
    assert got["eval_accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
    assert 0.0 <= got[M.EVAL_ECE] <= 1.0

    # the MAP point's scores are kept apart, and they are not the predictive's
    with torch.no_grad():
        logits = loaded.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    map_nll = float(torch.nn.functional.cross_entropy(logits.float(), labels))
    assert got["eval_map_loss"] == pytest.approx(map_nll, abs=1e-5)
    assert got["eval_map_nll"] == pytest.approx(map_nll, abs=1e-5)
    assert abs(got["eval_map_loss"] - got["eval_loss"]) > 1e-3
    # Laplace exists to be better calibrated than its MAP point on a confident model
    assert got[M.EVAL_NLL] < got["eval_map_nll"]


def test_every_classifier_gets_ece_and_nll(data, tmp_path) -> None:
    base_dir, ds = data
    folder, info = _adapter(base_dir, ds, tmp_path / "lora", "lora")
    got = evaluate_adapter(folder, ds, split="eval")
    assert M.LAPLACE_PREDICTIVE not in got and "eval_map_loss" not in got
    # the softmax's NLL is the cross-entropy the loss already is
    assert got[M.EVAL_NLL] == pytest.approx(got["eval_loss"], abs=1e-5)
    assert 0.0 <= got[M.EVAL_ECE] <= 1.0
    batch = Collator(info)(read_split(info, "eval"))
    loaded = serve.load(str(folder))
    with torch.no_grad():
        probs = torch.softmax(loaded.model(**{k: v for k, v in batch.items()
                                              if k != "labels"}).logits.float(), -1)
    c = M.Calibration()
    c.add(probs, batch["labels"])
    assert got[M.EVAL_ECE] == pytest.approx(c.summarise()[M.EVAL_ECE], abs=1e-6)
