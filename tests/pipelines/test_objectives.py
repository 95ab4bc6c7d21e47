"""An objective is one module: this file registers a throwaway one (a mean-squared-error
regression on the first output of a sequence-classification head) and trains it through
Ray Train with ``train.plugins`` naming this module, without touching the loop; the
built-in objectives are what a run's task gets by default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peft_core
from pipelines import models
from pipelines.train import TrainConfig, train
from pipelines.train import metrics as M
from pipelines.train.data import Collator, eval_batches, read_manifest, read_split
from pipelines.train.objectives import EvalSums, Objective, available, objective_for, register
from tests.pipelines import train_helpers

pytestmark = pytest.mark.timeout(600)


@register
class MeanSquaredError(Objective):
    """Regress the class index (0 or 1) on the head's first output."""

    name = "test_mse_regression"

    def forward(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        pred = out.logits[:, 0].float()
        return torch.nn.functional.mse_loss(pred, batch["labels"].float()), out.logits

    def logits_loss(self, model, logits, labels):
        return torch.nn.functional.mse_loss(logits[:, 0].float(), labels.float())

    def eval_sums(self, *, calibrate: bool = False) -> EvalSums:
        return EvalSums()


def test_every_task_has_a_default_objective() -> None:
    from pipelines.data.manifest import TASKS, Manifest

    want = {"classification": "classification", "causal_lm": "causal_lm",
            "instruction": "causal_lm"}
    assert set(TASKS) == set(want)
    for task in TASKS:
        info = Manifest.model_construct(task=task)
        assert objective_for(info).name == want[task], task


def test_default_objectives_follow_the_task(tmp_path) -> None:
    assert {"classification", "causal_lm", "test_mse_regression"} <= set(available())
    data = train_helpers.write_dataset(tmp_path / "cls", "classification", rows=16, eval_rows=8)
    assert objective_for(read_manifest(data)).name == "classification"
    with pytest.raises(ValueError, match="objective: unknown 'nope'"):
        objective_for(read_manifest(data), "nope")


def test_an_unknown_objective_names_the_field(tmp_path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="objective"):
        TrainConfig.model_validate({"model": {"name": "x"}, "objective": "no_such_objective"})


def test_a_registered_objective_trains_through_ray_train(ray_cluster, tmp_path) -> None:
    model = train_helpers.save_tiny("bert", tmp_path / "bert")
    data = train_helpers.write_dataset(tmp_path / "data", "classification", rows=48,
                                       eval_rows=16)
    cfg = TrainConfig.model_validate(dict(
        model={"name": str(model)}, method={"name": "lora", "rank": 4},
        objective="test_mse_regression", plugins=["tests.pipelines.test_objectives"],
        num_workers=2, batch_size=8, micro_batch_size=4, max_steps=12, lr=5e-2,
        schedule="constant", eval_every=4, checkpoint_every=12, eval_before_training=True))
    res = train(cfg, manifest=data, run_dir=tmp_path / "run")
    first, last = res.history[0], res.history[-1]
    assert [h[M.STEP] for h in res.history] == [0, 4, 8, 12]
    # the objective's own metrics, not the task's: no accuracy, no calibration
    assert M.EVAL_ACCURACY not in last and M.EVAL_ECE not in last
    # 0.307 -> 0.216 when written (12 steps of LoRA on a tiny random BERT)
    assert last["eval_loss"] < 0.85 * first["eval_loss"], (first["eval_loss"], last["eval_loss"])
    # the reported eval loss is the MSE of the saved adapter, recomputed here
    info = read_manifest(data)
    pm = peft_core.load_adapter(models.load_model(str(model), info.task,
                                                  num_labels=info.num_labels), res.adapter_dir)
    pm.eval()
    rows = read_split(info, "eval")
    (batch,) = eval_batches(rows, Collator(info), batch_size=len(rows), rank=0, world=1,
                            max_batches=None)
    with torch.no_grad():
        mse, _ = MeanSquaredError(info).forward(pm, batch)
    assert float(mse) == pytest.approx(last["eval_loss"], rel=1e-4)
    assert Path(res.adapter_dir, "adapter.safetensors").is_file()
