"""LoRA on SmolLM2-135M in bf16 on one GPU through the training stage (Ray Train, DeepSpeed,
nccl): tokens/s and model-FLOPs utilisation (MFU).

MFU counts 6·N FLOPs per trained token (N = all parameters: forward 2N, backward 4N), the
usual convention; with a frozen base the backward skips the base weight gradients, so
``mfu_lora`` also shows the 4·N count actually executed. Peak dense bf16 FLOP/s comes from
the device name (H100/H200, A100, L4, ...) or ``--peak-tflops``.

    python -m benchmarks.gpu_step [--steps 30 --micro 16 --seq 512]

Exits with status 2 and a message where CUDA is absent.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks._common import table, write_json

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10": 125.0, "4090": 165.0}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_step: no CUDA device here (torch.cuda.is_available() is False); this "
              "benchmark only runs on a GPU machine", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    from pipelines.data import DataConfig, builtin, prepare
    from pipelines.train import TrainConfig, train

    gpu = torch.cuda.get_device_name(0)
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="gpu-step-") as tmp:
        root = Path(tmp)
        # Packed causal-LM text: every position of every sequence is a trained token.
        src = builtin.chatterbot_qa(root / "src")
        manifest = prepare(DataConfig(sources=[str(src)], task="causal_lm", text_field="response",
                                      tokenizer=args.model, max_length=args.seq, packing=True,
                                      data_root=str(root / "data")))
        cfg = TrainConfig(
            model={"name": args.model},
            method={"name": "lora", "rank": args.rank, "alpha": 2 * args.rank},
            num_workers=1, use_gpu=True, precision="bf16", batch_size=args.micro,
            micro_batch_size=args.micro, max_steps=args.steps, lr=1e-4, schedule="constant",
            eval_every=args.warmup, max_eval_batches=1, zero={"stage": args.zero})
        res = train(cfg, manifest=manifest, run_dir=root / "run")
    ray.shutdown()

    steady = [r for r in res.history if r["step"] > args.warmup]
    tok_s = statistics.fmean(r["tokens_per_s"] for r in steady)
    n = res.metrics["total_params"]
    peak = peak_tflops(gpu, args.peak_tflops)
    row = {
        "gpu": gpu, "tokens_per_s": tok_s,
        "step_time_s": statistics.fmean(r["step_time_s"] for r in steady),
        "total_params": n, "trainable_params": res.metrics["trainable_params"],
        "peak_mem_mb": res.metrics["peak_mem_mb"],
        "achieved_tflops_6N": 6 * n * tok_s / 1e12,
        "mfu": 6 * n * tok_s / (peak * 1e12) if peak else None,
        "mfu_lora": 4 * n * tok_s / (peak * 1e12) if peak else None,
        "eval_loss": res.metrics.get("eval_loss"),
    }
    print(table([row], list(row)))
    print("wrote "
          f"{write_json('gpu_step', {'config': vars(args), 'result': row, 'peak_tflops': peak})}")


if __name__ == "__main__":
    main()
