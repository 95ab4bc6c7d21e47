"""``peftpipe``: the command line of peft-pipelines (one sub-command per stage)."""

from __future__ import annotations

import copy
import json
import os
import sys
from typing import NoReturn

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune with parameter-efficient methods on Ray, search methods and ranks, "
    "register the winner in MLflow.",
)


RECIPE_ARG = typer.Argument(..., help="A recipe YAML file, or the name of a built-in recipe "
                            "(demo, sentiment_minilm, qa_smollm2, llama_lora_zero3).")
SET_OPT = typer.Option(None, "--set", help="Override a recipe field: key.path=value "
                       "(value parsed as YAML; repeat for several).")
ADDRESS_OPT = typer.Option(None, help="Ray cluster to run on (auto, HOST:PORT, ray://HOST:10001); "
                           "default: the recipe's ray.address, else a local Ray started for the job.")


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


def _fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, no traceback: 2 for bad input, 1 for a job that ran and failed."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def promote(
    recipe: str = typer.Argument(None, help="A recipe: register the best trial of its last "
                                 "search (its registry section decides). Or use the options."),
    set_: list[str] = SET_OPT,
    run_id: str = typer.Option(None, help="MLflow run whose `adapter` artifact to register."),
    search_id: str = typer.Option(None, help="Or: a search id; its best trial is registered."),
    dataset: str = typer.Option(None, help="Dataset folder (manifest.json) whose test split decides."),
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

    if recipe is not None:
        return _promote_recipe(recipe, set_)
    if (run_id is None) == (search_id is None):
        _fail("give a recipe, or exactly one of --run-id or --search-id")
    if dataset is None:
        _fail("--dataset: the dataset folder whose test split decides is required")
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


def _promote_recipe(recipe: str, set_: list[str] | None) -> None:
    from pipelines import pipeline, registry
    from pipelines.promote import PromotionError
    from pipelines.recipe import RecipeError

    r = _recipe(recipe, set_)
    try:
        trials = pipeline.load_trials(r)
        manifest = pipeline.prepare_stage(r)  # found by its content id, not rebuilt
        d = pipeline.promote_stage(r, manifest, trials)
    except (RecipeError, PromotionError, registry.RegistryError) as e:
        _fail(str(e))
    except pipeline.NoWinnerError as e:
        _fail(str(e), code=1)
    verb = "promoted to champion" if d.promoted else "kept as candidate"
    typer.echo(f"{d.model_name} v{d.version} {verb}: {d.reason}")


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


# -- the main job and its stages -------------------------------------------------------------

def _recipe(path: str, overrides: list[str] | None):
    from pipelines.recipe import RecipeError, load_recipe

    try:
        return load_recipe(path, overrides or [])
    except RecipeError as e:
        _fail(str(e))


def _stage(recipe, address: str | None, body):
    """Run ``body()`` inside the job's Ray session; input errors found on the way (before
    any worker starts) exit 2, failures of the run itself exit 1."""
    from pydantic import ValidationError

    from pipelines import pipeline
    from pipelines.recipe import RecipeError, format_errors
    from pipelines.train.data import DatasetError
    from pipelines.tune.stage import ResourceError

    pipeline.log_to_file(recipe)
    try:
        with pipeline.ray_session(recipe, address):
            return body()
    except ValidationError as e:
        _fail(format_errors(e))
    except (RecipeError, ResourceError, DatasetError) as e:
        _fail(str(e))


