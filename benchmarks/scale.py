"""Per-rank memory and step time of LoRA under ZeRO 0 / 2 / 3 at three model sizes, and the
peer stack (Hugging Face ``Trainer`` + ``peft`` + DeepSpeed ZeRO-3) beside it (issue P11).

Random Llama models (SmolLM2's tokenizer and vocabulary, fp32, about 120M, 320M and 1B
parameters) are built once from configs and saved as local safetensors folders under
``$PEFTPIPE_CACHE/models/scale-<size>``. Every point trains LoRA r=8 (q_proj, v_proj) on
the same packed chatterbot corpus (the data stage, causal LM, fixed ``--seq`` tokens per
row) with the same global batch, micro-batch and steps, through the training stage (Ray
Train + DeepSpeed on CPU), for each size x ZeRO stage x worker count. The peer runs the
same model, rows, batch, LoRA and ZeRO-3 settings, launched as it launches itself
(``torchrun --nproc_per_node N``), see ``benchmarks/_peer_trainer.py``.

Each point runs in its own process (fresh heap: RSS is per process), one at a time, and is
merged into ``benchmarks/results/scale.json`` as soon as it ends, so a cut run keeps its
points; ``--lock FILE`` runs each point under ``flock FILE`` so other heavy jobs on a
shared machine interleave between points.

Measured per point (max over ranks): peak RSS once the model is loaded, the method
injected and DeepSpeed initialised (``load_peak_mem_mb``); peak RSS over the whole run,
steps included (``peak_mem_mb``; RSS peaks are monotone, so it is at least the load peak);
parameter bytes resident per rank (``param_mem_mb``); median step time over the steps
after the first (``step_time_s``); tokens/s over the same steps; seconds from the worker's
start to its first step (``first_step_s``).

The bound of the issue, per point: ``model_bytes / N + largest_layer + fixed`` where N is
the number of ranks the parameters are partitioned over (the workers under ZeRO-3, 1
otherwise), ``largest_layer`` the largest of the embedding, a decoder block and the LM
head, and ``fixed`` = the 1-worker ZeRO-0 peak RSS minus the model's bytes at the smallest
size measured (the process: Python, torch, Ray, DeepSpeed, activations at this batch).

    python -m benchmarks.scale [--sizes 120m,320m,1b] [--stages 0,2,3] [--workers 1,2]
        [--steps 5] [--seq 128] [--skip-peer] [--quick] [--merge] [--lock /tmp/coord/heavy.lock]
    python -m benchmarks.scale --targets-only     # recompute targets and the table from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, WORK, bench_env, table, write_json

ROOT = RESULTS.parent.parent
OUT = RESULTS / "scale.json"
TARGETS = ["q_proj", "v_proj"]
VOCAB = 49152
# size -> LlamaConfig fields (SmolLM2's vocabulary, tied embeddings, head_dim 64, GQA).
# 320m is the model (hidden 1024, 24 layers); 1b is Llama-3.2-1B's shape.
SIZES: dict[str, dict[str, int]] = {
    "120m": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2304,
                 num_attention_heads=12, num_key_value_heads=4),
    "320m": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=2816,
                 num_attention_heads=16, num_key_value_heads=4),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
               num_attention_heads=32, num_key_value_heads=8),
}
KEY = ("stack", "label", "size", "stage", "workers", "precision")


# -- models --------------------------------------------------------------------------------
def llama_config(size: str, tokenizer_dir: str):
    import json as _json

    from transformers import LlamaConfig

    tok = _json.loads((Path(tokenizer_dir) / "config.json").read_text())
    return LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=True, head_dim=64,
                       max_position_embeddings=2048, rms_norm_eps=1e-5,
                       bos_token_id=tok.get("bos_token_id", 1),
                       eos_token_id=tok.get("eos_token_id", 2),
                       pad_token_id=tok.get("pad_token_id", 2), **SIZES[size])


def model_dir(size: str) -> Path:
    from pipelines.models import cache_dir

    return cache_dir() / "models" / f"scale-{size}"


def ensure_model(size: str) -> Path:
    """The random Llama of ``size`` as a safetensors folder with the tokenizer files; built
    once (temp folder, then renamed), reused afterwards."""
    out = model_dir(size)
    if (out / "config.json").is_file():
        return out
    import gc

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from pipelines.models import resolve

    src = resolve("builtin:smollm2")
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(size, src))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".scale-{size}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        del model
        gc.collect()
    return out


def model_facts(size: str) -> dict[str, Any]:
    """Parameter count, bytes (fp32) and the largest layer's bytes, from the config on the
    meta device (no weights)."""
    import torch
    from transformers import LlamaForCausalLM

    from pipelines.models import resolve

    with torch.device("meta"):
        m = LlamaForCausalLM(llama_config(size, resolve("builtin:smollm2")))
    n = sum(p.numel() for p in m.parameters())  # tied weights counted once
    layers = {"embed_tokens": m.model.embed_tokens, "decoder block": m.model.layers[0]}
    if m.lm_head.weight is not m.model.embed_tokens.weight:
        layers["lm_head"] = m.lm_head
    sizes = {k: sum(p.numel() for p in v.parameters()) for k, v in layers.items()}
    big = max(sizes, key=sizes.get)
    return {"params": n, "model_mb": 4 * n / 2**20, "largest_layer": big,
            "largest_layer_mb": 4 * sizes[big] / 2**20, "config": SIZES[size]}


# -- data ------------------------------------------------------------------------------------
def ensure_data(seq: int):
    """The chatterbot Q/A pairs as text documents, packed by the data stage into rows of
    ``seq`` tokens (SmolLM2's tokenizer); content-addressed, so built once."""
    from pipelines.data import DataConfig, builtin, prepare

    root = WORK / "scale"
    src = root / "corpus" / "chatterbot_text.jsonl"
    if not src.is_file():
        rows = [{"text": f"{r['prompt']}\n{r['response']}"} for r in builtin.chatterbot_rows()]
        src.parent.mkdir(parents=True, exist_ok=True)
        tmp = src.with_suffix(".tmp")
        builtin.write_rows(rows, tmp, "jsonl")
        os.replace(tmp, src)
    return prepare(DataConfig(sources=[str(src)], format="jsonl", task="causal_lm",
                              tokenizer="builtin:smollm2", max_length=seq, packing=True,
                              data_root=str(root / "data")))


# -- one point -------------------------------------------------------------------------------
def _steady(times: list[float]) -> list[float]:
    return times[1:] if len(times) > 1 else times


def run_ours(args: argparse.Namespace, size: str, stage: int, workers: int,
             manifest, quantization: dict[str, Any] | None = None) -> dict[str, Any]:
    """One training run of the point; ``quantization``: the base's ``model.quantization``."""
    from pipelines.train import TrainConfig, train

    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["param_persistence_threshold"] = 0
        zero.update(zero3_settings(args))
    cfg = TrainConfig.model_validate(dict(
        model={"name": str(model_dir(size)), "quantization": quantization},
        method={"name": "lora", "rank": 8, "alpha": 16, "target_modules": TARGETS},
        num_workers=workers, batch_size=args.batch, micro_batch_size=args.micro,
        max_steps=args.steps, lr=1e-3, schedule="constant", grad_clip=1.0,
        precision=args.precision, zero=zero,
        # one report (one step time) per step; its one-batch eval runs outside the timed step
        eval_every=1, max_eval_batches=1, eval_batch_size=1, checkpoint_every=args.steps,
        seed=0, name=f"scale-{size}-z{stage}-w{workers}"))
    # A fresh run folder per point: Ray Train resumes from a checkpoint it finds in one.
    (WORK / "scale" / "runs").mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(dir=WORK / "scale" / "runs", prefix=f"{cfg.name}-"))
    t0 = time.perf_counter()
    try:
        res = train(cfg, manifest=manifest, run_dir=run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    wall = time.perf_counter() - t0
    hist = [r for r in res.history if r.get("step", 0) >= 1 and "step_time_s" in r]
    last = res.history[-1]
    steps = _steady([r["step_time_s"] for r in hist])
    return {
        "load_peak_mem_mb": last.get("load_peak_mem_mb"),
        "peak_mem_mb": last["peak_mem_mb"], "rss_mb": last.get("rss_mb"),
        "param_mem_mb": last["param_mem_mb"],
        "step_time_s": statistics.median(steps), "step_times_s": [r["step_time_s"] for r in hist],
        "tokens_per_s": statistics.median(_steady([r["tokens_per_s"] for r in hist])),
        "first_step_s": last.get("first_step_s"), "load_s": last.get("load_s"),
        "train_loss": [r.get("train_loss") for r in hist],
        "total_params": last.get("total_params"), "trainable_params": last.get("trainable_params"),
        "precision_used": last.get("precision"), "wall_s": wall,
    }


def zero3_settings(args: argparse.Namespace) -> dict[str, int]:
    """``--zero3 max_live_parameters=1e8,...``: the training stage's ZeRO-3 gathering fields
    (``zero.*``), given to the peer as DeepSpeed's ``stage3_*`` keys."""
    out: dict[str, int] = {}
    for item in filter(None, (args.zero3 or "").split(",")):
        k, _, v = item.partition("=")
        out[k.strip()] = int(float(v))
    return out


def run_peer(args: argparse.Namespace, size: str, stage: int, workers: int,
             manifest) -> dict[str, Any]:
    """The peer under ``torchrun``; each rank writes its JSON, aggregated here as ours is
    (max over ranks of memory and of each step's time, tokens summed)."""
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tempfile.mkdtemp(prefix="scale-peer-"))
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(workers),
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(Path(__file__).with_name("_peer_trainer.py")),
           "--model", str(model_dir(size)), "--data", str(Path(manifest.path)),
           "--steps", str(args.steps), "--batch", str(args.batch), "--micro", str(args.micro),
           "--stage", str(stage), "--rank", "8", "--alpha", "16", "--targets", ",".join(TARGETS),
           "--precision", args.precision, "--out", str(out),
           *[f"--stage3-{k.replace('_', '-')}={v}" for k, v in zero3_settings(args).items()]]
    import torch

    env = {**os.environ, "DS_ACCELERATOR": "cuda" if torch.cuda.is_available() else "cpu"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.point_timeout)
    wall = time.perf_counter() - t0
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode or len(ranks) != workers:
        tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]).strip()
        raise RuntimeError(f"peer exited {proc.returncode} with {len(ranks)}/{workers} rank "
                           f"reports:\n{tail}")
    what = {k: ranks[0].get(k) for k in ("deepspeed_engine", "zero_stage", "ds_world_size",
                                          "partitioned", "accelerate_distributed_type",
                                          "accelerate_num_processes")}
    if (what["deepspeed_engine"] != "DeepSpeedEngine" or what["zero_stage"] != stage
            or what["ds_world_size"] != workers or what["accelerate_num_processes"] != workers):
        raise RuntimeError(
            f"the peer did not run DeepSpeed ZeRO-{stage} on {workers} ranks: {what}")
    per_step = [max(r["step_times_s"][i] for r in ranks)
                for i in range(len(ranks[0]["step_times_s"]))]
    tokens = [sum(r["step_tokens"][i] for r in ranks) for i in range(len(per_step))]
    steady = _steady(list(range(len(per_step))))
    return {
        "load_peak_mem_mb": max(r["load_peak_mem_mb"] for r in ranks),
        "peak_mem_mb": max(r["peak_mem_mb"] for r in ranks),
        "param_mem_mb": max(r["param_mem_mb"] for r in ranks),
        "step_time_s": statistics.median(per_step[i] for i in steady), "step_times_s": per_step,
        "tokens_per_s": statistics.median(tokens[i] / per_step[i] for i in steady),
        "first_step_s": max(r["first_step_s"] for r in ranks),
        "load_s": max(r["load_s"] for r in ranks),
        "train_loss": ranks[0].get("train_loss"),
        "trainable_params": ranks[0].get("trainable_params"),
        "versions": ranks[0].get("versions"), "ran": what, "wall_s": wall,
    }


