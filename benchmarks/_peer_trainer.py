"""The peer stack of ``benchmarks/scale.py``: Hugging Face ``Trainer`` + ``peft`` LoRA +
DeepSpeed ZeRO, one rank of ``torchrun --nproc_per_node N`` (how that stack launches
itself). Reads the same tokenized rows as the training stage (the data stage's Parquet
train split), pads a micro-batch to its longest row as the stage does, and writes
``OUT/rank<R>.json``: peak RSS (``ru_maxrss``) once the DeepSpeed engine exists (the
``on_train_begin`` callback: model loaded, LoRA injected, ``deepspeed.initialize`` done),
peak RSS at the end, parameter bytes resident on the rank, each optimizer step's time and
tokens, and the seconds from the process's start to its first step.

    torchrun --nproc_per_node 2 benchmarks/_peer_trainer.py --model DIR --data DATASET_DIR \
        --steps 5 --batch 2 --micro 1 --stage 3 --out OUT
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports: "worker start" as ours measures it

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def peak_rss_mb() -> float:
    """Peak RSS on CPU; on a GPU the CUDA allocator's peak, as the training stage reports."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rows(folder: Path) -> list[dict[str, list[int]]]:
    import pyarrow.dataset as pads

    files = sorted(str(p) for p in (folder / "train").rglob("*.parquet"))
    cols = pads.dataset(files, format="parquet").to_table(
        columns=["input_ids", "attention_mask", "labels"]).to_pydict()
    return [{"input_ids": i, "attention_mask": m, "labels": y}
            for i, m, y in zip(cols["input_ids"], cols["attention_mask"], cols["labels"])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--out", required=True, type=Path)
    for k in ("max_live_parameters", "prefetch_bucket_size", "max_reuse_distance"):
        ap.add_argument(f"--stage3-{k.replace('_', '-')}", dest=k, type=int, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import deepspeed.ops

    # The same switch the training stage sets (pipelines/train/deepspeed_config.py): without
    # it DeepSpeed JIT-builds its CPU shared-memory all-reduce in every run; both sides use
    # gloo collectives.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    import peft
    import transformers
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    accum = args.batch // (args.micro * world)
    zero: dict = {"stage": args.stage}
    if args.stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if args.stage == 3:
        zero.update(stage3_param_persistence_threshold=0,
                    stage3_gather_16bit_weights_on_model_save=False)
        for k in ("max_live_parameters", "prefetch_bucket_size", "max_reuse_distance"):
            if getattr(args, k) is not None:
                zero[f"stage3_{k}"] = getattr(args, k)
    # No train_batch_size: transformers' from_pretrained builds a DeepSpeedConfig for
    # zero.Init before DeepSpeed's communicator exists (world size 1 there), and DeepSpeed
    # asserts train_batch_size == micro x accumulation x world size; left out, each place
    # computes it from the other two.
    ds = {
        "train_micro_batch_size_per_gpu": args.micro,
        "gradient_accumulation_steps": accum, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": zero,
        "bf16": {"enabled": args.precision == "bf16"}, "fp16": {"enabled": False},
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }
    cpu = not torch.cuda.is_available()
    # Built before the model: a live TrainingArguments(deepspeed=...) is what makes
    # transformers' from_pretrained load the weights under deepspeed.zero.Init (ZeRO-3).
    targs = TrainingArguments(
        output_dir=str(args.out / "trainer"), per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=accum, max_steps=args.steps, learning_rate=1e-3,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        deepspeed=ds, use_cpu=cpu, ddp_backend="gloo" if cpu else None,
        bf16=args.precision == "bf16", dataloader_num_workers=0, seed=0,
        remove_unused_columns=False, disable_tqdm=True)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    lcfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                           target_modules=args.targets.split(","), task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lcfg)
    load_s = time.perf_counter() - STARTED
    train_rows = rows(args.data)
    pad_id = json.loads((args.data / "manifest.json").read_text()).get("pad_token_id") or 0
    tokens: list[int] = []

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in batch)

        def pad(key: str, value: int) -> torch.Tensor:
            out = torch.full((len(batch), width), value, dtype=torch.long)
            for i, r in enumerate(batch):
                out[i, :len(r[key])] = torch.tensor(r[key], dtype=torch.long)
            return out

        b = {"input_ids": pad("input_ids", pad_id), "attention_mask": pad("attention_mask", 0),
             "labels": pad("labels", -100)}
        tokens.append(int(b["attention_mask"].sum()))
        return b

    state: dict = {"step_times_s": [], "step_tokens": [], "train_loss": []}

    class Probe(TrainerCallback):
        def on_train_begin(self, a, s, c, model=None, **kw):
            state["load_peak_mem_mb"] = peak_rss_mb()
            total = 0
            for p in (model.parameters() if model is not None else []):
                t = getattr(p, "ds_tensor", None)
                t = p.data if t is None else t
                total += t.numel() * t.element_size()
            state["param_mem_mb"] = total / 2**20

        def on_step_begin(self, a, s, c, **kw):
            if "first_step_s" not in state:
                state["first_step_s"] = time.perf_counter() - STARTED
            state["_t0"], state["_tok0"] = time.perf_counter(), len(tokens)

        def on_step_end(self, a, s, c, **kw):
            state["step_times_s"].append(time.perf_counter() - state.pop("_t0"))
            # the dataloader may fetch one batch ahead; count the micro-batches of this step
            state["step_tokens"].append(sum(tokens[:accum]))
            del tokens[:accum]

        def on_log(self, a, s, c, logs=None, **kw):
            if logs and "loss" in logs:
                state["train_loss"].append(logs["loss"])

    trainer = Trainer(model=model, args=targs, train_dataset=train_rows, data_collator=collate,
                      callbacks=[Probe()])
    trainer.train()
    state.pop("_tok0", None)
    # What actually ran: DeepSpeed's engine (not DDP) and its ZeRO stage, and the parallel
    # layout accelerate saw.
    engine = trainer.model_wrapped
    state.update(deepspeed_engine=type(engine).__name__,
                 zero_stage=getattr(engine, "zero_optimization_stage", lambda: None)(),
                 ds_world_size=getattr(engine, "world_size", None),
                 partitioned=any(hasattr(p, "ds_tensor") for p in model.parameters()),
                 accelerate_distributed_type=str(trainer.accelerator.distributed_type),
                 accelerate_num_processes=trainer.accelerator.num_processes)
    state.update(peak_mem_mb=peak_rss_mb(), load_s=load_s, rank=rank, world=world,
                 trainable_params=sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()
                                     if p.requires_grad),
                 versions={"transformers": transformers.__version__, "peft": peft.__version__,
                           "deepspeed": deepspeed.__version__, "torch": torch.__version__})
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(args.out / f"rank{rank}.json")


if __name__ == "__main__":
    sys.exit(main())
