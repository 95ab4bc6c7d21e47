"""``pipelines.plan`` / ``peftpipe plan``: counts and activations from a config alone (meta
device) against the real model, the ZeRO accounting, the shipped 8B/70B examples, and the
bad-input contract of the command (exit 2 naming the field). No Ray; about 40 s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import peft_core
from pipelines import plan as P
from pipelines.cli import app
from pipelines.plan.activations import live_tensors, saved_tensors
from tests import tiny

CONFIGS = Path(P.__file__).parents[1] / "recipes" / "model_configs"
GB = 10**9


def config_folder(arch: str, root: Path) -> Path:
    """A folder with only tiny.model(arch)'s config.json: no weights to read."""
    folder = root / f"{arch}-config"
    tiny.model(arch).config.save_pretrained(folder)
    assert not any(folder.glob("*.safetensors"))
    return folder


def train_cfg(model: Path | str, method: dict | None = None, **over) -> dict:
    return {"model": {"name": str(model)}, "method": method or {"name": "lora", "rank": 4},
            "num_workers": 2, "batch_size": 4, "micro_batch_size": 2, **over}


def real_counts(arch: str, method: dict) -> tuple[int, int]:
    """(base parameters, trainable parameters once training runs) on the real tiny model."""
    base = sum(p.numel() for p in tiny.model(arch).parameters())
    pm = peft_core.apply(tiny.model(arch), method)
    formula = getattr(pm.method, "expected_trainable_params", None)
    return base, formula(pm.base_model) if formula else pm.summary()["trainable_params"]


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("name", peft_core.available())
def test_counts_from_the_config_equal_the_real_model(arch, name, tmp_path) -> None:
    method = {"name": name}
    task = "classification" if arch == "bert" else "causal_lm"
    desc, _ = P.describe_model(str(config_folder(arch, tmp_path)), method, task=task, micro=2,
                               seq=8, precision="fp32")
    base, trainable = real_counts(arch, method)
    assert desc.base_params == base
    # SAM and PaFi choose their entries from weight values: their documented count is used
    assert desc.trainable == trainable


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_activations_are_exactly_what_the_real_model_saves(arch, tmp_path) -> None:
    """The meta forward's saved tensors (with the flash-style attention stand-in) equal, byte
    for byte and block by block, what autograd saves in the real model on CPU (SDPA)."""
    task = "classification" if arch == "bert" else "causal_lm"
    method = {"name": "lora", "rank": 4}
    for micro, seq in ((2, 12), (4, 48)):
        desc, _ = P.describe_model(str(config_folder(arch, tmp_path)), method, task=task,
                                   micro=micro, seq=seq, precision="fp32")
        pm = peft_core.apply(tiny.model(arch), method)
        pm.train()
        ids = torch.randint(3, tiny.VOCAB, (micro, seq))
        labels = torch.randint(0, 2, (micro,)) if arch == "bert" else ids
        with saved_tensors(pm.base_model) as saved:
            pm(input_ids=ids, labels=labels)
        assert desc.activations.per_block == tuple(saved["per_block"])
        assert desc.activations.saved == saved["outside"] + sum(saved["per_block"])
        assert sum(desc.activations.per_block) > 0


def _wider(arch: str):
    """tiny.model's architecture, wide enough that activations dominate the step."""
    cfg = tiny.model(arch).config
    cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size = 128, 256, 2000
    torch.manual_seed(0)
    return type(tiny.model(arch))(cfg)


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", ["lora", "full", "adapter_houlsby"])
def test_activation_peak_matches_a_real_step(arch, checkpointing, name, tmp_path) -> None:
    """The peak of live tensors over a real CPU training step (forward, loss, backward),
    counted op by op, against the meta-device prediction."""
    task = "classification" if arch == "bert" else "causal_lm"
    model = _wider(arch)
    model.config.save_pretrained(tmp_path / "cfg")
    desc, _ = P.describe_model(str(tmp_path / "cfg"), {"name": name}, task=task, micro=4, seq=32,
                               precision="fp32", gradient_checkpointing=checkpointing)
    pm = peft_core.apply(model, {"name": name})
    pm.train()
    if checkpointing:
        pm.enable_gradient_checkpointing()
    ids = torch.randint(3, tiny.VOCAB, (4, 32))
    labels = torch.randint(0, 2, (4,)) if arch == "bert" else ids
    with live_tensors([*pm.parameters(), *pm.buffers()]) as live:
        out = pm(input_ids=ids, labels=labels)
        forward_end = live["now"]
        out.loss.backward()
        del out
    real = max(live["peak"] - 4 * desc.trainable, forward_end)
    # Llama: equal up to 5 % (full fine-tuning, whose gradients overlap the peak). BERT: the
    # meta step over-counts by up to 25 % (on the safe side; the cause, somewhere in its
    # attention/dropout path, is not tracked down).
    assert 0.99 <= desc.activations.peak / real <= (1.05 if arch == "llama" else 1.30)


