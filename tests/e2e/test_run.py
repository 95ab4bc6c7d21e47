"""`peftpipe run` as a user runs it (a subprocess on a recipe file): the whole job on the real
MiniLM and real movie reviews, made small, then serving from the registered champion; and
bad recipes refused with exit code 2 before anything starts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SMALL = {
    "name": "e2e",
    "model": "builtin:minilm",
    "ray": {"num_cpus": 2},
    "data": {"sources": ["builtin:movie_reviews"], "task": "classification",
             "max_length": 32, "max_rows": 240},
    "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 8, "eval_every": 4,
              "max_eval_batches": 3},
    "tune": {"space": {"methods": {"lora": {"rank": 4, "lr": 2e-3},
                                   "linear_probe": {"lr": 1e-2}}},
             "searcher": "grid", "scheduler": "fifo", "max_concurrent_trials": 2},
    "registry": {"model_name": "e2e-sentiment"},
}


def peftpipe(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "peftpipe", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_recipe(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_run_registers_a_champion_writes_the_report_and_serves(tmp_path) -> None:
    recipe = write_recipe(tmp_path, {**SMALL, "run_dir": str(tmp_path / "runs")})
    # --set reaches any field: the search's step count comes from the command line
    out = peftpipe("run", str(recipe), "--set", "train.max_steps=4", "--set",
                   "train.eval_every=2", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = tmp_path / "runs"
    lines = out.stdout.splitlines()
    assert "leaderboard" in lines
    board = lines[lines.index("leaderboard") + 1:]
    assert board[0].split()[:3] == ["rank", "method", "trainable_params"]
    assert {b.split()[1].split("(")[0] for b in board[1:3]} == {"lora", "linear_probe"}
    assert re.search(r"e2e-sentiment v1 \(test eval_accuracy 0\.\d+\) is the new champion",
                     out.stdout)
    assert "mlflow ui --backend-store-uri sqlite:///" in out.stdout

    trials = json.loads((run_dir / "trials.json").read_text())
    assert len(trials["trials"]) == 2
    assert all(t["metrics"]["step"] == 4 for t in trials["trials"]), trials["trials"]
    report = (run_dir / "report.md").read_text()
    assert "## Leaderboard" in report and "## Champion" in report
    for png in ("quality_vs_params.png", "eval_loss_curves.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "logs" / "peftpipe.log").is_file()

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("e2e-sentiment", "champion").version) == "1"

    served = peftpipe("predict", "--model", "models:/e2e-sentiment@champion", "--run-dir",
                      str(run_dir), "--text", "a wonderful, moving film", cwd=tmp_path)
    assert served.returncode == 0, served.stderr[-3000:]
    row = json.loads(served.stdout.strip().splitlines()[-1])
    assert row["label"] in ("negative", "positive")

    # the stages alone, on what the run left: the same adapter again is no better
    again = peftpipe("promote", str(recipe), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "e2e-sentiment v2 kept as candidate" in again.stdout
    (run_dir / "report.md").unlink()
    rep = peftpipe("report", str(recipe), cwd=tmp_path)
    assert rep.returncode == 0 and (run_dir / "report.md").is_file(), rep.stderr[-3000:]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trian": {}}, "trian: unknown field; expected one of"),
        ({"train": {**SMALL["train"], "max_steps": "many"}},
         "train.max_steps: Input should be a valid integer"),
        ({"data": {**SMALL["data"], "sources": ["no/such/file.jsonl"]}},
         "data.sources.0: path does not exist"),
        ({"tune": {**SMALL["tune"], "space": {"methods": {"lorra": {}}}}},
         "unknown method 'lorra'"),
        ({"train": {**SMALL["train"], "cpus_per_worker": 2}},
         "tune.max_concurrent_trials x train.num_workers x train.cpus_per_worker needs 4 CPUs"),
        ({"model": "./no-such-model"}, "model: path does not exist"),
        ({"tune": {**SMALL["tune"], "space": {"methods": {"lora": {"rank": [4, 0]}}}}},
         "tune.space.methods.lora.rank: expected an integer > 0, got 0"),
    ],
    ids=["unknown-key", "wrong-type", "missing-path", "unknown-method", "impossible-resources",
         "missing-model", "bad-hyperparameter"],
)
def test_bad_recipe_exits_2_with_one_clear_message_and_starts_nothing(tmp_path, change, message
                                                                       ) -> None:
    run_dir = tmp_path / "runs"
    recipe = write_recipe(tmp_path, {**SMALL, "run_dir": str(run_dir), **change})
    out = peftpipe("run", str(recipe), cwd=tmp_path, timeout=120)
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-2000:])
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (run_dir / "data").exists() and not (run_dir / "mlflow.db").exists()


def test_bad_override_and_missing_recipe_exit_2(tmp_path) -> None:
    recipe = write_recipe(tmp_path, {**SMALL, "run_dir": str(tmp_path / "runs")})
    out = peftpipe("run", str(recipe), "--set", "train.lr", cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "expected key.path=value" in out.stderr, out.stderr
    out = peftpipe("run", str(tmp_path / "nope.yaml"), cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "no such file" in out.stderr, out.stderr
    assert "demo" in out.stderr  # the built-in recipes are named
