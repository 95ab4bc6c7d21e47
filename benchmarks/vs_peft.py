"""peft_core against Hugging Face ``peft`` on the methods both have: same process, same run.

For each (model, method) pair both libraries wrap their own copy of the same real base model
with the same hyperparameters; ``peft``'s initial trainable weights are copied into ours (the
trainable tensors must correspond one to one, which also proves the two count the same
parameters). Both then train on the same batch sequence of the real data (the data stage's
fixed splits), with the same per-step RNG state (so dropout masks agree), interleaved in
blocks of ``--block`` steps (ours, peft, peft, ours, ...) so machine noise hits both alike.
Reported per side: median step time (forward + backward + AdamW; the first ``--warmup``
steps and the profiled step excluded; the ratio is of the two sides' total time over the
same steps, which pairs them batch by batch), peak memory (tensors resident for the model and
optimizer, plus the peak extra allocation during one training step, from the profiler's
allocation events: separable per model within one process, unlike RSS), and the final eval
metrics. Target: our step time <= 1.05x peft's.

Pairs: SmolLM2-135M (causal LM) on the chatterbot Q/A corpus for LoRA, LoRA+, prompt
tuning, P-tuning (MLP encoder), prefix tuning (with its MLP), DoRA, IA3, VeRA (peft's
projections from the same seed as ours) and QLoRA (LoRA on the same 4-bit NF4 base, loaded
through bitsandbytes for each side; no ``prepare_model_for_kbit_training`` on either side, so
both run the same computation); MiniLM (encoder, new
2-class head) on the movie-review sentiment data for LoRA and LoRA+. (Input-level prompts on
an encoder differ by design: ours go after [CLS], peft's before it; and peft 0.21 cannot run
prefix tuning on transformers 5 classifiers; so those pairs are not the same computation.)

    python -m benchmarks.vs_peft [--quick] [--pairs smollm2:lora,minilm:lora_plus ...]

Writes ``benchmarks/results/vs_peft.json`` (``vs_peft_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    LLAMA_LINEAR,
    RESULTS,
    bench_env,
    dataset,
    merged,
    recipe,
    resident_mb,
    step_peak_mb,
    table,
    write_json,
)

N_VIRTUAL = 20
ENC_HIDDEN = 128

# (model kind, method) -> (our config, peft config class name, its kwargs, learning rate)
PAIRS: dict[tuple[str, str], tuple[dict[str, Any], str, dict[str, Any], float]] = {
    ("smollm2", "lora"): (
        {"name": "lora", "rank": 8, "alpha": 16, "target_modules": LLAMA_LINEAR},
        "LoraConfig", {"r": 8, "lora_alpha": 16, "target_modules": LLAMA_LINEAR}, 5e-4),
    ("smollm2", "lora_plus"): (
        {"name": "lora_plus", "rank": 8, "alpha": 16, "lr_ratio": 16,
         "target_modules": LLAMA_LINEAR},
        "LoraConfig", {"r": 8, "lora_alpha": 16, "target_modules": LLAMA_LINEAR}, 5e-4),
    ("smollm2", "prompt_tuning"): (
        {"name": "prompt_tuning", "num_virtual_tokens": N_VIRTUAL},
        "PromptTuningConfig", {"num_virtual_tokens": N_VIRTUAL}, 3e-2),
    ("smollm2", "p_tuning"): (
        {"name": "p_tuning", "num_virtual_tokens": N_VIRTUAL, "encoder": "mlp",
         "encoder_hidden_size": ENC_HIDDEN},
        "PromptEncoderConfig", {"num_virtual_tokens": N_VIRTUAL, "encoder_hidden_size": ENC_HIDDEN,
                                "encoder_reparameterization_type": "MLP"}, 1e-3),
    ("smollm2", "prefix_tuning"): (
        {"name": "prefix_tuning", "num_virtual_tokens": N_VIRTUAL, "projection": True,
         "encoder_hidden_size": ENC_HIDDEN},
        "PrefixTuningConfig", {"num_virtual_tokens": N_VIRTUAL, "prefix_projection": True,
                               "encoder_hidden_size": ENC_HIDDEN}, 1e-3),
    # The methods added by P15, at benchmarks/methods.py's SmolLM2 settings (our default
    # targets; peft is given exactly the layers we wrap).
    ("smollm2", "dora"): (
        {"name": "dora", "rank": 8, "alpha": 16},
        "LoraConfig", {"r": 8, "lora_alpha": 16, "use_dora": True}, 1e-3),
    ("smollm2", "ia3"): ({"name": "ia3"}, "IA3Config", {}, 3e-3),
    ("smollm2", "vera"): (
        {"name": "vera", "rank": 256, "d_initial": 0.1},
        "VeraConfig", {"r": 256, "d_initial": 0.1, "projection_prng_key": 0}, 4e-3),
    # LoRA on the same 4-bit NF4 base on both sides (QUANTIZED below)
    ("smollm2", "qlora"): (
        {"name": "lora", "rank": 8, "alpha": 16, "target_modules": LLAMA_LINEAR},
        "LoraConfig", {"r": 8, "lora_alpha": 16, "target_modules": LLAMA_LINEAR}, 1e-3),
    ("minilm", "lora"): (
        {"name": "lora", "rank": 8, "alpha": 16},
        "LoraConfig", {"r": 8, "lora_alpha": 16}, 1e-3),
    ("minilm", "lora_plus"): (
        {"name": "lora_plus", "rank": 8, "alpha": 16, "lr_ratio": 16},
        "LoraConfig", {"r": 8, "lora_alpha": 16}, 1e-3),
}
# Pairs whose base loads quantized (``model.quantization``), the same way for both sides.
QUANTIZED: dict[tuple[str, str], dict[str, Any]] = {
    ("smollm2", "qlora"): {"bits": 4, "type": "nf4", "double_quant": True,
                           "compute_dtype": "float32"},
}
QUICK_PAIRS = [("smollm2", m) for m in ("lora", "lora_plus", "prompt_tuning", "p_tuning",
                                         "prefix_tuning")] + [("minilm", "lora")]


def _peft_key(name: str) -> str:
    """A peft parameter name in our naming (relative to the base model)."""
    if name.startswith("prompt_encoder.default."):
        from peft_core.methods.prompts import MODULE

        return f"{MODULE}." + name.removeprefix("prompt_encoder.default.")
    name = name.removeprefix("base_model.model.")
    name = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude")  # DoRA
    name = name.removesuffix(".default")  # IA3's and VeRA's vectors
    return name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


def _exact(names: list[str]) -> str:
    return "^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def _peft_targets(peft_cls: str, ours: Any) -> dict[str, Any]:
    """peft's target (and IA3's feed-forward) modules: exactly the layers ours wraps."""
    from peft_core.layers import MergeableLayer

    wrapped = {n: m for n, m in ours.base_model.named_modules() if isinstance(m, MergeableLayer)}
    out: dict[str, Any] = {"target_modules": _exact(list(wrapped))}
    if peft_cls == "IA3Config":
        ff = [n for n, m in wrapped.items() if getattr(m, "feedforward", False)]
        out["feedforward_modules"] = _exact(ff) if ff else []
    return out


def build_pair(kind: str, method: str, info: Any, seed: int):
    """(ours, peft's) on two copies of the base, trainable weights equal, plus the optimizers."""
    import peft
    import torch
    from peft.optimizers import create_loraplus_optimizer

    import peft_core
    from pipelines.models import load_model

    ours_cfg, peft_cls, peft_kw, lr = PAIRS[(kind, method)]
    model_name = recipe(kind).model

    quantization = QUANTIZED.get((kind, method))

    def base():
        torch.manual_seed(seed)  # same fresh head on both sides
        return load_model(model_name, info.task, num_labels=info.num_labels,
                          quantization=quantization)

    ours_base = base()
    if "target_modules" not in ours_cfg and peft_cls != "LoraConfig":
        ours_tmp = peft_core.apply(base(), ours_cfg)
        peft_kw = {**peft_kw, **_peft_targets(peft_cls, ours_tmp)}
        del ours_tmp
    elif "target_modules" not in ours_cfg and peft_cls == "LoraConfig":
        ours_tmp = peft_core.apply(base(), ours_cfg)  # peft names our default targets exactly
        from peft_core.methods.lora import hf_target_modules, lora_layers

        wrapped = [n for n, _ in lora_layers(ours_tmp.base_model)]
        peft_kw = {**peft_kw, "target_modules": hf_target_modules(ours_tmp.base_model, wrapped)}
        del ours_tmp
    ours = peft_core.apply(ours_base, ours_cfg)
    task_type = "SEQ_CLS" if info.task == "classification" else "CAUSAL_LM"
    extra = {"lora_dropout": 0.0} if peft_cls == "LoraConfig" else {}
    ref = peft.get_peft_model(base(),
                              getattr(peft, peft_cls)(task_type=task_type, **peft_kw, **extra))

    ours_params = dict(ours.trainable_parameters())
    ref_params = {_peft_key(n): p for n, p in ref.named_parameters() if p.requires_grad}
    if set(ours_params) != set(ref_params):
        raise RuntimeError(
            f"{kind}/{method}: trainable tensors differ; only ours: "
            f"{sorted(set(ours_params) - set(ref_params))[:5]}, only peft: "
            f"{sorted(set(ref_params) - set(ours_params))[:5]}")
    with torch.no_grad():
        for n, p in ref_params.items():
            # peft keeps IA3's vectors as (d, 1) or (1, d): the same entries, in order
            if ours_params[n].numel() != p.numel() or (
                    ours_params[n].dim() == p.dim() and ours_params[n].shape != p.shape):
                raise RuntimeError(f"{kind}/{method}: {n} has shape {tuple(ours_params[n].shape)} "
                                   f"here, {tuple(p.shape)} in peft")
            ours_params[n].copy_(p.reshape(ours_params[n].shape))

    ours_opt = torch.optim.AdamW(ours.param_groups(lr, 0.0), lr=lr, weight_decay=0.0)
    if method == "lora_plus":
        ref_opt = create_loraplus_optimizer(ref, torch.optim.AdamW, lr=lr,
                                            loraplus_lr_ratio=ours_cfg["lr_ratio"],
                                            weight_decay=0.0)
    else:
        ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=lr,
                                    weight_decay=0.0)
    return ours, ref, ours_opt, ref_opt, lr


