"""The training stage without Ray: config validation, input checks before any worker
starts, the DeepSpeed config, the schedule, and how batches are cut per rank."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError

from pipelines.train import DatasetError, TrainConfig, build_trainer, check_inputs, find_dataset
from pipelines.train import deepspeed_config as dsc
from pipelines.train.data import Collator, TrainBatches, eval_batches, read_manifest, read_split
from pipelines.train.schedule import lr_lambda
from tests.pipelines import train_helpers


def cfg(**over) -> TrainConfig:
    base = {"model": {"name": "builtin:minilm"}, "num_workers": 2, "batch_size": 8,
            "micro_batch_size": 2}
    return TrainConfig.model_validate({**base, **over})


@pytest.mark.parametrize(
    ("over", "field", "words"),
    [
        ({"zero": {"stage": 4}}, "zero.stage", "0, 1, 2 or 3"),
        ({"zero": {"stage": 0, "offload_optimizer": True}}, "zero", "needs ZeRO stage 1, 2 or 3"),
        ({"zero": {"stage": 2, "offload_param": True}}, "zero", "needs ZeRO stage 3"),
        ({"batch_size": 10}, "batch_size",
         "not divisible by micro_batch_size (2) x num_workers (2)"),
        ({"method": {"name": "loraa"}}, "method", "loraa"),
        ({"method": {"name": "lora", "rnak": 4}}, "method", "unknown field"),
        ({"method": {"name": "lora", "rank": 0}}, "method", "rank"),
        ({"eval_every": 4, "checkpoint_every": 6}, "checkpoint_every", "multiple of eval_every"),
        ({"lr": 0}, "lr", "greater than 0"),
        ({"precision": "fp16"}, "precision", "fp32"),
        ({"epochs": 3}, "epochs", "Extra inputs"),
        ({"plugins": ["no_such_module_xyz"]}, "plugins", "cannot import"),
    ],
)
def test_bad_config_names_the_field(over, field, words) -> None:
    with pytest.raises((ValidationError, ValueError)) as e:
        cfg(**over)
    msg = str(e.value)
    assert field.split(".")[0] in msg and words in msg, msg


def test_grad_accumulation_and_run_name() -> None:
    c = cfg(batch_size=16, micro_batch_size=2, num_workers=2)
    assert c.grad_accum == 4
    assert c.run_name() == cfg(batch_size=16).run_name() != cfg(batch_size=16, lr=0.5).run_name()
    assert c.run_name().startswith("lora-")
    assert c.ckpt_every == c.eval_every


def test_deepspeed_config_per_stage() -> None:
    d = dsc.build(cfg(zero={"stage": 3, "offload_optimizer": True, "offload_param": True,
                            "param_persistence_threshold": 0}, grad_clip=0.5))
    z = d["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu"
    assert z["offload_param"]["device"] == "cpu" and z["stage3_param_persistence_threshold"] == 0
    assert d["train_batch_size"] == 8 and d["train_micro_batch_size_per_gpu"] == 2
    assert d["gradient_accumulation_steps"] == 2 and d["gradient_clipping"] == 0.5
    assert d["optimizer"]["params"]["torch_adam"] is True
    assert d["zero_force_ds_cpu_optimizer"] is False  # torch AdamW allowed with offload
    assert d["bf16"]["enabled"] is False  # CPU: fp32
    d0 = dsc.build(cfg(grad_clip=None, optimizer="deepspeed"))
    assert d0["zero_optimization"] == {"stage": 0}
    assert "gradient_clipping" not in d0 and "torch_adam" not in d0["optimizer"]["params"]
    # ZeRO-3 gathering: memory-lean on CPU unless the recipe says otherwise, DeepSpeed's
    # own defaults on GPUs
    assert z["stage3_max_live_parameters"] == dsc.ZERO3_CPU_DEFAULTS["stage3_max_live_parameters"]
    assert z["stage3_prefetch_bucket_size"] == 0 and z["stage3_max_reuse_distance"] == 0
    z3 = cfg(zero={"stage": 3, "max_live_parameters": 123, "prefetch_bucket_size": 7})
    zc = dsc.build(z3, device_type="cpu")["zero_optimization"]
    assert zc["stage3_max_live_parameters"] == 123 and zc["stage3_prefetch_bucket_size"] == 7
    zg = dsc.build(cfg(zero={"stage": 3}), device_type="cuda")["zero_optimization"]
    assert not any(k in zg for k in dsc.ZERO3_CPU_DEFAULTS)
    with pytest.raises(ValueError,
                       match="zero.max_live_parameters: only meaningful with ZeRO stage 3"):
        cfg(zero={"stage": 2, "max_live_parameters": 1})
    # An explicit bf16 runs on CPU too (the GPU code path, testable here); auto stays fp32.
    assert dsc.build(cfg(precision="bf16"), device_type="cpu")["bf16"]["enabled"] is True
    assert dsc.build(cfg(precision="auto"), device_type="cpu")["bf16"]["enabled"] is False


def test_schedule_warmup_then_decay() -> None:
    f = lr_lambda(cfg(max_steps=10, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1))
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    g = lr_lambda(cfg(max_steps=10, schedule="linear"))
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5) and g(10) == pytest.approx(0.0)
    assert lr_lambda(cfg(schedule="constant"))(7) == 1.0


# -- inputs checked before any worker starts --------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return (train_helpers.save_tiny("llama", root / "model"),
            train_helpers.write_dataset(root / "data", rows=40, eval_rows=10))


def test_missing_dataset_id_lists_what_exists(tiny_lm) -> None:
    _, data = tiny_lm
    with pytest.raises(DatasetError, match=r"dataset_id: 'nope' not found .* "
                                           r"available: \['tiny-causal_lm-0'\]"):
        find_dataset(data.parent, "nope")
    assert find_dataset(data.parent, data.name) == data
    with pytest.raises(DatasetError, match="no manifest.json"):
        read_manifest(data.parent / "nope")


def test_bad_inputs_fail_on_the_driver(tiny_lm, tmp_path) -> None:
    import ray

    model, data = tiny_lm
    good = {"model": {"name": str(model)}}
    with pytest.raises(ValueError, match="model.name: cannot load"):
        build_trainer(cfg(model={"name": str(tmp_path / "missing")}), data, tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model.name: cannot load"):
        check_inputs(cfg(model={"name": str(tmp_path / "empty")}), data)
    with pytest.raises(DatasetError, match="batch_size: 64 exceeds the train split"):
        check_inputs(cfg(batch_size=64, micro_batch_size=2, **good), data)
    with pytest.raises(DatasetError, match="no manifest.json"):
        build_trainer(cfg(**good), tmp_path / "no-data", tmp_path / "r")
    with pytest.raises(ValueError, match="resume_from: .* not a training checkpoint"):
        build_trainer(cfg(**good), data, tmp_path / "r", resume_from=tmp_path)
    # a dataset tokenized for a bigger vocabulary than the model's
    big = json.loads((data / "manifest.json").read_text())
    other = train_helpers.write_dataset(tmp_path / "d2", rows=40, eval_rows=10)
    (other / "manifest.json").write_text(json.dumps({**big, "pad_token_id": 50000}))
    with pytest.raises(ValueError, match="pads with id 50000"):
        check_inputs(cfg(**good), other)
    assert not ray.is_initialized()  # nothing above needed (or started) a cluster
    info = check_inputs(cfg(**good), data)
    assert info.task == "causal_lm" and info.rows["train"] == 40 and info.is_lm


# -- batches ----------------------------------------------------------------------------------

def test_rank_batches_partition_each_global_batch(tiny_lm) -> None:
    _, data = tiny_lm
    info = read_manifest(data)
    assert len(read_split(info, "train")) == 40  # both Parquet files of the split
    # distinct one-token rows, so a batch's content identifies the rows it took
    rows = [{"input_ids": [i], "attention_mask": [1], "labels": [i]} for i in range(40)]
    collate = Collator(info)

    def seen(world: int, step: int, micro: int) -> list[int]:
        out = []
        for r in range(world):
            tb = TrainBatches(rows, collate, batch_size=8, micro_batch_size=micro, rank=r,
                              world=world, seed=3)
            out += [int(i) for mb in tb.micro_batches(step) for i in mb["input_ids"][:, 0]]
        return sorted(out)

    # the same global batch whatever the number of workers and accumulation; a new order
    # each epoch; every row once per epoch
    for step in (0, 4, 5):
        assert seen(1, step, 8) == seen(2, step, 2) == seen(4, step, 1) == seen(2, step, 4)
    assert len(seen(2, 0, 2)) == 8 and seen(2, 0, 2) != seen(2, 5, 2)
    assert sorted(sum((seen(2, s, 2) for s in range(5)), [])) == list(range(40))
    tb = TrainBatches(rows, collate, batch_size=8, micro_batch_size=2, rank=0, world=2, seed=3)
    assert tb.steps_per_epoch == 5 and tb.position(7) == {"epoch": 1, "batch": 2}
    other = TrainBatches(rows, collate, batch_size=8, micro_batch_size=2, rank=1, world=2, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(tb.common_batches(2), other.common_batches(2)))
    with pytest.raises(DatasetError, match="fewer than one batch"):
        TrainBatches(rows[:4], collate, batch_size=8, micro_batch_size=2, rank=0, world=2, seed=0)


def test_eval_batches_same_count_on_every_rank(tiny_lm) -> None:
    _, data = tiny_lm
    info = read_manifest(data)
    rows = read_split(info, "eval")[:7]
    collate = Collator(info)
    per_rank = [eval_batches(rows, collate, batch_size=2, rank=r, world=3, max_batches=None)
                for r in range(3)]
    assert {len(b) for b in per_rank} == {2}  # ceil(ceil(7/3)/2)
    real = sum(int(b["input_ids"].shape[0]) for bs in per_rank for b in bs if b is not None)
    assert real == 7 and per_rank[2][1] is None and per_rank[0][1] is not None
    assert len(eval_batches(rows, collate, batch_size=1, rank=0, world=1, max_batches=3)) == 3


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_per_batch(side, tmp_path) -> None:
    data = train_helpers.write_dataset(tmp_path, rows=4, eval_rows=2, padding_side=side)
    info = read_manifest(data)
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [8], "attention_mask": [1], "labels": [8]}]
    b = Collator(info)(rows)
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    assert ids.shape == (2, 3) and ids.dtype == torch.long
    if side == "right":
        assert ids[1].tolist() == [8, 0, 0] and mask[1].tolist() == [1, 0, 0]
        assert labels[1].tolist() == [8, -100, -100]
    else:
        assert ids[1].tolist() == [0, 0, 8] and mask[1].tolist() == [0, 0, 1]
        assert labels[1].tolist() == [-100, -100, 8]
    cls = train_helpers.write_dataset(tmp_path / "c", "classification", rows=4, eval_rows=2)
    cb = Collator(read_manifest(cls))(read_split(read_manifest(cls), "train"))
    assert cb["labels"].shape == (4,) and cb["labels"].dtype == torch.long
