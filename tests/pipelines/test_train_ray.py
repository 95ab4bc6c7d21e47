"""The training stage on a real local Ray cluster with real DeepSpeed on CPU, 2 workers,
tiny models, datasets tokenized by the real data stage. Each Ray Train run costs tens of
seconds of worker start-up on a small machine, so every run checks several things:

- ZeRO-0 and ZeRO-3 (everything partitioned) train LoRA, lower the loss, and give the
  same adapter; the checkpoint is the adapter plus resume state, no base weights;
- ZeRO-3 with optimizer and parameter offload, stopped after 4 steps and resumed to 8,
  continues the step count and the loss curve of the uninterrupted run, same adapter;
- a classifier under ZeRO-2 with optimizer offload and activation checkpointing lowers
  its loss although a worker is SIGKILLed mid-run: the worker is replaced and training
  resumes from the last committed checkpoint;
- every registered method's code path (one per module and hook set; all with
  PEFTPIPE_ZERO3_ALL_METHODS=1) trains under ZeRO-3 on a base model built partitioned."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peft_core
from pipelines import models
from pipelines.train import TrainConfig, train
from tests import tiny
from tests.pipelines import train_helpers

pytestmark = pytest.mark.timeout(600)

LORA = {"name": "lora", "rank": 4, "alpha": 8}


@pytest.fixture(scope="module")
def lm(ray_cluster, tmp_path_factory):
    """A tiny random Llama sized for MiniLM's vocabulary, and counting phrases tokenized
    by the real data stage."""
    root = tmp_path_factory.mktemp("train-lm")
    manifest = train_helpers.prepared(root, "causal_lm", rows=80)
    assert manifest.rows["train"] >= 48 and manifest.rows["eval"] >= 8
    model = train_helpers.save_tiny("llama", root / "model", vocab_size=train_helpers.MINILM_VOCAB)
    return model, manifest


def lm_config(model: Path, **over) -> TrainConfig:
    base = dict(model={"name": str(model)}, method=LORA, num_workers=2, batch_size=8,
                micro_batch_size=2, max_steps=8, lr=2e-2, schedule="constant", eval_every=2,
                checkpoint_every=4, eval_before_training=True, seed=0)
    return TrainConfig.model_validate({**base, **over})


_RUNS: dict[str, object] = {}


def run_once(key: str, config: TrainConfig, manifest: Path, root: Path):
    """Each configuration is trained once per module and shared by the tests reading it."""
    if key not in _RUNS:
        _RUNS[key] = train(config, manifest=manifest, run_dir=root / key)
    return _RUNS[key]


ZERO = {
    "zero0": {"stage": 0},
    # threshold 0: tiny tensors are partitioned too, so ZeRO-3 really shards everything
    "zero3": {"stage": 3, "param_persistence_threshold": 0},
}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("train-runs")


def adapter(res) -> dict[str, torch.Tensor]:
    return load_file(str(Path(res.adapter_dir) / "adapter.safetensors"))


@pytest.mark.parametrize("key", list(ZERO))
def test_each_zero_stage_trains_lora(ray_cluster, lm, runs_root, key) -> None:
    model, data = lm
    res = run_once(key, lm_config(model, zero=ZERO[key]), data, runs_root)
    h = res.history
    assert [r["step"] for r in h] == [0, 2, 4, 6, 8]
    # from the untrained baseline (step 0) to the end
    assert h[-1]["eval_loss"] < h[0]["eval_loss"] - 0.1, [r["eval_loss"] for r in h]
    assert h[-1]["train_loss"] < h[1]["train_loss"], [r.get("train_loss") for r in h]
    for r in h[1:]:
        for name in ("train_loss", "eval_loss", "perplexity", "trainable_params",
                     "trainable_fraction", "tokens_per_s", "step_time_s", "peak_mem_mb"):
            assert r[name] > 0, (name, r)
    assert h[-1]["trainable_fraction"] < 0.5
    state = adapter(res)
    assert state and all(t.numel() > 0 for t in state.values())
    # the adapter is the method's tensors only, and every one of them
    pm = peft_core.apply(tiny.model("llama"), LORA)
    assert set(state) == set(pm.adapter_state_dict())


def test_zero3_adapter_equals_zero0(ray_cluster, lm, runs_root) -> None:
    model, data = lm
    ref = adapter(run_once("zero0", lm_config(model, zero=ZERO["zero0"]), data, runs_root))
    got = adapter(run_once("zero3", lm_config(model, zero=ZERO["zero3"]), data, runs_root))
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].shape == ref[k].shape and got[k].numel() > 0, k
        # Same seed and data; only the reduction order differs between the stages.
        torch.testing.assert_close(got[k], ref[k], atol=3e-3, rtol=0, msg=k)
    # ... and the training actually moved them (B starts at zero)
    assert max(float(t.abs().max()) for k, t in ref.items() if "lora_B" in k) > 1e-2


def test_checkpoint_is_adapter_plus_resume_state(ray_cluster, lm, runs_root) -> None:
    model, data = lm
    res = run_once("zero3", lm_config(model, zero=ZERO["zero3"]), data, runs_root)
    ckpt = Path(res.checkpoint_dir)
    base_bytes = sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    ds_bytes = sum(p.stat().st_size for p in (ckpt / "deepspeed").rglob("*.pt"))
    # adapter + Adam moments of the adapter; no copy of the base weights
    assert ds_bytes < 0.6 * base_bytes, (ds_bytes, base_bytes)
    assert ckpt_bytes < base_bytes + 200_000
    assert (ckpt / "train_state.json").is_file() and (ckpt / "rng_rank1.pt").is_file()
    # The adapter folder loads onto a fresh base and carries what serving needs.
    cfg = peft_core.read_adapter_config(ckpt / "adapter")
    assert cfg["pipeline"]["task"] == "causal_lm" and cfg["pipeline"]["model"] == str(model)
    pm = peft_core.load_adapter(models.load_model(str(model), "causal_lm"), ckpt / "adapter")
    assert pm.summary()["trainable_params"] == res.metrics["trainable_params"]


def test_resume_continues_steps_and_loss_curve(ray_cluster, lm, runs_root) -> None:
    """ZeRO-3 with optimizer and parameter offload: 4 steps, then the same run folder
    extended to 8 steps, against the uninterrupted ZeRO-3 run."""
    model, data = lm
    ref = run_once("zero3", lm_config(model, zero=ZERO["zero3"]), data, runs_root)
    zero = {"stage": 3, "param_persistence_threshold": 0, "offload_optimizer": True,
            "offload_param": True}
    run_dir = runs_root / "resumed"
    first = train(lm_config(model, zero=zero, max_steps=4), manifest=data, run_dir=run_dir)
    assert [r["step"] for r in first.history] == [0, 2, 4]
    second = train(lm_config(model, zero=zero, max_steps=8), manifest=data, run_dir=run_dir)
    assert [r["step"] for r in second.history] == [0, 2, 4, 6, 8]
    assert second.history[-1]["resumed_from"] == 4
    for got, want in zip(second.history, ref.history):
        assert got.get("train_loss", 0) == pytest.approx(want.get("train_loss", 0), abs=2e-3)
        assert got["eval_loss"] == pytest.approx(want["eval_loss"], abs=2e-3), (got, want)
    a, b = adapter(second), adapter(ref)
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=3e-3, rtol=0, msg=k)


def test_killed_worker_is_replaced_and_resumes(ray_cluster, tmp_path) -> None:
    """A classifier under ZeRO-2 with optimizer offload and activation checkpointing:
    SIGKILL rank 1 once a checkpoint is committed; the run restarts its workers from that
    checkpoint, finishes the same step sequence, and its loss falls."""
    model = train_helpers.save_tiny("bert", tmp_path / "bert",
                                    vocab_size=train_helpers.MINILM_VOCAB)
    data = train_helpers.prepared(tmp_path, "classification", rows=80)
    cfg = TrainConfig.model_validate(dict(
        model={"name": str(model)}, method=LORA, num_workers=2, batch_size=8,
        micro_batch_size=4, max_steps=24, lr=2e-2, schedule="cosine", warmup_steps=2,
        eval_every=4, checkpoint_every=4, zero={"stage": 2, "offload_optimizer": True},
        gradient_checkpointing=True, max_failures=1))
    run_dir = tmp_path / "run"
    pid_file = run_dir / "workers" / "rank1.pid"
    killed: dict[str, int] = {}

    snapshot = run_dir / "checkpoint_manager_snapshot.json"

    def committed() -> int:
        # Ray Train's controller rewrites this file each time it registers a checkpoint;
        # a checkpoint folder alone may still be waiting for the other rank's report.
        try:
            return len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):
            return 0

    def kill_after_a_committed_checkpoint() -> None:
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            if committed() >= 1 and pid_file.is_file():
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
            time.sleep(0.02)

    killer = threading.Thread(target=kill_after_a_committed_checkpoint, daemon=True)
    killer.start()
    res = train(cfg, manifest=data, run_dir=run_dir)
    killer.join(timeout=5)
    assert data.label_names == ["negative", "positive"]
    assert killed, "the worker was never killed"
    assert int(pid_file.read_text()) != killed["pid"], "rank 1 was not replaced"
    h = res.history
    assert [r["step"] for r in h] == list(range(4, 25, 4))
    assert h[-1]["resumed_from"] >= 4 and h[-1]["resumed_from"] % 4 == 0
    assert h[-1]["eval_loss"] < h[0]["eval_loss"]
    assert 0 <= h[-1]["eval_accuracy"] <= 1 and h[-1]["eval_accuracy"] > 0.6


def reloaded_eval_loss(adapter_dir: str, model: Path, manifest) -> float:
    """The eval loss of a saved adapter reloaded onto a fresh base in this process."""
    from pipelines.train.data import Collator, eval_batches, read_manifest, read_split
    from pipelines.train.evaluation import evaluate
    from pipelines.train.objectives import objective_for

    info = read_manifest(manifest)
    rows = read_split(info, "eval")
    collate = Collator(info)
    batches = eval_batches(rows, collate, batch_size=2, rank=0, world=1, max_batches=None)
    pm = peft_core.load_adapter(models.load_model(str(model), info.task), adapter_dir)
    out = evaluate(pm, batches, collate(rows[:1]), objective_for(info), torch.device("cpu"))
    return out["eval_loss"]


def test_saved_adapter_reproduces_reported_eval_loss(ray_cluster, lm, runs_root) -> None:
    """The ZeRO-3 adapter (gathered from shards) evaluates, reloaded, to the reported loss."""
    model, data = lm
    res = run_once("zero3", lm_config(model, zero=ZERO["zero3"]), data, runs_root)
    assert reloaded_eval_loss(res.adapter_dir, model, data) == pytest.approx(
        res.metrics["eval_loss"], abs=1e-4)


# Settings that make a 4-step run on the tiny Llama meaningful; every other registered
# method (including any added later) runs on its defaults.
_METHOD_SETTINGS = {
    "sam": {"budget": 0.05},  # prepare(): mask chosen from data (backward passes)
    "pafi": {"budget": 0.05},
    "diff_pruning": {"budget": 0.05},  # regularizer + finalize
    "prompt_tuning": {"num_virtual_tokens": 4},
    "p_tuning": {"num_virtual_tokens": 4},  # MLP encoder folded into a table by finalize
    "prefix_tuning": {"num_virtual_tokens": 4},  # prefix MLP folded likewise
    "p_tuning_v2": {"num_virtual_tokens": 4},
}
_METHOD_LR = {"full": 1e-3}


def zero3_methods() -> list[str]:
    """The registered methods the ZeRO-3 run below covers: one per module and set of
    overridden ``Method`` hooks (a method whose code and hooks are another's but for
    settings, such as ``moslora`` beside ``lora`` or the three bottleneck adapters, runs
    the same ZeRO-3 paths), so a method in a new module or with a new hook joins with no
    edit. Each run costs ~27 s of Ray Train start-up here; ``PEFTPIPE_ZERO3_ALL_METHODS=1``
    runs every registered method (all passed in the last full run, stop 23)."""
    names = peft_core.available()
    if os.environ.get("PEFTPIPE_ZERO3_ALL_METHODS") == "1":
        return names
    from peft_core.method import Method

    hooks = [h for h, v in vars(Method).items() if callable(v) and not h.startswith("_")]
    seen: dict[tuple, str] = {}
    for name in names:
        cls = peft_core.get(name)
        profile = (cls.__module__, tuple(h for h in hooks
                                         if getattr(cls, h) is not getattr(Method, h)))
        seen.setdefault(profile, name)
    return sorted(seen.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", zero3_methods())
def test_every_method_trains_under_zero3(ray_cluster, lm, tmp_path, name) -> None:
    """Every registered method's code path (see :func:`zero3_methods`), run by its hooks
    (never by name) under ZeRO-3 with 2 workers and everything partitioned (the base model
    built partitioned): the loss falls,
    the saved adapter (after finalize) has no empty tensor, and reloaded onto a fresh
    base it reproduces the reported final eval loss."""
    model, data = lm
    method = {"name": name, **_METHOD_SETTINGS.get(name, {})}
    res = train(lm_config(model, method=method, zero=ZERO["zero3"], max_steps=4, eval_every=4,
                          checkpoint_every=4, lr=_METHOD_LR.get(name, 2e-2)),
                manifest=data, run_dir=tmp_path / "run")
    h = res.history
    assert [r["step"] for r in h] == [0, 4]
    assert h[-1]["eval_loss"] < h[0]["eval_loss"], h
    state = adapter(res)
    assert sum(t.numel() for t in state.values()) > 0
    # A selective method may select nothing in some layer (its index list is then empty);
    # any other empty tensor is a ZeRO-3 shard saved instead of the gathered parameter.
    selective_index = (".sparse_idx", ".sparse_delta")
    empty = {k: tuple(t.shape) for k, t in state.items() if t.numel() == 0}
    if peft_core.get(name).family == "selective":
        empty = {k: v for k, v in empty.items() if not k.endswith(selective_index)}
    assert not empty, empty
    # an encoder-reparameterised method was saved as its folded table
    saved = peft_core.read_adapter_config(res.adapter_dir)
    if name == "p_tuning":  # always trained through its prompt encoder
        assert saved.get("method_state", {}).get("folded") is True, saved
    assert reloaded_eval_loss(res.adapter_dir, model, data) == pytest.approx(
        h[-1]["eval_loss"], abs=1e-4)


def test_bf16_zero3_trains_with_the_base_in_bf16(ray_cluster, lm, tmp_path) -> None:
    """``precision: bf16`` (the GPU setting) runs on CPU too: the base is built partitioned
    in bf16 (half the parameter bytes of fp32), DeepSpeed keeps fp32 masters of the
    adapter, the loss falls, and the saved adapter reloads onto the fp32 base."""
    model, data = lm
    res = train(lm_config(model, zero=ZERO["zero3"], precision="bf16", max_steps=4,
                          eval_every=4, checkpoint_every=4), manifest=data, run_dir=tmp_path / "r")
    h = res.history
    assert h[-1]["precision"] == "bf16"
    assert h[-1]["eval_loss"] < h[0]["eval_loss"] - 0.05, [r["eval_loss"] for r in h]
    ref = run_once("zero3", lm_config(model, zero=ZERO["zero3"]), data, tmp_path / "ref")
    assert h[-1]["param_mem_mb"] < 0.6 * ref.history[-1]["param_mem_mb"]
    state = adapter(res)
    assert state and all(t.numel() > 0 for t in state.values())
    # the identity of a base does not depend on the dtype it was loaded in
    pm = peft_core.load_adapter(models.load_model(str(model), "causal_lm"), res.adapter_dir)
    assert pm.summary()["trainable_params"] == res.metrics["trainable_params"]
