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
    # only what differs from the method's defaults (rank 8, alpha 16)
    assert method_label(TRIALS[0]["method"]) == "lora"
    label = method_label({"name": "lora", "rank": 4, "alpha": 16.0, "dropout": 0.0})
    assert label == "lora(rank=4)"


def test_report_files(tmp_path) -> None:
    md = write_report(TRIALS, Objective(max_trainable_fraction=0.05), tmp_path,
                      champion={"model": "demo", "version": "1", "method": "lora"})
    text = md.read_text()
    assert "| rank | trial | method |" in text and "| t1 | lora |" in text
    assert "## Champion" in text and "quality_vs_params.png" in text
    for name in ("quality_vs_params.png", "eval_loss_curves.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_reference_rows_flag_trials_that_do_not_beat_them(tmp_path) -> None:
    from types import SimpleNamespace

    from pipelines.report import console_table, reference

    # eval split 65% one class: t3 (0.62) does not beat always answering 'positive'
    m = SimpleNamespace(label_counts={"eval": {"negative": 35, "positive": 65}})
    ref = reference(m, TRIALS, Objective())
    assert ref == {"name": "majority class 'positive'", "metric": "eval_accuracy", "value": 0.65}
    rows = leaderboard(TRIALS, Objective(), ref)
    assert [r["beats_reference"] for r in rows] == [True, True, False]
    lines = console_table(TRIALS, Objective(), ref)
    assert lines[0].split() == ["rank", "method", "trainable_params", "trainable_pct",
                                "eval_accuracy", "eval_loss", "time_s", "status", "beats_reference"]
    assert lines[-2].startswith("ref ") and "majority class 'positive'" in lines[-2]
    assert "no better than the majority class 'positive'" in lines[-1]
    text = write_report(TRIALS, Objective(), tmp_path, ref=ref,
                        label_names=["negative", "positive"]).read_text()
    assert "Reference: the majority class 'positive' scores eval_accuracy 0.65" in text
    assert "| ref | – | majority class 'positive' |" in text and "`negative`, `positive`" in text


def test_lm_reference_is_the_untrained_eval_loss_and_no_repeated_column() -> None:
    from pipelines.report import console_table, reference

    lm = [dict(TRIALS[0], history={"eval_loss": [(0, 0.70), (40, 0.45)]}),
          dict(TRIALS[1], metrics={**TRIALS[1]["metrics"], "eval_loss": 0.9})]
    obj = Objective(metric="eval_loss", mode="min")
    ref = reference(None, lm, obj)  # LoRA starts as the identity: step 0 is the base model
    assert ref == {"name": "untrained model", "metric": "eval_loss", "value": 0.70}
    lines = console_table(lm, obj, ref)
    assert lines[0].split().count("eval_loss") == 1
    assert [line.split()[-1] for line in lines[1:3]] == ["yes", "no"]
    # prompt tuning does not start as the base model: its step 0 is no reference
    assert reference(None, [dict(lm[0], method={"name": "prompt_tuning"})], obj) is None


def test_classification_reports_show_ece_and_nll_per_method(tmp_path) -> None:
    from pipelines.report import console_table

    calibrated = [
        dict(TRIALS[0], metrics={**TRIALS[0]["metrics"], "eval_ece": 0.12, "eval_nll": 0.45}),
        dict(TRIALS[1], method={"name": "laplace_lora"},
             metrics={**TRIALS[1]["metrics"], "eval_ece": 0.031, "eval_nll": 0.39,
                      "laplace_predictive": 1.0, "eval_map_nll": 0.52}),
        TRIALS[2],  # no calibration scores (an older run): shown as missing, not as 0
    ]
    rows = leaderboard(calibrated, Objective())
    by_trial = {r["trial"]: r for r in rows}
    assert by_trial["t2"]["eval_ece"] == 0.031 and by_trial["t2"]["predictive"] == "laplace"
    assert by_trial["t1"]["eval_nll"] == 0.45 and by_trial["t1"]["predictive"] == "softmax"
    assert by_trial["t3"]["eval_ece"] is None and by_trial["t3"]["predictive"] is None
    # the console keeps its columns (the README shows them line for line)
    assert "eval_ece" not in console_table(calibrated, Objective())[0]
    text = write_report(calibrated, Objective(), tmp_path).read_text()
    assert "| eval_nll | eval_ece | predictive |" in text
    assert "| 0.39 | 0.031 | laplace |" in text
    # an LM run (no calibration scores anywhere) keeps its columns as before
    assert "eval_ece" not in leaderboard(TRIALS, Objective())[0]


def test_time_split_by_phase(tmp_path) -> None:
    from pipelines.report import phase_split

    phased = [
        dict(TRIALS[0], metrics={**TRIALS[0]["metrics"], "phase_worker_start_s": 6.0,
                                 "phase_steps_s": 20.0, "phase_eval_s": 2.0}),  # 30 s wall
        dict(TRIALS[1], metrics={**TRIALS[1]["metrics"], "phase_worker_start_s": 8.0,
                                 "phase_steps_s": 50.0, "phase_eval_s": 1.0}),  # 60 s wall
        TRIALS[2],  # no phases (an older run): its 8 s are unmeasured
    ]
    rows = phase_split(phased)
    assert [r["phase"] for r in rows] == ["worker_start", "steps", "eval", "unmeasured"]
    assert [r["seconds"] for r in rows] == [14.0, 70.0, 3.0, 11.0]
    assert [r["share"] for r in rows] == ["14.3%", "71.4%", "3.1%", "11.2%"]
    assert phase_split(TRIALS) == []
    text = write_report(phased, Objective(), tmp_path).read_text()
    assert "## Where the time went" in text and "| phase | seconds | share |" in text
    assert "| steps | 70 | 71.4% |" in text and "| unmeasured | 11 | 11.2% |" in text
    assert "## Where the time went" not in write_report(TRIALS, Objective(), tmp_path).read_text()


def test_a_packs_members_share_its_phases_counted_once() -> None:
    from pipelines.report import phase_split

    pack = {"phase_steps_s": 20.0, "phase_eval_s": 4.0, "pack": "p0"}
    members = [dict(TRIALS[i], time_s=25.0, metrics={**TRIALS[i]["metrics"], **pack})
               for i in (0, 1)]
    rows = phase_split(members)
    assert {r["phase"]: r["seconds"] for r in rows} == {"steps": 20.0, "eval": 4.0,
                                                        "unmeasured": 1.0}