@app.command()
def run(recipe: str = RECIPE_ARG, set_: list[str] = SET_OPT, address: str = ADDRESS_OPT,
        quiet: bool = typer.Option(False, help="No per-trial status lines.")) -> None:
    """Run the whole job: prepare -> search -> promote -> report."""
    from pipelines import pipeline, registry
    from pipelines.promote import PromotionError

    r = _recipe(recipe, set_)
    typer.echo(f"peftpipe run {r.name}: model {r.model}, run dir {r.run_dir}")
    try:
        # the whole job runs inside _stage's Ray session (pipeline.run's own is then a no-op)
        out = _stage(r, address, lambda: pipeline.run(r, address=address, verbose=not quiet))
    except (pipeline.NoWinnerError, PromotionError, registry.RegistryError) as e:
        _fail(str(e), code=1)
    manifest, search, decision = out.manifest, out.search, out.decision
    _say_dataset(manifest)
    _print_leaderboard(r, search)
    verb = "is the new champion" if decision.promoted else "stays a candidate"
    score = "" if decision.candidate_score is None else \
        f" (test {r.registry.metric} {decision.candidate_score:.4f})"
    typer.echo(f"\n{r.registry.model_name} v{decision.version}{score} {verb}: {decision.reason}")
    typer.echo(f"report:  {out.report}  (+ quality_vs_params.png, eval_loss_curves.png)")
    uri = search.tracking_uri if hasattr(search, "tracking_uri") else search["tracking_uri"]
    typer.echo(f"MLflow:  mlflow ui --backend-store-uri {uri}")
    use = "predict --text 'a wonderful film'" if manifest.task == "classification" else \
        "generate --prompt 'Hello, who are you?'"
    typer.echo(f"serve:   peftpipe {use} --model models:/{r.registry.model_name}@champion "
               f"--run-dir {r.run_dir}")


def _say_dataset(m) -> None:
    hit = " (reused)" if getattr(m, "cache_hit", False) else ""
    typer.echo(f"dataset {m.dataset_id}{hit}: rows {m.rows}, rejected {m.rejected}")


def _print_leaderboard(r, search) -> None:
    from pipelines import report
    from pipelines.tune import Objective

    data = search if isinstance(search, dict) else {"trials": search.trials}
    objective = r.tune.objective if r.tune else Objective(metric=r.registry.metric,
                                                            mode=r.registry.mode)
    rows = report.leaderboard(data["trials"], objective)
    cols = ["rank", "method", "trainable_params", "trainable_pct", objective.metric,
            "eval_loss", "time_s", "status"]
    table = [[report._fmt(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c)
              for i, c in enumerate(cols)]
    typer.echo("\nleaderboard")
    typer.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in table:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(t, widths)))


@app.command()
def prepare(recipe: str = RECIPE_ARG, set_: list[str] = SET_OPT,
            address: str = ADDRESS_OPT) -> None:
    """Tokenize the recipe's corpora with Ray Data (reused when unchanged)."""
    from pipelines import pipeline

    r = _recipe(recipe, set_)
    m = _stage(r, address, lambda: pipeline.prepare_stage(r))
    _say_dataset(m)
    typer.echo(m.path)


@app.command()
def train(recipe: str = RECIPE_ARG, set_: list[str] = SET_OPT, address: str = ADDRESS_OPT) -> None:
    """One training run of the recipe's train.method (tracked in MLflow)."""
    _search_command(recipe, set_, address, single=True)


@app.command()
def tune(recipe: str = RECIPE_ARG, set_: list[str] = SET_OPT, address: str = ADDRESS_OPT) -> None:
    """The recipe's search over methods and hyperparameters (tracked in MLflow)."""
    _search_command(recipe, set_, address, single=False)


def _search_command(recipe: str, set_: list[str] | None, address: str | None, single: bool) -> None:
    from pipelines import pipeline

    r = _recipe(recipe, set_)
    if not single and r.tune is None:
        _fail(f"tune: recipe {recipe!r} has no tune section")

    def body():
        m = pipeline.prepare_stage(r)
        stage = pipeline.train_stage if single else pipeline.tune_stage
        return stage(r, m)

    res = _stage(r, address, body)
    _print_leaderboard(r, res)
    typer.echo(f"trials: {r.run_dir}/{pipeline.TRIALS_FILE}")


@app.command()
def report(recipe: str = RECIPE_ARG, set_: list[str] = SET_OPT) -> None:
    """Write report.md and the plots from the recipe's last search."""
    from pipelines import pipeline
    from pipelines.recipe import RecipeError

    r = _recipe(recipe, set_)
    try:
        path = pipeline.report_stage(r)
    except RecipeError as e:
        _fail(str(e))
    typer.echo(path)


@app.command()
def demo() -> None:
    """The built-in recipe end to end (same as `peftpipe run demo`)."""
    run(recipe="demo", set_=None, address=None, quiet=False)


from cluster.cli import cluster_app, submit  # noqa: E402

app.add_typer(cluster_app, name="cluster")
app.command()(submit)


def main() -> None:
    # Library load reports ("newly initialized head ...") are expected here, not news.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(app())


if __name__ == "__main__":
    main()