def code_state() -> dict[str, Any]:
    """The commit the point ran on and whether the training code had local changes."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    import hashlib

    dirty = git("status", "--porcelain", "--", "pipelines", "peft_core")
    # The training code that ran, whatever its commit state: a later commit of the same
    # files has the same hash (the working-tree bytes of the training stage and peft_core).
    h = hashlib.sha256()
    paths = ("pipelines/train", "pipelines/models.py", "peft_core")
    for f in sorted(git("ls-files", "--", *paths).split()
                    + git("ls-files", "--others", "--exclude-standard", "--", *paths).split()):
        if f.endswith(".py") and (ROOT / f).is_file():
            h.update(f.encode() + b"\0" + (ROOT / f).read_bytes())
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "subject": git("log", "-1", "--format=%s")[:80],
            "training_code_modified": bool(dirty), "code_sha256": h.hexdigest()[:16]}


def one_point(args: argparse.Namespace, spec: str) -> None:
    stack, size, stage, workers = spec.split(":")
    stage_i, workers_i = int(stage), int(workers)
    bench_env()
    import ray

    rec: dict[str, Any] = {"stack": stack, "label": args.label, "size": size, "stage": stage_i,
                           "workers": workers_i, "precision": args.precision, "steps": args.steps,
                           "seq": args.seq, "batch": args.batch, "micro": args.micro,
                           "zero3_settings": zero3_settings(args), "free_gb_before": _free_gb(),
                           **model_facts(size), "code": code_state(),
                           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    def body() -> None:
        ensure_model(size)
        ray.init(num_cpus=2, include_dashboard=True, logging_level="ERROR", log_to_driver=False)
        manifest = ensure_data(args.seq)
        rec["dataset_id"] = manifest.dataset_id
        if stack == "ours":
            rec.update(run_ours(args, size, stage_i, workers_i, manifest))
        else:
            ray.shutdown()  # the peer needs no Ray: give its processes the memory
            rec.update(run_peer(args, size, stage_i, workers_i, manifest))

    run_point(rec, body, save)


def run_point(rec: dict[str, Any], body: Callable[[], None],
              save_fn: Callable[..., Any]) -> None:
    """``body()`` fills ``rec``; its exception is recorded as the point's error (a failed point
    is a result too); Ray is shut down; ``rec`` is merged into the JSON and printed."""
    import ray

    try:
        body()
        rec["error"] = None
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"[-8000:]
    finally:
        if ray.is_initialized():
            ray.shutdown()
    save_fn([rec], merge=True)
    print(json.dumps({k: v for k, v in rec.items() if k not in ("config", "train_loss")},
                     default=str), flush=True)


def _free_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


# -- the JSON, the bound and the targets -------------------------------------------------------
def load() -> dict[str, Any]:
    return json.loads(OUT.read_text()) if OUT.is_file() else {}


def main_label(runs: list[dict[str, Any]]) -> str | None:
    labels = {r["label"] for r in runs}
    for lab in ("after", "current", "before"):
        if lab in labels:
            return lab
    return next(iter(labels), None)


def fixed_overhead(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """1-worker ZeRO-0 peak RSS minus the model's bytes, at the smallest size measured."""
    base = [r for r in runs if r["stack"] == "ours" and r["stage"] == 0 and r["workers"] == 1
            and not r.get("error")]
    if not base:
        return None
    r = min(base, key=lambda r: r["params"])
    return {"size": r["size"], "mb": r["peak_mem_mb"] - r["model_mb"],
            "definition": "peak RSS of the 1-worker ZeRO-0 run minus the model's fp32 bytes, "
                          f"at the smallest size measured ({r['size']})"}


