"""CoDA inference speed: the FFN on k = 1/4 of the tokens against a parallel adapter.

Same random Llama (wide enough for the FFN to dominate), same bottleneck size, same process;
forward passes are interleaved (base, parallel, coda, base, ...) so machine noise hits every
variant alike, and the table shows medians and the ratio CoDA / parallel adapter. The FFN
token count is measured with forward hooks, not assumed.

    python -m benchmarks.coda_inference [--hidden 512 --intermediate 2048 --layers 4 --seq 256]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

from benchmarks._common import table, write_json


def _model(args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
        max_position_embeddings=args.seq,
    )
    return LlamaForCausalLM(cfg).eval()


def _ffn_token_counter(model) -> list[int]:
    """Counts the tokens entering every FFN (the Llama MLP), whatever wraps it."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    seen = [0]
    for m in model.modules():
        if isinstance(m, LlamaMLP):
            m.register_forward_hook(
                lambda mod, a, out: seen.__setitem__(0, seen[0] + a[0].shape[:-1].numel()))
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    # A small vocabulary keeps the LM head from hiding the FFN's share of the time.
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--bottleneck", type=int, default=32)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    import peft_core

    torch.set_num_threads(args.threads)
    base = _model(args)
    variants = {
        "base (no adapter)": base,
        "adapter_parallel": peft_core.apply(copy.deepcopy(base), {
            "name": "adapter_parallel", "bottleneck": args.bottleneck}),
        "coda": peft_core.apply(copy.deepcopy(base), {
            "name": "coda", "bottleneck": args.bottleneck, "route_fraction": args.fraction}),
    }
    counters = {}
    for name, m in variants.items():
        m.to(args.device).eval()
        counters[name] = _ffn_token_counter(m)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    mask = torch.ones_like(ids)

    def run(m) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            m(input_ids=ids, attention_mask=mask)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    times: dict[str, list[float]] = {n: [] for n in variants}
    for i in range(args.warmup + args.repeats):
        for name, m in variants.items():
            counters[name][0] = 0
            dt = run(m)
            if i >= args.warmup:
                times[name].append(dt)
    tokens = args.batch * args.seq
    par = statistics.median(times["adapter_parallel"])
    rows = []
    for name in variants:
        med = statistics.median(times[name])
        rows.append({
            "variant": name,
            "median_ms": 1000 * med,
            "min_ms": 1000 * min(times[name]),
            "tokens_per_s": tokens / med,
            "ffn_tokens_per_layer": counters[name][0] / args.layers,
            "ratio_vs_parallel": med / par,
        })
    cols = list(rows[0])
    print(table(rows, cols))
    coda = statistics.median(times["coda"])
    print(f"\nCoDA (k = {args.fraction:g} of {args.seq} tokens) / parallel adapter: "
          f"{coda / par:.3f} (speed-up {par / coda:.2f}x)")
    path = write_json("coda_inference", {
        "config": vars(args) | {"out": str(args.out) if args.out else None},
        "rows": rows,
        "times_s": times,
        "coda_over_parallel": coda / par,
        "speedup": par / coda,
    }, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
