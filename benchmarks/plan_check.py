"""``peftpipe plan`` against measured memory: the planner's per-rank predictions beside the
scale benchmark's measurements, and the measurement of the planner's fixed process overhead.

    python -m benchmarks.plan_check                     # compare with results/scale.json
    python -m benchmarks.plan_check --measure-overhead  # (re)measure the fixed overhead

Comparison: for every run in ``benchmarks/results/scale.json`` (random Llama models saved to
disk, LoRA, ZeRO 0/2/3 x 1/2 workers, fp32, on CPU) the planner is called on the same model
folder and settings and its predicted per-rank peak RSS (``Choice.peak``) and load peak are
set against the measured ``peak_mem_mb`` / ``load_peak_mem_mb``, and its parameter bytes
against ``param_mem_mb``. Target: predicted / measured within 0.8-1.2 at every point.
Writes ``benchmarks/results/plan_check.json``.

Overhead: what a training process holds before any model weight, measured two ways on a
tiny model (so model bytes are negligible): one process importing the whole stack and
running DeepSpeed steps, and real Ray Train workers of the training stage (the number
``pipelines.plan`` uses). Writes ``benchmarks/results/plan_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import RESULTS, table, write_json

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
MB = 2**20
TARGET = 0.20  # |predicted / measured - 1| at most this at every point
#: DeepSpeed 0.19's ZeRO-3 defaults (deepspeed/runtime/zero/config.py)
DS_DEFAULT_ZERO3 = {"max_live_parameters": 1e9, "max_reuse_distance": 1e9,
                    "prefetch_bucket_size": 5e7}


# -- overhead ---------------------------------------------------------------------------------

_SINGLE = r"""
import os, resource, sys, json
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch, transformers, deepspeed, ray, ray.train, ray.train.torch, pyarrow, mlflow  # noqa
import peft_core, pipelines.train  # noqa
from tests import tiny
import torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
dist.init_process_group("gloo")
pm = peft_core.apply(tiny.model("llama"), {"name": "lora", "rank": 8})
engine, *_ = deepspeed.initialize(model=pm, model_parameters=pm.param_groups(1e-3), config={
    "train_batch_size": 4, "train_micro_batch_size_per_gpu": 4,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "zero_optimization": {"stage": 0}}, dist_init_required=False)
b = tiny.batch("llama")
for _ in range(3):
    out = engine(**b); engine.backward(out.loss); engine.step()
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure_overhead(args: argparse.Namespace) -> dict:
    """Peak RSS of processes that hold only a tiny model (~0.1 MB of weights)."""
    root = Path(__file__).resolve().parents[1]
    single = []
    for i in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", _SINGLE, str(29600 + i)], cwd=root,
                             capture_output=True, text=True, timeout=300, check=True)
        single.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"])

    import ray

    from pipelines.train import train
    from tests.pipelines.train_helpers import save_tiny, write_dataset

    ray.init(num_cpus=2, include_dashboard=True, logging_level="ERROR")
    workers = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model = save_tiny("llama", tmp / "model")
            data = write_dataset(tmp / "data")
            for n in (1, 2):
                for stage in (0, 3):
                    res = train({"model": {"name": str(model)},
                                 "method": {"name": "lora", "rank": 8}, "num_workers": n,
                                 "batch_size": 4 * n, "micro_batch_size": 4,
                                 "max_steps": 4, "eval_every": 2, "max_eval_batches": 1,
                                 "zero": {"stage": stage}, "storage_path": str(tmp / "runs")},
                                manifest=data, run_dir=tmp / "runs" / f"w{n}-z{stage}")
                    m = res.metrics
                    workers.append({"workers": n, "zero_stage": stage,
                                    "peak_mem_mb": m["peak_mem_mb"], "rss_mb": m["rss_mb"],
                                    "param_mem_mb": m["param_mem_mb"]})
    finally:
        ray.shutdown()
    print(table([{"process": "single (imports + DeepSpeed steps)", "peak_mem_mb": max(single)}]
                + [{"process": f"Ray Train worker, {w['workers']} worker(s), "
                               f"ZeRO-{w['zero_stage']}",
                    "peak_mem_mb": w["peak_mem_mb"]} for w in workers],
                ["process", "peak_mem_mb"]))
    payload = {"single_process_peak_mb": single, "ray_workers": workers,
               "overhead_mb": max(w["peak_mem_mb"] for w in workers),
               "notes": "tiny Llama (tests/tiny.py, ~0.1 MB of weights): the peaks are the "
                        "process's fixed cost. pipelines.plan.CPU_PROCESS_OVERHEAD_BYTES is the "
                        "largest Ray Train worker peak (the processes the planner plans for)."}
    write_json("plan_overhead", payload)
    return payload


