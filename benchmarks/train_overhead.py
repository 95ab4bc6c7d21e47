"""What Ray Train + DeepSpeed cost per step, and what ZeRO-3 saves per worker.

1. Overhead: the same model, method, data and steps, trained by a plain single-process
   PyTorch loop (torch AdamW, gradient clipping, same batches) and by the training stage
   with one Ray Train worker under DeepSpeed ZeRO-0. Step times exclude evaluation and
   checkpoints; the first ``--warmup`` steps are dropped; each run gives the median of its
   remaining per-step times (the stage reports every step for this, with a one-batch eval
   outside the timed step), so a burst of load from another process on a shared machine
   moves neither side much. Runs are interleaved, plain first and last
   (``--rounds`` Ray runs between ``--rounds + 1`` plain ones), so slow drifts are seen by
   both; the ratio is the mean of the Ray medians over the mean of the plain medians.
   Target: ratio <= 1.15.
2. Memory: 2 workers under ZeRO-0 and ZeRO-3 on the same model; per-worker parameter bytes
   resident after DeepSpeed's setup (the ZeRO-3 partition, ``ds_tensor``), current and peak
   RSS. Target: ZeRO-3 parameter memory about half of ZeRO-0's.

    python -m benchmarks.train_overhead [--model builtin:smollm2 --steps 20 --warmup 5 --rounds 2]

Writes ``benchmarks/results/train_overhead.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._common import table, write_json

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def dataset(args: argparse.Namespace, root: Path):
    from pipelines.data import DataConfig, builtin, prepare

    src = builtin.chatterbot_qa(root / "src")
    return prepare(DataConfig(sources=[str(src)], task="instruction", tokenizer=args.model,
                              max_length=args.seq, max_rows=args.rows,
                              data_root=str(root / "data")))


def train_config(args: argparse.Namespace, **over):
    from pipelines.train import TrainConfig

    base = dict(model={"name": args.model}, method=args.method_dict, num_workers=1,
                batch_size=args.micro, micro_batch_size=args.micro, max_steps=args.steps,
                lr=1e-3, schedule="constant", grad_clip=1.0, eval_every=args.warmup,
                max_eval_batches=1, checkpoint_every=None, seed=0)
    base.update(over)
    if base.get("checkpoint_every") is None:
        # one checkpoint, at the end: checkpoints are not what is being measured
        base["checkpoint_every"] = base["eval_every"] * (base["max_steps"] // base["eval_every"])
    return TrainConfig.model_validate(base)


def plain_loop(args: argparse.Namespace, manifest) -> list[float]:
    """Step times of a single-process PyTorch loop over the stage's own batches."""
    import torch

    import peft_core
    from pipelines.models import load_model
    from pipelines.train.data import Collator, TrainBatches, read_manifest, read_split

    torch.set_num_threads(1)
    cfg = train_config(args)
    info = read_manifest(manifest)
    batches = TrainBatches(read_split(info, "train"), Collator(info), batch_size=cfg.batch_size,
                           micro_batch_size=cfg.micro_batch_size, rank=0, world=1, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    pm = peft_core.apply(load_model(cfg.model.name, info.task, num_labels=info.num_labels),
                         cfg.method)
    pm.train()
    opt = torch.optim.AdamW(pm.param_groups(cfg.lr, cfg.weight_decay), lr=cfg.lr)
    params = [p for _, p in pm.trainable_parameters()]
    times = []
    for step in range(cfg.max_steps):
        t0 = time.perf_counter()
        for mb in batches.micro_batches(step):
            (pm(**mb).loss / cfg.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def ray_steps(res, warmup: int) -> float:
    """Median step time over the per-step reports after the first ``warmup`` steps (the
    same statistic as :func:`plain_loop`'s caller takes)."""
    steps = [r for r in res.history if r.get("step", 0) > warmup and "step_time_s" in r]
    assert len(steps) == res.history[-1]["step"] - warmup, "the stage must report every step"
    return statistics.median(r["step_time_s"] for r in steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=2, help="Ray runs, between plain runs")
    ap.add_argument("--memory-steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.steps <= args.warmup or args.steps % args.warmup:
        ap.error("--steps must be a multiple of --warmup and larger than it")
    args.method_dict = {"name": "lora", "rank": args.rank, "alpha": 2 * args.rank,
                        "target_modules": args.targets.split(",")}

    import ray

    from pipelines.train import train

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rows, memory = [], []
    with tempfile.TemporaryDirectory(prefix="train-overhead-") as tmp:
        root = Path(tmp)
        manifest = dataset(args, root)

        # -- 1. overhead: plain, Ray+DeepSpeed, plain, ... plain ---------------------------
        plain = [statistics.median(plain_loop(args, manifest)[args.warmup:])]
        load = [os.getloadavg()[0]]
        ray_runs, tokens_per_s = [], []
        for i in range(args.rounds):
            # eval_every 1: one report (one step time) per step; the one-batch eval runs
            # outside the timed step
            res = train(train_config(args, eval_every=1, checkpoint_every=args.steps),
                        manifest=manifest, run_dir=root / "runs" / f"overhead{i}")
            ray_runs.append(ray_steps(res, args.warmup))
            tokens_per_s.append(statistics.median(
                r["tokens_per_s"] for r in res.history if r.get("step", 0) > args.warmup))
            plain.append(statistics.median(plain_loop(args, manifest)[args.warmup:]))
            load.append(os.getloadavg()[0])
        plain_t, ray_t = statistics.fmean(plain), statistics.fmean(ray_runs)
        rows.append({"measure": "step time, plain PyTorch (s)", "value": plain_t,
                     "detail": "runs: " + " / ".join(f"{t:.4f}" for t in plain)})
        rows.append({"measure": "step time, Ray Train + DeepSpeed ZeRO-0, 1 worker (s)",
                     "value": ray_t, "detail": "runs: " + " / ".join(f"{t:.4f}" for t in ray_runs)
                     + f"; tokens/s {statistics.fmean(tokens_per_s):.0f}"})
        ratio = ray_t / plain_t
        rows.append({"measure": "overhead ratio (target <= 1.15)", "value": ratio,
                     "detail": "PASS" if ratio <= 1.15 else "FAIL"})

        # -- 2. per-worker memory, 2 workers ----------------------------------------------
        for stage in (0, 3):
            cfg = train_config(args, num_workers=2, batch_size=2 * args.micro,
                               max_steps=args.memory_steps, eval_every=args.memory_steps,
                               zero={"stage": stage})
            r = train(cfg, manifest=manifest, run_dir=root / "runs" / f"zero{stage}")
            last = r.history[-1]
            memory.append({"zero_stage": stage, "param_mem_mb": last["param_mem_mb"],
                           "rss_mb": last["rss_mb"], "peak_mem_mb": last["peak_mem_mb"],
                           "step_time_s": last["step_time_s"],
                           "total_params": last["total_params"]})
    ray.shutdown()

    half = memory[1]["param_mem_mb"] / memory[0]["param_mem_mb"]
    rows.append({"measure": "ZeRO-3 / ZeRO-0 parameter memory per worker (target ~0.5)",
                 "value": half, "detail": "PASS" if half <= 0.6 else "FAIL"})
    print(f"model {args.model}, LoRA r={args.rank} on {args.targets}, micro-batch {args.micro}, "
          f"seq <= {args.seq}, {args.steps} steps ({args.warmup} warm-up)")
    print(table(rows, ["measure", "value", "detail"]))
    print()
    print(table(memory, ["zero_stage", "param_mem_mb", "rss_mb", "peak_mem_mb", "step_time_s",
                         "total_params"]))
    path = write_json("train_overhead", {
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
        "overhead": {"plain_step_s": plain_t, "plain_runs_s": plain, "ray_deepspeed_step_s": ray_t,
                     "ray_runs_s": ray_runs,
                     "round_ratios": [r / statistics.fmean(plain[i:i + 2])
                                      for i, r in enumerate(ray_runs)],
                     "ratio": ratio, "target": 1.15, "statistic": "median step time per run",
                     "load_avg_1min_after_each_plain_run": load},
        "memory": memory,
        "zero3_over_zero0_param_mem": half,
        "notes": "param_mem_mb is what ZeRO-3 divides (its local partitions, ds_tensor). "
                 "RSS does not show the saving on CPU: each worker first loads the whole base "
                 "model (no zero.Init loading), and memory freed when DeepSpeed partitions it "
                 "stays in the process heap; ZeRO-3's partition copies and gather buffers come "
                 "on top, so current and peak RSS are higher under ZeRO-3 here",
    }, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
