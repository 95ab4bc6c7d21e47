"""Shared by the benchmark scripts: result tables and JSON written atomically."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"machine": machine(), **payload}, f, indent=2)
    os.replace(tmp, path)
    return path


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep, *(line(r) for r in cells)])


# Llama's linear layers, written out because peft has no default for every one of them.
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- real models and data, shared by vs_peft.py and methods.py -------------------------------
# model kind -> the built-in recipe whose model, corpus and data section the benchmarks use
RECIPES = {"minilm": "sentiment_minilm", "smollm2": "qa_smollm2"}
WORK = Path(__file__).resolve().parents[1] / "runs" / "benchmarks"


def bench_env() -> None:
    """The environment every benchmark process runs in (one BLAS thread per process: the
    machine has 2 cores and the runs are compared with each other, not with a tuned setup)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def recipe(kind: str, overrides: list[str] | tuple[str, ...] = ()):
    """The built-in recipe for ``kind`` with its run folder under ``runs/benchmarks``, then
    ``overrides`` (``--set``-style ``key.path=value``)."""
    from pipelines.recipe import load_recipe

    name = RECIPES[kind]
    return load_recipe(name, [f"run_dir={WORK / name}", *overrides])


def dataset(kind: str):
    """The recipe's tokenized dataset (fixed content-hash splits), built once by the data
    stage (Ray Data) and found again in its content-addressed store afterwards."""
    from pipelines.pipeline import prepare_stage

    return prepare_stage(recipe(kind))


def step_peak_mb(fn) -> float:
    """Peak extra memory torch allocates while ``fn()`` runs (activations, gradients,
    optimizer temporaries), from the profiler's allocation events: unlike RSS it is
    per-call, so two models in one process can be measured apart."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


def resident_mb(*objs: Any) -> float:
    """Bytes held by the tensors of modules (parameters, buffers, gradients) and optimizers
    (state), each storage counted once."""
    import torch

    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()

    for o in objs:
        if isinstance(o, torch.nn.Module):
            for p in o.parameters():
                add(p)
                add(p.grad)
            for b in o.buffers():
                add(b)
        elif isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                for v in st.values():
                    add(v)
    return sum(seen.values()) / 2**20


def merged(path: Path, new: list[dict[str, Any]], key: tuple[str, ...], *, merge: bool,
           field: str = "runs") -> tuple[list[dict[str, Any]], list[str]]:
    """With ``merge``: ``new`` records added to those under ``field`` in the JSON at ``path``
    (an old record with the same ``key`` fields is replaced), and the commands that produced
    them all, so a long benchmark can run in parts. Without: ``new`` and this command."""
    import sys

    command = " ".join(["python", str(Path(sys.argv[0]).relative_to(RESULTS.parents[1])
                                      if Path(sys.argv[0]).is_absolute() else sys.argv[0]),
                        *sys.argv[1:]])
    if not merge or not path.is_file():
        return new, [command]
    old = json.loads(path.read_text())
    fresh = {tuple(r[k] for k in key) for r in new}
    kept = [r for r in old.get(field, []) if tuple(r[k] for k in key) not in fresh]
    return kept + new, [*old.get("commands", []), command]
