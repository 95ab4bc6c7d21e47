"""K LoRA adapters packed over one base (peft_core.pack) against K solo runs, on CPU.

A random Llama with SmolLM2-135M's width (hidden 576, 9 heads / 3 KV heads, MLP 1536)
and fewer layers and a smaller vocabulary (so a run stays within minutes on 2 cores);
K members differing in rank, learning rate and seed, each on its own random data.

- packed: one process holds the base once and trains the K members together, one stacked
  forward (K micro-batches) + backward + K AdamW steps per step (each member its own
  ``pipelines.train.members.MemberOptimizer``, as the packed training stage steps them);
- solo: K separate processes, one member each, the same member config, seed and data, and
  the same optimizer class (so both variants pay the same imports and optimizer code).

Reported: median step time of the packed step against the sum of the K solo medians (the
same K member-steps of work); setup (imports, the base built at random in place of a
load, adapters, optimizers) and wall time of the whole run (setup + every step) of the
packed process against the K solo processes' summed (K trials one after another); peak
RSS of the packed process against the sum of the K solo processes' (K trials side by
side); parameter bytes (base once vs K times); and each member's largest per-step loss
difference from its solo run (the parity the tests check on tiny models, here at this
size). Each variant runs ``--repeats`` times, interleaved.

    python -m benchmarks.pack [--k 4 --layers 6 --seq 64 --micro 2 --steps 5 --warmup 2]

Writes ``benchmarks/results/pack.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from benchmarks._common import LLAMA_LINEAR, bench_env, table, write_json

RANKS = (4, 8, 16, 32)
LRS = (1e-4, 3e-4, 1e-3, 3e-3)


def _member(k: int) -> dict:
    r = RANKS[k % len(RANKS)]
    return {"name": f"m{k}", "seed": k, "lr": LRS[k % len(LRS)],
            "config": {"name": "lora", "rank": r, "alpha": 2.0 * r,
                       "target_modules": LLAMA_LINEAR}}


def _worker(args: argparse.Namespace) -> None:
    import time

    started = time.perf_counter()  # setup_s: imports, base model, adapters, optimizers
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import peft_core
    from peft_core.pack import PackedModel
    from pipelines.train.members import MemberOptimizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=args.layers, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=args.seq, tie_word_embeddings=True,
    )
    base = LlamaForCausalLM(cfg)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    members = [_member(k) for k in range(args.k)]
    if args.role == "solo":
        members = [members[args.member]]

    def batch(m: dict, step: int) -> dict:
        g = torch.Generator().manual_seed(10_000 * m["seed"] + step)
        ids = torch.randint(0, args.vocab, (args.micro, args.seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    if args.role == "packed":
        pack = PackedModel(base)
        optimizers = {}
        for m in members:
            member = pack.add(m["name"], m["config"], seed=m["seed"])
            optimizers[m["name"]] = MemberOptimizer(member.peft, lr=m["lr"])
        pack.train()
        sizes = pack.storage_bytes()

        def step(i: int) -> dict[str, float]:
            losses = pack.backward({m["name"]: batch(m, i) for m in members})
            for opt in optimizers.values():
                opt.step()
            return losses
    else:
        m = members[0]
        torch.manual_seed(m["seed"])
        pm = peft_core.apply(base, m["config"])
        pm.train()
        opt = MemberOptimizer(pm, lr=m["lr"])  # AdamW over pm.param_groups, as packed
        adapter = sum(p.numel() * p.element_size() for _, p in pm.trainable_parameters())
        sizes = {"base": base_bytes, m["name"]: adapter}

        def step(i: int) -> dict[str, float]:
            loss = pm(**batch(m, i)).loss
            loss.backward()
            opt.step()
            return {m["name"]: float(loss.detach())}

    load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    setup_s = time.perf_counter() - started
    times, losses = [], {m["name"]: [] for m in members}
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        out = step(i)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        for name, v in out.items():
            losses[name].append(v)
    print(json.dumps({
        "step_s": statistics.median(times), "times": times, "losses": losses,
        # setup and every step (warm-up included): the K trials' whole run in this process
        "setup_s": setup_s, "wall_s": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_rss_mb": load_rss, "param_bytes": sizes, "base_param_bytes": base_bytes,
    }))


def _run(args: argparse.Namespace, role: str, member: int = 0) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.pack", "--role", role, "--member", str(member),
           *(f"--{k}={v}" for k, v in vars(args).items()
             if k not in ("role", "member", "repeats"))]
    out = subprocess.run(cmd, env=os.environ.copy(), capture_output=True, text=True,
                         check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--role", choices=["packed", "solo"], help=argparse.SUPPRESS)
    p.add_argument("--member", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    bench_env()
    if args.role:
        return _worker(args)

    packed, solo = [], [[] for _ in range(args.k)]
    for _ in range(args.repeats):
        packed.append(_run(args, "packed"))
        for k in range(args.k):
            solo[k].append(_run(args, "solo", k))
    packed_step = statistics.median(r["step_s"] for r in packed)
    solo_steps = [statistics.median(r["step_s"] for r in runs) for runs in solo]
    packed_rss = statistics.median(r["peak_rss_mb"] for r in packed)
    solo_rss = [statistics.median(r["peak_rss_mb"] for r in runs) for runs in solo]
    base_bytes = packed[0]["base_param_bytes"]
    packed_params = sum(packed[0]["param_bytes"].values())
    solo_params = sum(sum(runs[0]["param_bytes"].values()) for runs in solo)
    # parity at this size: every run of a member has the same losses, so the first of each
    parity = {f"m{k}": max(abs(a - b) for a, b in zip(packed[0]["losses"][f"m{k}"],
                                                      solo[k][0]["losses"][f"m{k}"]))
              for k in range(args.k)}
    rows = [
        {"variant": f"packed (1 process, K={args.k})", "step_s": packed_step,
         "peak_rss_mb": packed_rss, "param_mb": packed_params / 2**20},
        {"variant": f"solo x{args.k} (sum of {args.k} processes)", "step_s": sum(solo_steps),
         "peak_rss_mb": sum(solo_rss), "param_mb": solo_params / 2**20},
    ]
    packed_setup = statistics.median(r["setup_s"] for r in packed)
    solo_setups = [statistics.median(r["setup_s"] for r in runs) for runs in solo]
    packed_wall = statistics.median(r["wall_s"] for r in packed)
    solo_walls = [statistics.median(r["wall_s"] for r in runs) for runs in solo]
    rows[0].update(setup_s=packed_setup, wall_s=packed_wall)
    rows[1].update(setup_s=sum(solo_setups), wall_s=sum(solo_walls))
    ratio = {"step_time": packed_step / sum(solo_steps),
             "setup": packed_setup / sum(solo_setups),
             "wall": packed_wall / sum(solo_walls),
             "peak_rss": packed_rss / sum(solo_rss),
             "param_bytes": packed_params / solo_params}
    rows.append({"variant": "ratio packed / solo", "step_s": ratio["step_time"],
                 "setup_s": ratio["setup"], "wall_s": ratio["wall"],
                 "peak_rss_mb": ratio["peak_rss"], "param_mb": ratio["param_bytes"]})
    print(f"LoRA x{args.k} (ranks {[_member(k)['config']['rank'] for k in range(args.k)]}) "
          f"on a random Llama, hidden 576, {args.layers} layers, vocab {args.vocab}, "
          f"seq {args.seq}, micro-batch {args.micro} per member; median of "
          f"{args.repeats}x{args.steps} steps after {args.warmup} warm-up")
    print(table(rows, ["variant", "setup_s", "step_s", "wall_s", "peak_rss_mb", "param_mb"]))
    print(f"base parameters {base_bytes / 2**20:.1f} MiB, held once packed, "
          f"{args.k}x solo; largest per-step loss difference packed vs solo: "
          f"{max(parity.values()):.2e}")
    path = write_json("pack", {
        "settings": {k: v for k, v in vars(args).items() if k not in ("role", "member")},
        "members": [_member(k) for k in range(args.k)],
        "rows": rows, "ratio": ratio, "solo_step_s": solo_steps, "solo_peak_rss_mb": solo_rss,
        "solo_setup_s": solo_setups, "solo_wall_s": solo_walls,
        "base_param_mb": base_bytes / 2**20, "loss_max_abs_diff": parity,
        "runs": {"packed": packed, "solo": solo},
        "command": " ".join(["python -m benchmarks.pack", *sys.argv[1:]]),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
