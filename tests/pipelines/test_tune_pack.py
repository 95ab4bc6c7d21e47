"""Packed trials (``tune.pack``): a real Ray Tune search whose two LoRA trials train in one
worker group (2 ranks) over one base, against the same two trials run alone.

Each member must follow its solo run (same seed, same data): the same eval losses at every
report and the same saved adapter; ASHA's rule, now applied per member inside the pack,
must stop exactly the member the solo histories say it stops, and the other member must
train on to the end, unchanged by its pack-mate leaving."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipelines import tracking
from pipelines.train import ModelConfig, TrainConfig
from pipelines.train.metrics import PHASES, phase_key
from pipelines.tune import TuneConfig
from pipelines.tune.packing import SuccessiveHalving, check
from tests.pipelines import train_helpers

pytestmark = pytest.mark.timeout(900)

LRS = [3e-2, 1e-6]  # the second member barely moves: the one halving should stop
SPACE = {"methods": {"lora": {"rank": 4, "alpha": 8}}, "lr": LRS}


def _tune(**kw) -> TuneConfig:
    return TuneConfig.model_validate({
        "space": SPACE, "searcher": "grid", "max_concurrent_trials": 1,
        "grace_period": 1, "reduction_factor": 2,
        "objective": {"metric": "eval_loss", "mode": "min"}, **kw})


@pytest.fixture(scope="module")
def searches(ray_cluster, tmp_path_factory):
    from pipelines.tune.stage import search

    tmp = tmp_path_factory.mktemp("pack")
    data = train_helpers.write_dataset(tmp / "data", "classification", rows=64, eval_rows=32)
    model = train_helpers.save_tiny("bert", tmp / "bert")
    train = TrainConfig(model=ModelConfig(name=str(model)), num_workers=2, batch_size=8,
                        micro_batch_size=2, max_steps=6, eval_every=2, grad_clip=1.0,
                        warmup_steps=2, storage_path=str(tmp / "unused"))
    track = tracking.TrackingConfig(experiment="pack")
    solo = search(train, _tune(scheduler="fifo"), manifest=data, run_dir=tmp / "solo",
                  tracking=track, verbose=False)
    packed = search(train, _tune(scheduler="asha", pack=2), manifest=data,
                    run_dir=tmp / "packed", tracking=track, verbose=False)
    return {"solo": solo, "packed": packed, "tracking": track, "tmp": tmp, "train": train,
            "data": data}


def _by_lr(result) -> dict[float, dict]:
    return {t["lr"]: t for t in result.trials}


def _adapter(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{folder}/adapter.safetensors")


def test_members_follow_their_solo_runs_and_halving_stops_one(searches) -> None:
    solo, packed = _by_lr(searches["solo"]), _by_lr(searches["packed"])
    assert sorted(solo) == sorted(packed) == sorted(LRS)
    assert len({t["metrics"]["pack"] for t in packed.values()}) == 1, "not one pack"
    assert all(t["status"] == "completed" for t in solo.values())

    # which member ASHA's rule stops, replayed on the solo runs' reports in member order
    rule = SuccessiveHalving(mode="min", grace_period=1, reduction_factor=2, max_t=4)
    expected = set()
    for i in range(3):
        for lr in LRS:
            if lr not in expected and rule.decide(str(lr), i + 1,
                                                  solo[lr]["history"]["eval_loss"][i][1]):
                expected.add(lr)
    assert expected == {LRS[1]}, ("the test's learning rates no longer separate the members",
                                  {lr: solo[lr]["history"]["eval_loss"] for lr in LRS})
    stopped = {lr for lr, t in packed.items() if t["status"] == "stopped early"}
    assert stopped == expected
    keep, gone = packed[LRS[0]], packed[LRS[1]]
    assert keep["status"] == "completed" and keep["metrics"]["step"] == 6

    for lr, t in packed.items():
        mine, alone = t["history"]["eval_loss"], solo[lr]["history"]["eval_loss"]
        assert mine and [s for s, _ in mine] == [s for s, _ in alone][:len(mine)]
        for (_, a), (_, b) in zip(mine, alone):
            assert math.isclose(a, b, rel_tol=1e-4), (lr, mine, alone)
        assert "eval_accuracy" in t["metrics"] and t["metrics"]["trainable_fraction"] > 0
    assert len(gone["history"]["eval_loss"]) < len(keep["history"]["eval_loss"])
    # the member that trained to the end saved the solo run's adapter
    a, b = _adapter(keep["adapter_dir"]), _adapter(solo[LRS[0]]["adapter_dir"])
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # the stopped one's adapter is there too, as it was when it stopped
    cfg = json.loads((Path(gone["adapter_dir"]) / "adapter_config.json").read_text())
    assert cfg["training"]["step"] == gone["metrics"]["step"] < 6


def test_each_member_has_its_own_mlflow_run_and_phases(searches) -> None:
    res = searches["packed"]
    client = tracking.client(searches["tracking"], searches["tmp"] / "packed")
    for t in res.trials:
        run = client.get_run(t["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["peftpipe.stopped_early"] == str(t["status"] == "stopped early")
        assert run.data.params["pack"] == t["metrics"]["pack"]
        assert float(run.data.params["lr"]) == t["lr"]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")]
        assert steps == [s for s, _ in t["history"]["eval_loss"]]
        assert any(f.path == "adapter" for f in client.list_artifacts(run.info.run_id))
        # a member's phases are its pack's: they add up to the pack trial's wall time
        phases = {p: t["metrics"][phase_key(p)] for p in PHASES}
        assert phases["steps"] > 0 and phases["load"] > 0 and phases["eval"] > 0
        wall = t["time_s"]
        assert wall and abs(sum(phases.values()) - wall) <= 0.05 * wall, (wall, phases)


def test_a_pack_resumes_from_its_checkpoint(searches) -> None:
    """A packed run started again from its oldest kept checkpoint (after one member had
    left) restores the members' adapters, optimizers and schedules, keeps the ended member
    out, and ends where the uninterrupted run ended."""
    from pipelines.train import build_trainer, scheduling

    packed = _by_lr(searches["packed"])
    keep, gone = packed[LRS[0]], packed[LRS[1]]
    pack_dir = Path(keep["adapter_dir"]).parents[2]
    first = min(pack_dir.parent.glob("checkpoint_*"))
    state = json.loads((first / "train_state.json").read_text())
    at = state["step"]
    assert 2 <= at < 6 and state["pack"]["ended"] == [gone["trial_id"]]
    members = [{"name": t["trial_id"], "method": t["method"], "lr": t["lr"]}
               for t in sorted(packed.values(), key=lambda t: t["trial_id"])]
    train = searches["train"].model_copy(update={"cpus_per_worker": 0.9})
    trainer = build_trainer(train, searches["data"], searches["tmp"] / "resumed",
                            report_to_tune=False, members=members, resume_from=first)
    result = scheduling.fit(trainer, train)
    history = result.return_value
    assert history[-1]["resumed_from"] == at and history[-1]["step"] == 6
    last = history[-1]["members"]
    assert last[gone["trial_id"]]["status"] == "stopped early"
    assert last[gone["trial_id"]]["step"] == 2
    assert math.isclose(last[keep["trial_id"]]["eval_loss"], keep["metrics"]["eval_loss"],
                        rel_tol=1e-5)
    a = _adapter(Path(result.checkpoint.path) / "members" / keep["trial_id"] / "adapter")
    b = _adapter(keep["adapter_dir"])
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("train_kw, tune_kw, field", [
    ({}, {"searcher": "optuna"}, "tune.pack"),
    ({"zero": {"stage": 3}}, {}, "tune.pack"),
    ({"gradient_checkpointing": True}, {}, "tune.pack"),
    ({}, {"space": {"methods": {"dora": {"rank": 4}}}}, "tune.space.methods.dora"),
    ({}, {"space": {"methods": {"lora": {"init": "pissa"}}}}, "tune.space.methods.lora"),
])
def test_a_search_that_cannot_be_packed_is_refused_naming_the_field(train_kw, tune_kw,
                                                                     field) -> None:
    train = TrainConfig.model_validate({"model": {"name": "m"}, **train_kw})
    tune = TuneConfig.model_validate({"space": {"methods": {"lora": {}}}, "pack": 2, **tune_kw})
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        check(train, tune)
    check(train, tune.model_copy(update={"pack": 1}))  # unpacked, the same search is fine


def test_the_readme_pack_example_is_a_valid_packed_search() -> None:
    import re

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "pack:" in b]
    assert len(blocks) == 1, "README lost its tune.pack example"
    tune = TuneConfig.model_validate(yaml.safe_load(blocks[0])["tune"])
    assert tune.pack == 4 and len(tune.space.grid()) == 8
    check(TrainConfig.model_validate({"model": {"name": "m"}}), tune)
