"""LoRA step time and peak memory: peft_core against Hugging Face peft, same run.

Each variant runs in its own subprocess (so peak memory is not shared), several times,
interleaved (ours, peft, ours, peft, ...) so that machine noise hits both alike; the table
shows medians and the ratio ours / peft. Target: ratio <= 1.05.

    python -m benchmarks.peft_core_vs_peft [--hidden 256 --layers 4 --seq 128 --batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from benchmarks._common import LLAMA_LINEAR, table, write_json


def _worker(args: argparse.Namespace) -> None:
    import resource
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=4096, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
        max_position_embeddings=args.seq,
    )
    model = LlamaForCausalLM(cfg)
    if args.impl == "ours":
        import peft_core

        model = peft_core.apply(model, {"name": "lora", "rank": args.rank, "alpha": 2 * args.rank,
                                        "target_modules": LLAMA_LINEAR})
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=LLAMA_LINEAR))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 4096, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"step_s": statistics.median(times), "peak_mb": peak_rss / 1024,
                      "step_mem_mb": (peak_rss - base_rss) / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--impl", choices=["ours", "peft"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        return _worker(args)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs: dict[str, list[dict]] = {"ours": [], "peft": []}
    for _ in range(args.repeats):
        for impl in ("ours", "peft"):
            cmd = [sys.executable, "-m", "benchmarks.peft_core_vs_peft", "--impl", impl] + [
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("impl", "repeats")
            ]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for impl, rs in runs.items():
        rows.append({
            "impl": "peft_core" if impl == "ours" else "hf peft",
            "step_time_s": statistics.median(r["step_s"] for r in rs),
            "peak_rss_mb": statistics.median(r["peak_mb"] for r in rs),
            "train_mem_mb": statistics.median(r["step_mem_mb"] for r in rs),
        })
    ratio = {
        "step_time": rows[0]["step_time_s"] / rows[1]["step_time_s"],
        "peak_rss": rows[0]["peak_rss_mb"] / rows[1]["peak_rss_mb"],
    }
    rows.append({"impl": "ratio ours/peft", "step_time_s": ratio["step_time"],
                 "peak_rss_mb": ratio["peak_rss"], "train_mem_mb": ""})
    print(f"LoRA r={args.rank} on Llama hidden={args.hidden} layers={args.layers} "
          f"seq={args.seq} batch={args.batch}, fwd+bwd+AdamW step, "
          f"median of {args.repeats}x{args.steps}")
    print(table(rows, ["impl", "step_time_s", "peak_rss_mb", "train_mem_mb"]))
    target_met = ratio["step_time"] <= 1.05 and ratio["peak_rss"] <= 1.05
    print(f"target ratio <= 1.05: {'met' if target_met else 'MISSED'}")
    path = write_json("peft_core_vs_peft", {
        "settings": {k: v for k, v in vars(args).items() if k != "impl"},
        "runs": runs, "rows": rows, "ratio": ratio, "target": 1.05, "target_met": target_met,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