def test_zero_accounting(tmp_path) -> None:
    folder = config_folder("llama", tmp_path)
    p = P.plan_train(train_cfg(folder, zero={"stage": 3, "param_persistence_threshold": 0}),
                     max_length=12, gpus=2, gpu_mem_bytes=GB)
    z0, z3 = p.choice(0), p.choice(3)
    assert p.world_size == 2 and p.precision == "bf16"  # auto on GPUs
    # ZeRO-3 halves parameters over 2 ranks (rounded up per tensor) and partitions Adam
    assert (abs(z3.base_params - z0.base_params / 2)
            <= 2 * len(list(tiny.model("llama").parameters())))
    assert z3.optimizer_states < z0.optimizer_states
    assert p.choice(2).gradients < p.choice(1).gradients
    off = p.choice(3, "optimizer+param")
    assert off.base_params == 0 and off.optimizer_states == 0 and off.host > 0
    assert p.recipe_choice == (3, "none")
    # bf16 mixed precision: fp32 master + two moments (12 bytes) per trainable parameter
    assert z0.optimizer_states == 12 * p.trainable_params
    fp32 = P.plan_train(train_cfg(folder, precision="fp32"), max_length=12, gpus=1,
                        gpu_mem_bytes=GB).choice(0)
    assert fp32.optimizer_states == 8 * p.trainable_params  # moments only: the weights are fp32
    assert fp32.base_params == 2 * z0.base_params


def test_cpu_plan_uses_the_recipes_workers(tmp_path) -> None:
    folder = config_folder("llama", tmp_path)
    p = P.plan_train(train_cfg(folder, gradient_checkpointing=True), max_length=12,
                     gpu_mem_bytes=2 * GB)
    assert (p.device, p.world_size, p.precision) == ("cpu", 2, "fp32")
    c = p.choice(0)
    assert c.overhead == P.CPU_PROCESS_OVERHEAD_BYTES and c.heap_retained > 0
    assert c.load_peak == 4 * p.total_params  # every rank of stage 0 loads the whole model
    assert all(c.fits for c in p.choices)  # a tiny model in 2 GB
    # offload on CPU moves bytes within the same RAM: no saving is planned
    assert p.choice(3, "optimizer+param").peak == p.choice(3).peak
    assert p.choice(2, "optimizer").host == 0
    long = P.plan_train(train_cfg(folder, gradient_checkpointing=False), max_length=48,
                        gpu_mem_bytes=2 * GB)
    assert long.choice(0).activations > c.activations


def test_llama_8b_and_70b_on_80gb_gpus() -> None:
    """Public figures: 8B in bf16 is ~16 GB of weights, 70B ~140 GB: ZeRO-0 cannot hold 70B
    on an 80 GB GPU, ZeRO-3 over 8 GPUs can."""
    lora = {"name": "lora", "rank": 16}
    eight = P.plan_train(train_cfg(CONFIGS / "llama-3-8b", lora, precision="bf16",
                                   gradient_checkpointing=True, micro_batch_size=1, batch_size=2),
                         max_length=1024, gpus=8, gpu_mem_bytes=80 * GB)
    assert 7.9e9 < eight.base_params < 8.1e9
    assert eight.choice(0).base_params == pytest.approx(16.06 * GB, rel=0.01)
    assert eight.choice(0).fits
    seventy = P.plan_train(train_cfg(CONFIGS / "llama-3-70b", lora, precision="bf16",
                                     gradient_checkpointing=True, micro_batch_size=1,
                                     batch_size=8, num_workers=8),
                           max_length=1024, gpus=8, gpu_mem_bytes=80 * GB)
    assert 70.0e9 < seventy.base_params < 71.0e9
    assert seventy.choice(0).base_params == pytest.approx(141 * GB, rel=0.01)
    assert not any(c.fits for c in seventy.choices if c.stage < 3)
    assert seventy.choice(3).fits and seventy.choice(3).base_params < 18 * GB


