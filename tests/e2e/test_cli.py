"""The CLI as a user runs it (subprocess): exit codes and outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import peft_core
from pipelines import models

pytestmark = pytest.mark.timeout(300)


def peftpipe(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "peftpipe", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def test_methods_lists_every_registered_method(tmp_path) -> None:
    out = peftpipe("methods", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [r["method"] for r in json.loads(out.stdout)] == peft_core.available()


def test_predict_from_adapter_folder(tmp_path) -> None:
    torch.manual_seed(0)
    pm = peft_core.apply(models.load_model("builtin:minilm", "classification", num_labels=2),
                         {"name": "lora", "rank": 4})
    pm.save(tmp_path / "a", pipeline={"model": "builtin:minilm", "task": "classification",
                                      "label_names": ["negative", "positive"]})
    out = peftpipe("predict", "--model", str(tmp_path / "a"), "--text", "great film",
                   "--text", "awful", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["text"] for r in rows] == ["great film", "awful"]
    assert all(r["label"] in ("negative", "positive") for r in rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rollback", "nosuch"], "has no champion"),
        (["promote", "--dataset", "x"], "exactly one of --run-id or --search-id"),
        (["promote", "--dataset", "x", "--run-id", "r", "--mode", "up"], "mode"),
        (["predict", "--model", "missing-folder", "--text", "hi"],
         "neither a models:/ URI nor a folder"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(args, message, tmp_path) -> None:
    out = peftpipe(*args, "--run-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("command", ["run", "tune", "train"])
def test_a_bad_failure_setting_exits_2_naming_the_field(command, tmp_path) -> None:
    """run, tune and train refuse a bad recipe the same way, before Ray starts."""
    out = peftpipe(command, "demo", "--set", "tune.max_trial_failures=-1", cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "tune.max_trial_failures" in out.stderr and "Traceback" not in out.stderr


def test_mlflow_hint_opens_a_server_and_starts_a_ui_on_a_local_store() -> None:
    from pipelines.cli import _mlflow_hint

    assert _mlflow_hint("http://127.0.0.1:5000") == \
        "open http://127.0.0.1:5000 (the tracking server's UI)"
    assert _mlflow_hint("sqlite:////r/mlflow.db") == \
        "mlflow ui --backend-store-uri sqlite:////r/mlflow.db"