def run_pair(kind: str, method: str, manifest: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pipelines.train.data import Collator, TrainBatches, eval_batches, read_manifest, read_split
    from pipelines.train.evaluation import evaluate
    from pipelines.train.objectives import objective_for

    info = read_manifest(manifest)
    collate = Collator(info)
    # the recipe's batch size (halved in quick mode)
    batch = args.batch or recipe(kind).train.batch_size // (2 if args.quick else 1)
    batches = TrainBatches(read_split(info, "train"), collate, batch_size=batch,
                           micro_batch_size=batch, rank=0, world=1, seed=args.seed)
    eval_rows = read_split(info, "eval")
    evals = eval_batches(eval_rows, collate, batch_size=args.eval_batch, rank=0, world=1,
                         max_batches=args.eval_batches)
    ours, ref, ours_opt, ref_opt, lr = build_pair(kind, method, info, args.seed)
    sides = {"ours": (ours, ours_opt), "peft": (ref, ref_opt)}
    device = torch.device("cpu")

    probe = evals[0]
    with torch.no_grad():
        ours.eval(), ref.eval()
        lo, lr_ = ours(**probe).logits, ref(**probe).logits
        diff = (lo - lr_[:, -lo.shape[1]:]).abs()  # peft keeps virtual positions in front
        if diff.dim() == 3:  # token logits: real tokens only (padding positions differ)
            diff = diff[probe["attention_mask"].bool()]
        init_diff = float(diff.max())
    for m, _ in sides.values():
        m.train()

    def one_step(side: str, step: int) -> float:
        model, opt = sides[side]
        torch.manual_seed(args.seed * 100_003 + step)  # same dropout masks on both sides
        t0 = time.perf_counter()
        for mb in batches.micro_batches(step):
            model(**mb).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"ours": [], "peft": []}
    peak: dict[str, float] = {}
    profiled = args.warmup  # this step's time is not counted (the profiler slows it)
    order = ["ours", "peft"]
    for start in range(0, args.steps, args.block):
        for side in order:
            for step in range(start, min(start + args.block, args.steps)):
                if step == profiled:
                    peak[side] = step_peak_mb(lambda s=side, k=step: one_step(s, k))
                    continue
                dt = one_step(side, step)
                if step >= args.warmup:
                    times[side].append(dt)
        order.reverse()  # ours-peft, peft-ours, ...: neither side always runs first
    out: dict[str, Any] = {
        "model": kind, "method": method, "lr": lr, "init_logit_max_diff": init_diff,
        "dataset_id": info.dataset_id, "eval_rows": sum(len(b["labels"]) for b in evals),
        "batch": batch, **{k: getattr(args, k) for k in ("steps", "warmup", "block", "seed")}}
    for side, (model, opt) in sides.items():
        metrics = evaluate(model, evals, evals[0], objective_for(info), device)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        res = resident_mb(model, opt)
        out[side] = {
            "step_time_s": statistics.median(times[side]),
            "step_times_s": times[side],
            "resident_mb": res,
            "step_peak_mb": peak[side],
            "peak_mem_mb": res + peak[side],
            "trainable_params": n_train,
            **metrics,
        }
    # Both sides ran the same steps on the same batches: the ratio of their total times is
    # paired, so batch-to-batch length differences cancel (the medians above do not pair).
    out["ratio_step_time"] = sum(times["ours"]) / sum(times["peft"])
    out["ratio_step_time_median_paired"] = statistics.median(
        a / b for a, b in zip(times["ours"], times["peft"]))
    out["ratio_peak_mem"] = out["ours"]["peak_mem_mb"] / out["peft"]["peak_mem_mb"]
    out["ratio_step_peak"] = out["ours"]["step_peak_mb"] / out["peft"]["step_peak_mb"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps (finishes in a few minutes)")
    p.add_argument("--pairs", default=None,
                   help="comma-separated model:method "
                   "(default: all; --quick: the SmolLM2 five + MiniLM LoRA)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per side (default 20, quick 8)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--block", type=int, default=None,
                   help="steps per interleaved block (default 4, quick 2)")
    p.add_argument("--batch", type=int, default=None, help="default: the recipe's (quick: half)")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--eval-batches", type=int, default=None,
                   help="eval batches (default all; quick 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", action="append", default=[], metavar="KIND=FOLDER",
                   help="use this prepared dataset for a model kind instead of the recipe's")
    p.add_argument("--merge", action="store_true",
                   help="add to the existing JSON (pairs run again replace theirs)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    args.steps = args.steps or (8 if args.quick else 20)
    args.block = args.block or (2 if args.quick else 4)
    if args.quick and args.eval_batches is None:
        args.eval_batches = 2
    if args.pairs:
        pairs = [tuple(x.split(":", 1)) for x in args.pairs.split(",")]
        unknown = [x for x in pairs if x not in PAIRS]
        if unknown:
            p.error(f"--pairs: unknown {unknown}; known: {[':'.join(k) for k in PAIRS]}")
    else:
        pairs = QUICK_PAIRS if args.quick else list(PAIRS)
    bench_env()
    import torch

    torch.set_num_threads(1)
    given = dict(x.split("=", 1) for x in args.dataset)
    manifests = {kind: given.get(kind) or dataset(kind)
                 for kind in dict.fromkeys(k for k, _ in pairs)}
    try:
        import ray

        ray.shutdown()  # the data stage's local Ray is not needed any more: free its CPUs
    except ImportError:
        pass
    t0 = time.perf_counter()
    out_path = args.out or RESULTS / ("vs_peft_quick.json" if args.quick else "vs_peft.json")
    key = ("model", "method")
    prior, commands = merged(out_path, [], key, merge=args.merge, field="results")
    results: list[dict[str, Any]] = []

    def save() -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
        """Write after every pair, so a part cut short by a time limit keeps what it did."""
        fresh = {tuple(r[k] for k in key) for r in results}
        every = [r for r in prior if tuple(r[k] for k in key) not in fresh] + results
        rows = [_row(r) for r in every]
        worst = max(r["ratio_step_time"] for r in every)
        write_json(out_path.stem, {
            "commands": commands, "wall_s_last": time.perf_counter() - t0, "results": every,
            "rows": rows, "target": 1.05, "worst_step_ratio": worst, "target_met": worst <= 1.05,
        }, out_path)
        return every, rows, worst

    for kind, method in pairs:
        r = run_pair(kind, method, manifests[kind], args)
        results.append(r)
        save()
        print(f"{kind}/{method}: step ours/peft {r['ratio_step_time']:.3f}, peak mem "
              f"{r['ratio_peak_mem']:.3f}, init logit diff {r['init_logit_max_diff']:.2e}",
              flush=True)
    _, rows, worst = save()
    print(table(rows, list(dict.fromkeys(k for r in rows for k in r))))
    print(f"target step-time ratio <= 1.05: {'met' if worst <= 1.05 else 'MISSED'} "
          f"(worst {worst:.3f})")
    print(f"wrote {out_path}")


def _row(r: dict[str, Any]) -> dict[str, Any]:
    metric = "eval_accuracy" if r["model"] == "minilm" else "eval_loss"
    return {
        "pair": f"{r['model']}/{r['method']}", "trainable": r["ours"]["trainable_params"],
        "steps": r["steps"], "batch": r["batch"],
        "ours_step_s": r["ours"]["step_time_s"], "peft_step_s": r["peft"]["step_time_s"],
        "step_ratio": r["ratio_step_time"],
        "ours_mem_mb": r["ours"]["peak_mem_mb"], "peft_mem_mb": r["peft"]["peak_mem_mb"],
        "mem_ratio": r["ratio_peak_mem"],
        f"ours_{metric}": r["ours"][metric], f"peft_{metric}": r["peft"][metric],
    }


if __name__ == "__main__":
    main()
