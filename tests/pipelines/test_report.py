"""The report: leaderboard order, budget marks, Markdown and real PNG plots."""

from __future__ import annotations

from pipelines.report import leaderboard, method_label, write_report
from pipelines.tune.objective import Objective

TRIALS = [
    {"trial_id": "t1", "method": {"name": "lora", "rank": 8, "alpha": 16.0}, "lr": 1e-3,
     "metrics": {"eval_accuracy": 0.81, "eval_loss": 0.45, "trainable_params": 3000,
                 "trainable_fraction": 0.013, "step": 40},
     "history": {"eval_loss": [(10, 0.69), (20, 0.55), (40, 0.45)]}, "time_s": 30.0},
    {"trial_id": "t2", "method": {"name": "full"}, "lr": 1e-4,
     "metrics": {"eval_accuracy": 0.83, "eval_loss": 0.41, "trainable_params": 220000,
                 "trainable_fraction": 1.0, "step": 40},
     "history": {"eval_loss": [(10, 0.6), (20, 0.5), (40, 0.41)]}, "time_s": 60.0},
    {"trial_id": "t3", "method": {"name": "linear_probe"}, "lr": 1e-2,
     "metrics": {"eval_accuracy": 0.62, "eval_loss": 0.66, "trainable_params": 770,
                 "trainable_fraction": 0.0034, "step": 10},
     "history": {"eval_loss": [(10, 0.66)]}, "time_s": 8.0, "status": "stopped early"},
]


def test_leaderboard_orders_and_marks_budget() -> None:
    rows = leaderboard(TRIALS, Objective(max_trainable_fraction=0.05))
    assert [r["trial"] for r in rows] == ["t2", "t1", "t3"]
    assert [r["within_budget"] for r in rows] == [False, True, True]
    assert method_label(TRIALS[0]["method"]) == "lora(alpha=16.0, rank=8)"


def test_report_files(tmp_path) -> None:
    md = write_report(TRIALS, Objective(max_trainable_fraction=0.05), tmp_path,
                      champion={"model": "demo", "version": "1", "method": "lora"})
    text = md.read_text()
    assert "| rank | trial | method |" in text and "lora(alpha=16.0, rank=8)" in text
    assert "## Champion" in text and "quality_vs_params.png" in text
    for name in ("quality_vs_params.png", "eval_loss_curves.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
