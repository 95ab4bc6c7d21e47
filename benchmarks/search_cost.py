"""The cost of a search: where its trials' time goes, phase by phase.

Runs the demo recipe's search (MiniLM, movie-review sentiment, 2 trials at a time) through
the pipeline's own stages (data, then the Ray Tune search) and reads every trial's
``phase_<name>_s`` timings (see :data:`pipelines.train.metrics.PHASES`) back from its last
report: per trial the time from its start to its first training step, the share of its
wall time spent in training steps, and the search's time split by phase.

    python -m benchmarks.search_cost [--quick] [--label NAME] [--steps N] [--methods a,b]
    python -m benchmarks.search_cost --search lora-smollm2 [--pack K] --label NAME

``--quick``: 2 of the demo's methods (lora, pafi), 20 steps, reports every 10, into
``benchmarks/results/search_cost_quick.json``; without it the demo as it ships (4 methods,
150 steps) into ``search_cost.json``. Each run is stored under ``--label`` (e.g. ``before``,
``after``), so one file holds the runs to compare.

``--search lora-smollm2``: a LoRA rank x learning-rate grid of 8 trials (ranks 4, 8, 16,
32 x lr 3e-4, 1e-3) on SmolLM2-135M and the chatterbot Q/A pairs (the ``qa_smollm2``
recipe's data and training, 20 steps), 2 trials at a time, FIFO (ASHA's stops depend on
the order reports arrive in, which packing changes, so rankings are compared without
them); ``--pack K`` runs it with ``tune.pack: K``. Into ``search_cost_lora.json``.

Targets (issue 22): a MiniLM trial's start to its first step <= 10 s; training steps >=
80% of the trials' wall time in the demo search; the packed 8-trial search's wall time
<= 0.6x the unpacked one's, its parameter memory per worker <= 1/K of K separate trials'
plus the adapters, and the same ranking of the trials in every variant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, table, write_json

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUICK_METHODS = ("lora", "pafi")
START_TARGET_S = 10.0
STEPS_SHARE_TARGET = 0.80
PACKED_WALL_TARGET = 0.6
LORA_GRID = {"methods": {"lora": {"rank": [4, 8, 16, 32], "alpha": 16}}, "lr": [3e-4, 1e-3]}
LORA_STEPS = 20


def recipe_for(args: argparse.Namespace, run_dir: Path):
    from pipelines.recipe import builtin_recipe, load_recipe, read_recipe_file

    if args.search == "lora-smollm2":
        data = read_recipe_file(builtin_recipe("qa_smollm2"))
        data["tune"].update(space=LORA_GRID, scheduler="fifo", pack=args.pack or 1)
        steps = args.steps or LORA_STEPS
        return load_recipe(data=data, overrides=[
            f"run_dir={run_dir}", f"train.max_steps={steps}",
            f"train.eval_every={max(1, steps // 2)}", "train.max_eval_batches=5"])
    data = read_recipe_file(builtin_recipe("demo"))
    if args.pack:
        data["tune"]["pack"] = args.pack
    methods = data["tune"]["space"]["methods"]
    keep = args.methods.split(",") if args.methods else (QUICK_METHODS if args.quick else None)
    if keep:
        data["tune"]["space"]["methods"] = {m: methods[m] for m in keep}
    overrides = [f"run_dir={run_dir}"]
    steps = args.steps or (20 if args.quick else None)
    if steps:
        overrides += [f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 2)}"]
    return load_recipe(data=data, overrides=overrides)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.pipeline import prepare_stage, ray_session, tune_stage

    if args.from_run:
        # a search that already ran (e.g. `make demo`'s runs/demo): its trials.json and the
        # wall time from its first trial's start to its last trial's end
        from pipelines.tune.result import SearchResult

        recipe = recipe_for(args, Path(args.from_run))
        search = SearchResult.load(Path(args.from_run) / "trials.json")
        wall = float(args.wall_s) if args.wall_s else math.nan
        return summarise(args, recipe, search, wall)
    with tempfile.TemporaryDirectory(prefix="search-cost-") as tmp:
        recipe = recipe_for(args, Path(tmp) / "run")
        with ray_session(recipe, stage="tune"):
            manifest = prepare_stage(recipe)
            t0 = time.perf_counter()
            search = tune_stage(recipe, manifest, verbose=False)
            wall = time.perf_counter() - t0
            if args.timeline:
                import ray

                # Ray's own trace of every task and actor call (chrome://tracing): what
                # the start-up phases are made of
                ray.timeline(filename=args.timeline)
    return summarise(args, recipe, search, wall)


def summarise(args: argparse.Namespace, recipe: Any, search: Any, wall: float
              ) -> dict[str, Any]:
    from pipelines.report import phase_split
    from pipelines.train.metrics import PHASES, phase_key

    before_steps = PHASES[:PHASES.index("steps")]
    trials = []
    for t in search.trials:
        m = t["metrics"]
        phases = {p: round(float(m.get(phase_key(p), 0.0)), 3) for p in PHASES}
        time_s = float(t["time_s"] or 0.0)
        trials.append({
            "trial": t["trial_id"], "method": t["method"]["name"], "status": t["status"],
            "rank": t["method"].get("rank"), "lr": t["lr"], "pack": m.get("pack"),
            "steps": m.get("step"), "time_s": round(time_s, 2),
            "start_to_first_step_s": round(sum(phases[p] for p in before_steps), 2),
            "steps_share": round(phases["steps"] / time_s, 3) if time_s else None,
            "accounted": round(sum(phases.values()) / time_s, 3) if time_s else None,
            "eval_accuracy": m.get("eval_accuracy"), "eval_loss": m.get("eval_loss"),
            "param_mem_mb": m.get("param_mem_mb"), "peak_mem_mb": m.get("peak_mem_mb"),
            "trainable_params": m.get("trainable_params"),
            "load_peak_mem_mb": m.get("load_peak_mem_mb"), "phases": phases,
        })
    split = [{**r, "seconds": round(r["seconds"], 2)} for r in phase_split(search.trials)]
    # a pack's members share its wall time and phases: each unit (a trial or a pack) once
    units = list({t["pack"] or t["trial"]: t for t in trials}.values())
    total = sum(t["time_s"] for t in units)
    steps_total = sum(t["phases"]["steps"] for t in units)
    metric, mode = recipe.tune.objective.metric, recipe.tune.objective.mode
    ranked = sorted((t for t in trials if t.get(metric) is not None),
                    key=lambda t: t[metric], reverse=mode == "max")
    return {
        "recipe": args.search, "pack": recipe.tune.pack, "metric": metric,
        "leaderboard": [f"{t['method']} r{t['rank']} lr {t['lr']:g}" if t["rank"]
                        else t["method"] for t in ranked],
        "units": len(units),
        "param_mem_mb_per_worker": max(t["param_mem_mb"] or 0 for t in units),
        "peak_mem_mb_per_worker": max(t["peak_mem_mb"] or 0 for t in units),
        "quick": args.quick, "steps": recipe.train.max_steps,
        "methods": [t["method"] for t in trials],
        "max_concurrent_trials": recipe.tune.max_concurrent_trials,
        "search_wall_s": round(wall, 1), "trials": trials, "split": split,
        "max_start_to_first_step_s": max(t["start_to_first_step_s"] for t in units),
        "steps_share": round(steps_total / total, 3) if total else None,
        "env": {k: os.environ[k] for k in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                                         "RAY_preload_python_modules")
                if k in os.environ},
    }


def show(label: str, res: dict[str, Any]) -> None:
    print(f"\n== {label}: {res['recipe']} search, {len(res['trials'])} trials x "
          f"{res['steps']} steps, pack {res['pack']}, {res['max_concurrent_trials']} at a "
          f"time, wall {res['search_wall_s']} s")
    print(table(res["trials"], ["trial", "method", "rank", "lr", "pack", "status", "time_s",
                                "start_to_first_step_s", "steps_share", "accounted",
                                res["metric"], "param_mem_mb", "peak_mem_mb"]))
    print("\nleaderboard: " + " > ".join(res["leaderboard"]))
    print()
    print(table(res["split"], ["phase", "seconds", "share"]))
    start, share = res["max_start_to_first_step_s"], res["steps_share"]
    print(f"\nstart to first step (slowest trial): {start} s "
          f"(target <= {START_TARGET_S:g} s: {'met' if start <= START_TARGET_S else 'missed'})")
    print(f"training steps' share of the trials' wall time: {share} "
          f"(target >= {STEPS_SHARE_TARGET:.0%}: "
          f"{'met' if share and share >= STEPS_SHARE_TARGET else 'missed'})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--label", default="current")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--methods", default=None, help="comma-separated subset of the demo's")
    ap.add_argument("--timeline", default=None, help="write ray.timeline() there (JSON)")
    ap.add_argument("--search", choices=("demo", "lora-smollm2"), default="demo")
    ap.add_argument("--pack", type=int, default=None, help="tune.pack for the search")
    ap.add_argument("--from-run", default=None,
                    help="summarise the search this run folder holds instead of running one")
    ap.add_argument("--wall-s", default=None, help="with --from-run: its search's wall time")
    args = ap.parse_args(argv)
    res = run(args)
    show(args.label, res)
    name = ("search_cost_lora" if args.search == "lora-smollm2"
            else "search_cost_quick" if args.quick else "search_cost")
    path = RESULTS / f"{name}.json"
    runs = json.loads(path.read_text()).get("runs", {}) if path.exists() else {}
    runs[args.label] = {**res, "command": "python -m benchmarks.search_cost"
                        + (" --quick" if args.quick else "")
                        + (f" --search {args.search}" if args.search != "demo" else "")
                        + (f" --pack {args.pack}" if args.pack else "")
                        + (f" --from-run {args.from_run}" if args.from_run else "")
                        + f" --label {args.label}"}
    print(f"\nwrote {write_json(name, {'runs': runs})}")


if __name__ == "__main__":
    main()
