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


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def promote(
    run_id: str = typer.Option(None, help="MLflow run whose `adapter` artifact to register."),
    search_id: str = typer.Option(None, help="Or: a search id; its best trial is registered."),
    dataset: str = typer.Option(..., help="Dataset folder (manifest.json) whose test split decides."),
    model_name: str = typer.Option("peft-adapter", help="Registered model name."),
    metric: str = typer.Option("eval_accuracy", help="Metric compared on the test split."),
    mode: str = typer.Option("max", help="max or min: which direction is better."),
    margin: float = typer.Option(0.0, help="How much better the candidate must be."),
    run_dir: str = typer.Option("runs", help="Run directory (embedded MLflow store lives here)."),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the run dir)."),
    experiment: str = typer.Option("peft-pipelines", help="MLflow experiment of the search."),
) -> None:
    """Register a winner as `candidate`; move `champion` only if it beats the current one."""
    from pydantic import ValidationError

    from pipelines import promote as promotion
    from pipelines import registry, tracking

    if (run_id is None) == (search_id is None):
        _fail("give exactly one of --run-id or --search-id")
    try:
        rcfg = registry.RegistryConfig(model_name=model_name, metric=metric, mode=mode, margin=margin)
    except ValidationError as e:
        _fail(str(e))
    tcfg = tracking.TrackingConfig(tracking_uri=tracking_uri, experiment=experiment)
    try:
        if search_id is not None:
            client = tracking.client(tcfg, run_dir)
            parent = promotion.find_search(client, tracking.experiment_id(client, tcfg, run_dir), search_id)
            run_id = parent.data.tags.get("peftpipe.best_run_id")
            if not run_id:
                _fail(f"search {search_id!r} has no eligible best trial to promote")
        decision = promotion.promote(run_id=run_id, manifest=dataset, config=rcfg,
                                     tracking_config=tcfg, run_dir=run_dir)
    except (promotion.PromotionError, registry.RegistryError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    verb = "promoted to champion" if decision.promoted else "kept as candidate"
    typer.echo(f"{model_name} v{decision.version} {verb}: {decision.reason}")


@app.command()
def rollback(
    model_name: str = typer.Argument(..., help="Registered model name."),
    run_dir: str = typer.Option("runs", help="Run directory (embedded MLflow store lives here)."),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI."),
) -> None:
    """Move the `champion` alias back to the version it replaced."""
    from mlflow.exceptions import MlflowException

    from pipelines import registry, tracking

    client = tracking.client(tracking.TrackingConfig(tracking_uri=tracking_uri), run_dir)
    try:
        d = registry.rollback(client, model_name)
    except (registry.RegistryError, MlflowException) as e:
        _fail(str(e))
    typer.echo(f"{model_name}: {d.reason}")


@app.command()
def predict(
    model: str = typer.Option(..., help="models:/NAME@ALIAS, models:/NAME/VERSION or an adapter folder."),
    text: list[str] = typer.Option(..., help="Text to classify (repeat for several)."),
    run_dir: str = typer.Option("runs", help="Run directory (embedded MLflow store lives here)."),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI."),
) -> None:
    """Classify texts with a registered (or saved) classification adapter."""
    from pipelines import serve

    for row in _serve(model, run_dir, tracking_uri, lambda a: serve.predict(a, text)):
        typer.echo(json.dumps(row))


@app.command()
def generate(
    model: str = typer.Option(..., help="models:/NAME@ALIAS, models:/NAME/VERSION or an adapter folder."),
    prompt: str = typer.Option(..., help="The prompt."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate."),
    run_dir: str = typer.Option("runs", help="Run directory (embedded MLflow store lives here)."),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI."),
) -> None:
    """Complete a prompt with a registered (or saved) causal-LM adapter."""
    from pipelines import serve

    typer.echo(_serve(model, run_dir, tracking_uri,
                      lambda a: serve.generate(a, prompt, max_new_tokens=max_new_tokens)))


def _serve(model: str, run_dir: str, tracking_uri: str | None, call):
    """Load ``model`` (folder or registry URI) and run ``call`` on it; any failure becomes
    one clear line and exit code 2."""
    from pipelines import serve, tracking

    uri = tracking.resolve_uri(tracking.TrackingConfig(tracking_uri=tracking_uri), run_dir)
    try:
        return call(serve.load(model, tracking_uri=uri))
    except Exception as e:  # one clear line for the user, whatever failed
        _fail(str(e))


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
