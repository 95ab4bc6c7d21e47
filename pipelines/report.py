"""The search report: a leaderboard (Markdown) and two plots (PNG, matplotlib).

Input is plain data (one dict per trial: method config, final metrics, metric history), so
the report can be rebuilt from MLflow or from a Tune experiment folder at any time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peft_core.files import atomic_file, atomic_write_text

from .tracking import PHASE_PREFIX, PHASE_SUFFIX
from .tune.objective import Objective, pareto_front


def method_label(method: dict[str, Any]) -> str:
    """``lora(rank=4)``: the name and the hyperparameters that differ from the method's
    defaults (a run's config lists every field; the defaults are noise in a table)."""
    try:
        import peft_core

        defaults = peft_core.MethodConfig.from_dict({"name": method["name"]}).to_dict()
    except Exception:  # an unknown (plugin) method: show what it was given
        defaults = {}
    params = ", ".join(f"{k}={v}" for k, v in sorted(method.items())
                       if k not in ("name", "target_modules", "train_head")
                       and (k not in defaults or defaults[k] != v))
    return f"{method['name']}({params})" if params else method["name"]


def reference(manifest: Any, trials: Sequence[dict[str, Any]], objective: Objective
              ) -> dict[str, Any] | None:
    """What a trial must beat to have learned anything: for classification the accuracy of
    always predicting the eval split's majority class; for language models the eval loss of
    the untrained model (a step-0 evaluation of a method that starts as the identity, i.e.
    the base model itself). None when it is not known."""
    counts = (getattr(manifest, "label_counts", None) or {}).get("eval") or {}
    if objective.metric == "eval_accuracy" and counts and sum(counts.values()):
        name, n = max(counts.items(), key=lambda kv: kv[1])
        return {"name": f"majority class {name!r}", "metric": objective.metric,
                "value": n / sum(counts.values())}
    if objective.metric == "eval_loss":
        import peft_core

        for t in trials:
            method = (t.get("method") or {}).get("name")
            step0 = [v for s, v in (t.get("history") or {}).get("eval_loss", []) if s == 0]
            if step0 and method in peft_core.available() and peft_core.get(method).identity_at_init:
                return {"name": "untrained model", "metric": "eval_loss", "value": step0[0]}
    return None


def beats(value: float | None, ref: dict[str, Any] | None, objective: Objective) -> bool | None:
    if value is None or ref is None or ref.get("metric") != objective.metric:
        return None
    return value > ref["value"] if objective.mode == "max" else value < ref["value"]


def leaderboard(trials: Sequence[dict[str, Any]], objective: Objective,
                ref: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows sorted best first by the objective's metric; trials without it go last. With a
    reference (see :func:`reference`), ``beats_reference`` flags each trial."""
    sign = -1.0 if objective.mode == "max" else 1.0

    def key(t: dict[str, Any]):
        v = t["metrics"].get(objective.metric)
        return (v is None, sign * v if v is not None else 0.0)

    # classification runs: calibration beside the other scores (every trial's final eval
    # has it, so the methods compare; laplace_lora's is its posterior predictive's)
    calibrated = any("eval_ece" in t["metrics"] for t in trials)
    rows = []
    for rank, t in enumerate(sorted(trials, key=key), start=1):
        m = t["metrics"]
        rows.append({
            "rank": rank,
            "trial": t["trial_id"],
            "method": method_label(t["method"]),
            "lr": t.get("lr"),
            "trainable_params": m.get("trainable_params"),
            "trainable_pct": (None if m.get("trainable_fraction") is None
                              else 100 * m["trainable_fraction"]),
            objective.metric: m.get(objective.metric),
            "eval_loss": m.get("eval_loss"),
            **({"eval_nll": m.get("eval_nll"), "eval_ece": m.get("eval_ece"),
                "predictive": predictive(m)} if calibrated else {}),
            "steps": m.get("step"),
            "time_s": t.get("time_s"),
            "status": t.get("status", ""),
            "within_budget": objective.eligible(m),
        })
        if ref is not None:
            rows[-1]["beats_reference"] = beats(m.get(objective.metric), ref, objective)
    return rows


def predictive(metrics: dict[str, Any]) -> str | None:
    """What the trial's final scores were computed from: ``laplace`` (a fitted laplace_lora's
    posterior predictive), ``MAP`` (a laplace_lora scored at its MAP point, e.g. under
    ZeRO-3), ``softmax`` (every other classifier); None without calibration scores."""
    flag = metrics.get("laplace_predictive")
    if flag is not None:
        return "laplace" if flag == 1.0 else "MAP"
    return "softmax" if "eval_ece" in metrics else None


def reference_row(ref: dict[str, Any], columns: Sequence[str]) -> dict[str, Any]:
    """The reference as a leaderboard row (no rank, no parameters trained)."""
    row: dict[str, Any] = {c: None for c in columns}
    row.update({"rank": "ref", "method": ref["name"], ref["metric"]: ref["value"],
                "trainable_params": 0, "status": "reference"})
    return row


# The console keeps its columns (calibration is in report.md): the CLI's table is what the
# README's transcripts show line for line.
CONSOLE_COLUMNS = ("rank", "method", "trainable_params", "trainable_pct", "{metric}",
                   "eval_loss", "time_s", "status")


def console_table(trials: Sequence[dict[str, Any]], objective: Objective,
                  ref: dict[str, Any] | None = None) -> list[str]:
    """The leaderboard as aligned text lines (the CLI's), the reference row last and a
    ``beats_ref`` column when a reference is known."""
    cols = list(dict.fromkeys(c.format(metric=objective.metric) for c in CONSOLE_COLUMNS))
    rows = leaderboard(trials, objective, ref)
    if ref is not None:
        cols.append("beats_reference")
        rows.append(reference_row(ref, cols))
    table = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c)
              for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip() for t in table]
    if ref is not None and any(r.get("beats_reference") is False for r in rows):
        lines.append(f"note: a trial marked 'no' under beats_reference is no better than the "
                     f"{ref['name']} ({objective.metric} {ref['value']:.4g})")
    return lines


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "_no trials_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


UNMEASURED = "unmeasured"


def phase_split(trials: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A search's time by phase: each trial's last reported ``phase_<name>_s`` summed over
    trials, in the order the workers report them, and its share of the trials' wall time
    (Tune's ``time_s``). The ``unmeasured`` row is wall time no phase holds (the last
    report's way to Tune; trials without phases); empty when no trial has phases. The
    members of a pack (``tune.pack``) share its phases and wall time: counted once."""
    totals: dict[str, float] = {}
    wall = measured_wall = 0.0
    packs: set[str] = set()
    for t in trials:
        m = t.get("metrics") or {}
        if m.get("pack") is not None:
            if m["pack"] in packs:
                continue
            packs.add(m["pack"])
        keys = [k for k in m if k.startswith(PHASE_PREFIX) and k.endswith(PHASE_SUFFIX)
                and isinstance(m[k], (int, float))]
        for k in keys:
            name = k[len(PHASE_PREFIX):-len(PHASE_SUFFIX)]
            totals[name] = totals.get(name, 0.0) + float(m[k])
        if t.get("time_s") is not None:
            wall += float(t["time_s"])
            measured_wall += sum(float(m[k]) for k in keys)
    if not totals:
        return []
    rows = [{"phase": name, "seconds": s} for name, s in totals.items()]
    gap = wall - measured_wall
    if wall and gap > 0:
        rows.append({"phase": UNMEASURED, "seconds": gap})
    whole = wall if wall and gap >= 0 else sum(totals.values())
    for r in rows:
        r["share"] = f"{100 * r['seconds'] / whole:.1f}%" if whole else None
    return rows


def plot_pareto(trials: Sequence[dict[str, Any]], objective: Objective, out: Path) -> Path:
    """Quality against trainable-parameter fraction (log x), the Pareto front drawn through."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [dict(t["metrics"], _label=method_label(t["method"]), _name=t["method"]["name"])
           for t in trials if t["metrics"].get(objective.metric) is not None
           and t["metrics"].get("trainable_fraction")]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    names = sorted({p["_name"] for p in pts})
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        sel = [p for p in pts if p["_name"] == name]
        ax.scatter([100 * p["trainable_fraction"] for p in sel], [p[objective.metric] for p in sel],
                   label=name, color=cmap(i % 10), s=46, zorder=3)
    front = pareto_front(pts, objective.metric, objective.mode)
    if front:
        ax.plot([100 * p["trainable_fraction"] for p in front],
                [p[objective.metric] for p in front], "--", color="0.35", lw=1.2, zorder=2,
                label="Pareto front")
    if objective.max_trainable_fraction:
        ax.axvline(100 * objective.max_trainable_fraction, color="tab:red", lw=1, ls=":",
                   label=f"budget {100 * objective.max_trainable_fraction:g}%")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel(objective.metric)
    ax.set_title(f"{objective.metric} against trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, out)


def plot_curves(trials: Sequence[dict[str, Any]], metric: str, out: Path) -> Path:
    """One line per trial: ``metric`` against training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for t in trials:
        hist = [(s, v) for s, v in t.get("history", {}).get(metric, []) if v is not None]
        if hist:
            ax.plot([s for s, _ in hist], [v for _, v in hist], marker="o", ms=3,
                    label=f"{t['trial_id']}: {method_label(t['method'])}")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        with atomic_file(out) as tmp:
            # the temporary name ends in .tmp: matplotlib must be told the format
            fig.savefig(tmp, format=out.suffix.lstrip(".") or None)
    finally:
        plt.close(fig)
    return out


def write_report(trials: Sequence[dict[str, Any]], objective: Objective, out_dir: Path,
                 *, title: str = "peft-pipelines search", champion: dict[str, Any] | None = None,
                 extra: str = "", ref: dict[str, Any] | None = None,
                 label_names: Sequence[str] | None = None) -> Path:
    """``report.md`` + ``quality_vs_params.png`` + ``eval_loss_curves.png`` in ``out_dir``;
    ``ref`` (see :func:`reference`) adds a reference row and flags trials that do not beat it."""
    out_dir = Path(out_dir)
    rows = leaderboard(trials, objective, ref)
    if ref is not None and rows:
        rows.append(reference_row(ref, list(rows[0])))
    pareto = plot_pareto(trials, objective, out_dir / "quality_vs_params.png")
    curves = plot_curves(trials, "eval_loss", out_dir / "eval_loss_curves.png")
    budget = (f", trainable fraction ≤ {100 * objective.max_trainable_fraction:g}%"
              if objective.max_trainable_fraction else "")
    parts = [f"# {title}\n", f"Objective: {objective.mode} `{objective.metric}`{budget}.\n"]
    if label_names:
        parts.append(f"Classes: {', '.join(f'`{n}`' for n in label_names)}.\n")
    if ref is not None:
        parts.append(f"Reference: the {ref['name']} scores {ref['metric']} {ref['value']:.4g}; "
                     f"a trial with `beats_reference` = no learned nothing beyond it.\n")
    parts += ["## Leaderboard\n", markdown_table(rows)]
    split = phase_split(trials)
    if split:
        total = sum(r["seconds"] for r in split)
        parts += ["## Where the time went\n",
                  f"Seconds of {len(trials)} trial(s), {total:.1f} s in all, by phase "
                  "(share of the trials' wall time):\n", markdown_table(split)]
    if champion:
        parts += ["## Champion\n", "".join(f"- {k}: {_fmt(v)}\n" for k, v in champion.items())]
    parts += ["## Plots\n", f"![quality against trainable parameters]({pareto.name})\n",
              f"![eval loss per trial]({curves.name})\n", extra]
    return atomic_write_text(out_dir / "report.md", "\n".join(parts))