# -- the command ------------------------------------------------------------------------------

@pytest.fixture()
def recipe(tmp_path) -> Path:
    folder = config_folder("llama", tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "plan-test", "model": str(folder),
        "data": {"sources": ["not-read.jsonl"], "task": "causal_lm", "max_length": 12},
        "train": {"num_workers": 2, "batch_size": 4, "micro_batch_size": 2}}))
    return path


def test_plan_command_table_and_json(recipe) -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["plan", str(recipe), "--gpus", "2", "--gpu-mem", "1GB"])
    assert out.exit_code == 0, out.output
    assert "optimizer+param" in out.output and "fits" in out.output
    out = runner.invoke(app, ["plan", str(recipe), "--json", "--set", "train.zero.stage=2"])
    assert out.exit_code == 0, out.output
    d = json.loads(out.stdout)
    assert d["device"] == "cpu" and d["world_size"] == 2 and d["recipe_choice"] == [2, "none"]
    assert len(d["choices"]) == 8 and all("peak" in c for c in d["choices"])


def test_plan_of_a_packed_search_says_what_the_pack_adds(recipe) -> None:
    data = yaml.safe_load(recipe.read_text())
    data["tune"] = {"space": {"methods": {"lora": {"rank": [4, 8]}}}, "pack": 2}
    recipe.write_text(yaml.safe_dump(data))
    out = CliRunner().invoke(app, ["plan", str(recipe)])
    assert out.exit_code == 0, out.output
    assert "note: tune.pack 2: this plan is one trial's" in out.output


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--set", "model=/no/such/folder"], "model:"),
        (["--set", "model=no-such-org/no-such-model"], "model:"),
        (["--gpus", "8", "--gpu-mem", "0GB"], "--gpu-mem:"),
        (["--gpus", "8", "--gpu-mem=-80GB"], "--gpu-mem:"),
        (["--gpus", "8", "--gpu-mem", "80XB"], "--gpu-mem:"),
        (["--gpus", "8", "--gpu-mem", "80"], "--gpu-mem:"),
        (["--gpus", "8"], "--gpu-mem:"),
        (["--gpus", "0", "--gpu-mem", "80GB"], "--gpus:"),
        (["--gpus", "3", "--nodes", "2", "--gpu-mem", "80GB"], "--gpus:"),
        (["--gpus", "16", "--gpu-mem", "80GB"], "--gpus:"),
        (["--gpus", "8", "--nodes", "0", "--gpu-mem", "80GB"], "--nodes:"),
        (["--nodes", "2"], "--nodes:"),
        (["--set", "train.micro_batch_size=0"], "train.micro_batch_size"),
        (["--set", "train.method={name: lora, target_modules: [no_such_proj]}"], "train.method:"),
    ],
)
def test_bad_input_exits_2_naming_the_field(recipe, args, field) -> None:
    out = CliRunner().invoke(app, ["plan", str(recipe), *args])
    assert out.exit_code == 2, out.output
    assert f"error: {field}" in out.stderr or (field in out.stderr and "error:" in out.stderr), \
        out.stderr
    assert "Traceback" not in out.output


def test_subprocess_exit_code_and_one_line(recipe, tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "plan", str(recipe),
                          "--gpus", "3", "--nodes", "2", "--gpu-mem", "80GB"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "error: --gpus: 3 GPUs cannot be split evenly over 2 nodes" in out.stderr
    assert "Traceback" not in out.stderr