# -- comparison -------------------------------------------------------------------------------

def _model_folder(size: str, config: dict, settings: dict, tmp: Path) -> Path:
    """The scale benchmark's model folder when it is there, else its config written out
    (the planner reads the config only)."""
    from pipelines.models import cache_dir

    folder = cache_dir() / "models" / f"scale-{size}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import LlamaConfig

    # scale.py's llama_config: SmolLM2's vocabulary, tied embeddings, head_dim 64
    out = tmp / f"scale-{size}"
    LlamaConfig(vocab_size=settings.get("vocab", 49152), tie_word_embeddings=True, head_dim=64,
                max_position_embeddings=2048, **config).save_pretrained(out)
    return out


def compare(args: argparse.Namespace) -> dict | None:
    from pipelines import plan as P

    path = Path(args.scale)
    if not path.is_file():
        print(f"{path}: not there yet; run benchmarks/scale.py first (nothing compared)")
        return None
    scale = json.loads(path.read_text())
    settings = scale.get("settings", {})
    method = {"name": "lora", **settings.get("lora", {"rank": 8})}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in scale.get("runs", []):
            if run.get("stack") != "ours" or run.get("error") or not run.get("peak_mem_mb"):
                continue  # the peer stack is not what the planner plans; failed points
            stage, workers = int(run["stage"]), int(run["workers"])
            zero = {"stage": stage}
            if stage == 3:
                zero["param_persistence_threshold"] = 0  # as scale.py runs ZeRO-3
            train = {"model": {"name": str(_model_folder(run["size"], run["config"], settings,
                                                         Path(tmp)))},
                     "method": method, "num_workers": workers, "batch_size": run["batch"],
                     "micro_batch_size": run["micro"], "precision": run["precision"],
                     "zero": zero}
            # Each run with the ZeRO-3 settings it ran with: recorded ones, else DeepSpeed's
            # defaults (runs before our config set any), not whatever the code sets today.
            settings = run.get("zero3_settings") or DS_DEFAULT_ZERO3
            p = P.plan_train(train, max_length=int(run["seq"]), task="causal_lm",
                             zero_settings=settings if stage == 3 else None)
            c = p.choice(stage, "none")
            pred = {"peak_mem_mb": c.peak / MB,
                    "load_peak_mem_mb": (c.overhead + c.load_peak) / MB,
                    "param_mem_mb": (c.base_params + c.trainable_params) / MB}
            row = {"label": run.get("label"), "size": run["size"], "zero": stage,
                   "workers": workers, "zero3_settings": settings if stage == 3 else None}
            worst = 0.0
            for k, v in pred.items():
                meas = run.get(k)
                row[f"{k}_pred"] = round(v, 1)
                row[f"{k}_meas"] = round(meas, 1) if meas else None
                if meas:
                    r = v / float(meas)
                    row[f"{k}_ratio"] = round(r, 3)
                    if k != "param_mem_mb":  # the target is on the peaks
                        worst = max(worst, abs(r - 1))
            row["within_20pct"] = worst <= TARGET
            rows.append(row)
    cols = ["label", "size", "zero", "workers", "peak_mem_mb_pred", "peak_mem_mb_meas",
            "peak_mem_mb_ratio", "load_peak_mem_mb_pred", "load_peak_mem_mb_meas",
            "load_peak_mem_mb_ratio", "param_mem_mb_ratio", "within_20pct"]
    print(table(rows, cols))
    met = bool(rows) and all(r["within_20pct"] for r in rows)
    print(f"target: predicted/measured peak and load peak within {TARGET:.0%} at every point "
          f"({len(rows)} points) -> {'met' if met else 'MISSED'}")
    payload = {"source": (str(path.relative_to(path.parents[2])) if len(path.parents) > 2
                          else str(path)),
               "target": f"|predicted/measured - 1| <= {TARGET} for peak_mem_mb and "
                         "load_peak_mem_mb at every measured point",
               "met": met, "points": len(rows), "rows": rows,
               "overhead_mb": {"stages_0_2": P.CPU_PROCESS_OVERHEAD_BYTES / MB,
                               "stage_3": (P.CPU_PROCESS_OVERHEAD_BYTES +
                                           P.CPU_ZERO3_EXTRA_BYTES) / MB}}
    write_json("plan_check", payload)
    return payload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default=str(RESULTS / "scale.json"))
    ap.add_argument("--measure-overhead", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.measure_overhead:
        measure_overhead(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
