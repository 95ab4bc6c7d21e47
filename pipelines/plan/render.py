"""A :class:`~.result.Plan` as the table ``peftpipe plan`` prints (GiB per rank)."""

from __future__ import annotations

from .result import Plan


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f}"


def format_plan(p: Plan) -> str:
    """The plan as the table ``peftpipe plan`` prints (GiB per rank)."""
    where = (f"{p.world_size} GPU(s) on {p.nodes} node(s), {_gib(p.device_mem)} GiB each"
             if p.device == "cuda" else
             f"{p.world_size} CPU rank(s) (train.num_workers), {_gib(p.device_mem)} GiB RAM each")
    lines = [
        f"model {p.model} ({p.architecture}): {p.base_params / 1e9:.3f}B parameters; "
        f"{p.method} trains {p.trainable_params:,} "
        f"({100 * p.trainable_params / max(1, p.total_params):.3f}%, "
        f"{p.trainable_source})",
        f"{where}; {p.precision}; micro-batch {p.micro_batch_size} x {p.max_length} tokens; "
        f"gradient checkpointing {'on' if p.gradient_checkpointing else 'off'}",
        "",
        "GiB per rank" + (" (device)" if p.device == "cuda" else " (RSS)"),
    ]
    cols = ["zero", "offload", "base", "trainable", "grads", "optim", "buffers", "activ",
            *(["heap"] if p.device == "cpu" else []), "overhead", "load", "peak", "host", "fits"]
    rows = []
    for c in p.choices:
        mark = "*" if (c.stage, c.offload) == p.recipe_choice else ""
        rows.append([f"{c.stage}{mark}", c.offload, _gib(c.base_params), _gib(c.trainable_params),
                     _gib(c.gradients), _gib(c.optimizer_states), _gib(c.zero_buffers),
                     _gib(c.activations), *([_gib(c.heap_retained)] if p.device == "cpu" else []),
                     _gib(c.overhead), _gib(c.load_peak), _gib(c.peak),
                     _gib(c.host), "yes" if c.fits else "no"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(cols)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(cols, widths)))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines.append("")
    lines.append("* the recipe's train.zero; peak = overhead + max(load, the training terms); "
                 "host = RAM per rank that offload uses")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
