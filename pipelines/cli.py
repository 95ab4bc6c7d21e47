"""``peftpipe``: the command line of peft-pipelines (one sub-command per stage)."""

from __future__ import annotations

import copy
import json
import os
import sys

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune with parameter-efficient methods on Ray, search methods and ranks, "
    "register the winner in MLflow.",
)


@app.command()
def methods(
    model: str = typer.Option(
        None, help="Also count trainable parameters of each method on this base model "
        "(builtin:minilm, builtin:smollm2, a folder or hub id)."
    ),
    task: str = typer.Option(
        None, help="classification or causal_lm (default: classification for encoders)."
    ),
    num_labels: int = typer.Option(2, help="Classes of the classification head."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the registered PEFT methods (and their parameter cost on a model)."""
    import peft_core

    rows = []
    base = None
    if model:
        from pipelines import models

        if task is None:
            task = "classification" if "minilm" in model else "causal_lm"
        base = models.load_model(model, task, num_labels=num_labels)
    for name in peft_core.available():
        cls = peft_core.get(name)
        row = {"method": name, "family": cls.family, "mergeable": cls.mergeable}
        if base is not None:
            try:
                pm = peft_core.apply(copy.deepcopy(base), {"name": name})
                s = pm.summary()
                row.update(trainable_params=s["trainable_params"],
                           trainable_pct=round(100 * s["trainable_fraction"], 4))
                formula = getattr(pm.method, "expected_trainable_params", None)
                if formula is not None:
                    # Methods that document a closed form: show it beside the count.
                    row["formula"] = formula(base)
            except peft_core.PeftError as e:
                row.update(trainable_params=None, trainable_pct=None, error=str(e))
        rows.append(row)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    cols = list(rows[0]) if rows else []
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    typer.echo("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        typer.echo("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


@app.command()
def demo() -> None:
    """Run the built-in demo recipe end to end."""
    typer.echo(
        "peftpipe demo: the end-to-end pipeline (prepare -> search -> promote) is being built.\n"
        "Once the stages land, this runs the built-in recipe: MiniLM on the movie-review\n"
        "sentiment data, a Ray Tune search over LoRA, LoRA+, adapters and soft prompts, and\n"
        "registration of the winner in a local MLflow registry. Today it lists the methods:\n"
    )
    methods(model=None, task=None, num_labels=2, as_json=False)


def main() -> None:
    # Library load reports ("newly initialized head ...") are expected here, not news.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(app())


if __name__ == "__main__":
    main()