def bound(r: dict[str, Any], fixed: dict[str, Any] | None) -> float | None:
    if fixed is None:
        return None
    shards = r["workers"] if r["stage"] == 3 else 1
    return r["model_mb"] / shards + r["largest_layer_mb"] + fixed["mb"]


def find(runs, **kv) -> dict[str, Any] | None:
    for r in runs:
        if all(r.get(k) == v for k, v in kv.items()) and not r.get("error"):
            return r
    return None


def targets(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    fixed = fixed_overhead(runs)

    def add(name: str, limit: float, value: float | None, detail: str) -> None:
        out.append({"target": name, "limit": limit, "value": value,
                    "status": "not measured" if value is None else
                    ("met" if value <= limit else "missed"), "detail": detail})

    z0, z3 = find(runs, stack="ours", size="1b", stage=0, workers=2), \
        find(runs, stack="ours", size="1b", stage=3, workers=2)
    add("1B, 2 workers: ZeRO-3 per-rank peak RSS / ZeRO-0's", 0.60,
        z3["peak_mem_mb"] / z0["peak_mem_mb"] if z0 and z3 else None,
        f"ZeRO-3 {z3['peak_mem_mb']:.0f} MB, ZeRO-0 {z0['peak_mem_mb']:.0f} MB" if z0 and z3 else
        "needs ours 1b stage 0 and 3 with 2 workers")

    worst, where = None, ""
    for r in runs:
        b = bound(r, fixed)
        if r["stack"] != "ours" or r["stage"] != 3 or r.get("error") or b is None:
            continue
        ratio = r["peak_mem_mb"] / b
        if worst is None or ratio > worst:
            worst, where = ratio, (f"{r['size']} {r['workers']}w: peak {r['peak_mem_mb']:.0f} MB "
                                   f"vs bound {b:.0f} MB")
    add("ZeRO-3 per-rank peak / (model/N + largest layer + fixed), worst point", 1.20, worst,
        where + (f"; fixed {fixed['mb']:.0f} MB ({fixed['size']})" if fixed else ""))

    worst, where = None, ""
    for size in SIZES:
        a, b = find(runs, stack="ours", size=size, stage=3, workers=2), \
            find(runs, stack="ours", size=size, stage=0, workers=2)
        if a and b:
            ratio = a["step_time_s"] / b["step_time_s"]
            if worst is None or ratio > worst:
                worst, where = ratio, (f"{size} 2w: ZeRO-3 {a['step_time_s']:.2f} s vs "
                                       f"ZeRO-0 {b['step_time_s']:.2f} s")
    add("ZeRO-3 / ZeRO-0 step time (2 workers), worst size", 2.0, worst, where)

    for measure, limit in (("peak_mem_mb", 1.0), ("step_time_s", 1.10)):
        worst, where = None, ""
        for size in SIZES:
            o, p = find(runs, stack="ours", size=size, stage=3, workers=2), \
                find(runs, stack="peer", size=size, stage=3, workers=2)
            if o and p:
                ratio = o[measure] / p[measure]
                if worst is None or ratio > worst:
                    worst, where = ratio, f"{size}: ours {o[measure]:.4g} vs peer {p[measure]:.4g}"
        add(f"ZeRO-3 2 workers, ours / peer {measure}, worst size", limit, worst, where)
    return out


def rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fixed = fixed_overhead(runs)
    order = {s: i for i, s in enumerate(SIZES)}
    out = []
    for r in sorted(runs, key=lambda r: (r["label"], order.get(r["size"], 9), r["stack"] != "ours",
                                         r["stage"], r["workers"])):
        f = lambda k, d=0, r=r: "–" if r.get(k) is None else f"{r[k]:.{d}f}"  # noqa: E731
        b = bound(r, fixed)
        out.append({"label": r["label"], "size": r["size"], "stack": r["stack"],
                    "zero": r["stage"], "workers": r["workers"],
                    "model MB": f"{r['model_mb']:.0f}",
                    "load peak MB": f("load_peak_mem_mb"), "peak MB": f("peak_mem_mb"),
                    "param MB": f("param_mem_mb"), "bound MB": "–" if b is None else f"{b:.0f}",
                    "peak/bound": "–" if b is None or r.get("peak_mem_mb") is None
                    else f"{r['peak_mem_mb'] / b:.2f}",
                    "step s": f("step_time_s", 2), "tokens/s": f("tokens_per_s"),
                    "first step s": f("first_step_s", 1),
                    "error": ((r.get("error") or "").splitlines() or [""])[0][:60]})
    return out


def save(new: list[dict[str, Any]], *, merge: bool) -> Path:
    """Merge ``new`` into the JSON (read-modify-write under a lock file: drivers and points
    of several invocations may write at once)."""
    import fcntl

    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / "peftpipe-scale-json.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _save(new, merge=merge)


def _save(new: list[dict[str, Any]], *, merge: bool) -> Path:
    old = load() if merge else {}
    fresh = {tuple(r[k] for k in KEY) for r in new}
    runs = [r for r in old.get("runs", []) if tuple(r[k] for k in KEY) not in fresh] + new
    lab = main_label(runs)
    judged = [r for r in runs if r["label"] == lab]
    cmds = old.get("commands", [])
    cmd = " ".join(["python -m benchmarks.scale", *sys.argv[1:]])
    if not {"--point", "--targets-only"} & set(sys.argv) and cmd not in cmds:
        cmds = [*cmds, cmd]
    return write_json("scale", {
        "settings": {"lora": {"rank": 8, "alpha": 16, "target_modules": TARGETS},
                     "sizes": {s: SIZES[s] for s in SIZES}, "vocab": VOCAB,
                     "statistic": "median step time over the steps after the first; "
                                  "memory max over ranks"},
        "commands": cmds,
        "fixed_overhead": fixed_overhead(judged),
        "targets_label": lab,
        "targets": targets(judged),
        "runs": runs,
        "notes": old.get("notes", ""),
    }, OUT)


# -- driver ----------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="120m,320m,1b")
    ap.add_argument("--stages", default="0,2,3")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--steps", type=int, default=5, help="the first is excluded from step times")
    ap.add_argument("--seq", type=int, default=128, help="tokens per packed row")
    ap.add_argument("--batch", type=int, default=2, help="global batch (sequences per step)")
    ap.add_argument("--micro", type=int, default=1, help="sequences per forward per worker")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--peer-only", action="store_true")
    ap.add_argument("--peer-workers", default="2")
    ap.add_argument("--quick", action="store_true", help="only 120m (a smoke run)")
    ap.add_argument("--merge", action="store_true", help="keep the JSON's other points")
    ap.add_argument("--label", default="current",
                    help="tags the points (e.g. before / after a change of the training code)")
    ap.add_argument("--zero3", default="",
                    help="ZeRO-3 gathering settings for both stacks, e.g. "
                         "max_live_parameters=1e8,max_reuse_distance=0,prefetch_bucket_size=5e7 "
                         "(default: DeepSpeed's own); tag such points with their own --label")
    ap.add_argument("--lock", default=None, help="run each point under `flock LOCK`")
    ap.add_argument("--point-timeout", type=int, default=1500)
    ap.add_argument("--points", default=None,
                    help="explicit comma-separated points STACK:SIZE:STAGE:WORKERS (e.g. "
                         "ours:1b:3:2,peer:1b:3:2), run in this order; overrides the grid; "
                         "points joined by '+' run under one hold of --lock")
    ap.add_argument("--point", default=None, help=argparse.SUPPRESS)  # stack:size:stage:workers
    ap.add_argument("--targets-only", action="store_true")
    args = ap.parse_args()
    if args.point:
        return one_point(args, args.point)
    if args.targets_only:
        save([], merge=True)
        return report(load())
    sizes = ["120m"] if args.quick else args.sizes.split(",")
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        ap.error(f"--sizes: unknown {bad}; known {list(SIZES)}")
    points = [] if args.peer_only else [
        f"ours:{s}:{z}:{w}" for s in sizes for z in args.stages.split(",")
        for w in args.workers.split(",")]
    if not args.skip_peer:
        points += [f"peer:{s}:3:{w}" for s in sizes for w in args.peer_workers.split(",")]
    if args.points:
        points = args.points.split(",")
        bad = [p for g in points for p in g.split("+") if len(p.split(":")) != 4
               or p.split(":")[0] not in ("ours", "peer") or p.split(":")[1] not in SIZES]
        if bad:
            ap.error(f"--points: expected STACK:SIZE:STAGE:WORKERS with STACK ours|peer, got {bad}")
    save([], merge=args.merge)  # records this command (points merge themselves, under the lock)
    passthrough = ["--steps", str(args.steps), "--seq", str(args.seq), "--batch", str(args.batch),
                   "--micro", str(args.micro), "--precision", args.precision, "--label", args.label,
                   "--point-timeout", str(args.point_timeout), "--zero3", args.zero3]
    for group in points:
        # A group (points joined by '+') runs under one hold of the lock, each point still in
        # its own process; every point merges itself into the JSON when it ends.
        cmds = [[sys.executable, "-m", "benchmarks.scale", "--point", spec, *passthrough]
                for spec in group.split("+")]
        print(f"[{time.strftime('%H:%M:%S')}] {group}", flush=True)
        if args.lock:
            limit = (args.point_timeout + 120) * len(cmds)
            script = " ; ".join(shlex.join(["timeout", str(args.point_timeout + 120), *c])
                                for c in cmds)
            subprocess.run(["flock", args.lock, "timeout", str(limit), "bash", "-c", script],
                           cwd=ROOT, check=False)
            continue
        for c in cmds:
            subprocess.run(c, cwd=ROOT, check=False)
    report(load())


def report(data: dict[str, Any]) -> None:
    runs = data.get("runs", [])
    print(table(rows(runs), list(rows(runs)[0])) if runs else "no points")
    print()
    for t in data.get("targets", []):
        v = "–" if t["value"] is None else f"{t['value']:.3f}"
        print(f"{t['status']:>12}  {t['target']} <= {t['limit']}: {v}  ({t['detail']})")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
