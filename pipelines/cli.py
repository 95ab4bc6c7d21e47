"""The stage commands of ``peftpipe`` (one sub-command per stage). ``python -m pipelines.cli``
runs them alone (the Ray Job entrypoint does); :mod:`peftpipe` adds the cluster commands."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn

import typer

from pipelines.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    InputError,
    PeftPipeError,
    exit_code,
)

if TYPE_CHECKING:  # annotations only: the commands import what they run when they run
    from pipelines.data.manifest import Manifest
    from pipelines.recipe import Recipe
    from pipelines.tune import SearchResult

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
                           "default: the recipe's ray.address, else a local Ray started for the "
                           "job.")


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
                formula = pm.method.expected_trainable_params  # a Method hook, None by default
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


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """``error:`` lines on stderr, no traceback: 2 for bad input (or a request the cluster
    cannot hold), 1 for a job that ran and failed (the traceback goes to the run's log
    file), 130 for a job stopped by SIGINT or SIGTERM (:func:`pipelines.errors.exit_code`
    picks the code of an error)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


VERBOSE_OPT = typer.Option(False, "--verbose", help="Also show Ray's own log lines, Ray Data "
                           "progress and worker output (always in run_dir/logs).")


@app.command()
def promote(
    recipe: str = typer.Argument(None, help="A recipe: register the best trial of its last "
                                 "search (its registry section decides). Or use the options."),
    set_: list[str] = SET_OPT,
    run_id: str = typer.Option(None, help="MLflow run whose `adapter` artifact to register."),
    search_id: str = typer.Option(None, help="Or: a search id; its best trial is registered."),
    dataset: str = typer.Option(None, help="Dataset folder (manifest.json) whose test split "
                                "decides."),
    model_name: str = typer.Option("peft-adapter", help="Registered model name."),
    metric: str = typer.Option("eval_accuracy", help="Metric compared on the test split."),
    mode: str = typer.Option("max", help="max or min: which direction is better."),
    margin: float = typer.Option(0.0, help="How much better the candidate must be."),
    run_dir: str = typer.Option("runs", help="Run directory (embedded MLflow store lives here)."),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI (default: "
                                     "$MLFLOW_TRACKING_URI or the run dir)."),
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
        rcfg = registry.RegistryConfig(model_name=model_name, metric=metric, mode=mode,
                                       margin=margin)
    except ValidationError as e:
        _fail(str(e))
    tcfg = tracking.TrackingConfig(tracking_uri=tracking_uri, experiment=experiment)
    try:
        if search_id is not None:
            client = tracking.client(tcfg, run_dir)
            exp = tracking.experiment_id(client, tcfg, run_dir)
            parent = promotion.find_search(client, exp, search_id)
            run_id = parent.data.tags.get("peftpipe.best_run_id")
            if not run_id:
                _fail(f"search {search_id!r} has no eligible best trial to promote")
        decision = promotion.promote(run_id=run_id, manifest=dataset, config=rcfg,
                                     tracking_config=tcfg, run_dir=run_dir)
    except (InputError, FileNotFoundError, ValueError) as e:  # ours, and a missing/bad dataset
        _fail(str(e))
    verb = "promoted to champion" if decision.promoted else "kept as candidate"
    typer.echo(f"{model_name} v{decision.version} {verb}: {decision.reason}")


def _promote_recipe(recipe: str, set_: list[str] | None) -> None:
    from pipelines import pipeline

    r = _recipe(recipe, set_)
    try:
        trials = pipeline.load_trials(r)
        manifest = pipeline.prepare_stage(r)  # found by its content id, not rebuilt
        d = pipeline.promote_stage(r, manifest, trials)
    except PeftPipeError as e:  # input (recipe, data, registry...) 2; NoWinnerError 1
        _fail(str(e), code=exit_code(e))
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
    except (InputError, MlflowException) as e:
        _fail(str(e))
    typer.echo(f"{model_name}: {d.reason}")


@app.command()
def predict(
    model: str = typer.Option(..., help="models:/NAME@ALIAS, models:/NAME/VERSION or an "
                              "adapter folder."),
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
    model: str = typer.Option(..., help="models:/NAME@ALIAS, models:/NAME/VERSION or an "
                              "adapter folder."),
    prompt: str = typer.Option(..., help="The prompt."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate."),
    run_dir: str = typer.Option("runs", help="Run directory (embedded MLflow store lives here)."),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI."),
) -> None:
    """Complete a prompt with a registered (or saved) causal-LM adapter."""
    from pipelines import serve

    typer.echo(_serve(model, run_dir, tracking_uri,
                      lambda a: serve.generate(a, prompt, max_new_tokens=max_new_tokens)))


@app.command("serve")
def serve_command(
    model: str = typer.Option(..., help="models:/NAME@ALIAS (followed as the alias moves) or "
                              "models:/NAME/VERSION."),
    address: str = ADDRESS_OPT,
    replicas: int = typer.Option(1, min=1, help="Model replicas (one base model each)."),
    host: str = typer.Option("127.0.0.1", help="HTTP host."),
    port: int = typer.Option(8000, help="HTTP port."),
    max_adapters: int = typer.Option(4, min=1, help="Adapters kept per replica (LRU)."),
    max_batch_size: int = typer.Option(16, min=1, help="Dynamic batching: most requests per "
                                       "batch (1: unbatched)."),
    replica_cpus: float = typer.Option(1.0, help="CPUs reserved per replica."),
    run_dir: str = typer.Option("runs", help="Run directory (embedded MLflow store lives here)."),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI."),
) -> None:
    """Serve a registered model over HTTP with Ray Serve (/predict, /v1/completions,
    /v1/chat/completions, /health), following its alias."""
    import time

    from pipelines import registry, tracking
    from pipelines.serve import app as serve_app

    try:
        registry.parse_model_uri(model)
    except InputError as e:
        _fail(str(e))
    uri = tracking.resolve_uri(tracking.TrackingConfig(tracking_uri=tracking_uri), run_dir)
    settings = serve_app.ServeSettings(model=model, tracking_uri=uri, replicas=replicas,
                                       max_adapters=max_adapters, max_batch_size=max_batch_size,
                                       replica_cpus=replica_cpus)
    from pipelines.ray_runtime import ensure_ray

    ensure_ray(address, logging_level="ERROR")
    try:
        url = serve_app.start(settings, host=host, port=port)
    except (InputError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    import urllib.request

    with urllib.request.urlopen(url + "/health", timeout=60) as r:
        health = json.loads(r.read())
    paths = "/predict" if health["task"] == "classification" else \
        "/v1/completions, /v1/chat/completions"
    typer.echo(f"serving {model} v{health['version']} at {url} ({paths}, /health); Ctrl-C stops")
    # A service manager (or `kill`) stops with SIGTERM, and a background job's SIGINT may be
    # ignored: both must still delete the app, as Ctrl-C does.
    import signal

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve_app.stop()


@app.command("export")
def export_command(
    model: str = typer.Argument(..., help="models:/NAME@ALIAS, models:/NAME/VERSION or an "
                                "adapter folder."),
    dst: str = typer.Argument(..., help="Folder to write (replaced atomically)."),
    fmt: str = typer.Option(..., "--format", help="peft (Hugging Face peft folder), merged (full "
                            "weights, methods that merge) or vllm (LoRA folder + vllm.json)."),
    run_dir: str = typer.Option("runs", help="Run directory (embedded MLflow store lives here)."),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI."),
) -> None:
    """Export a registered adapter for another server; refused with the reason when its
    method cannot be loaded there."""
    import tempfile
    from pathlib import Path

    from pipelines import registry, tracking
    from pipelines.serve import export as exporter

    try:
        folder = Path(model)
        if model.startswith("models:/"):
            uri = tracking.resolve_uri(tracking.TrackingConfig(tracking_uri=tracking_uri), run_dir)
            client = tracking.client(tracking.TrackingConfig(tracking_uri=uri), run_dir)
            _, folder = registry.download(client, model,
                                          tempfile.mkdtemp(prefix="peftpipe-export-"))
        elif not folder.is_dir():
            _fail(f"model: {model!r} is neither a models:/ URI nor a folder")
        out = exporter.export(folder, fmt, dst, name=model.rsplit("/", 1)[-1].replace("@", "-"))
    except (InputError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"{model} exported as {fmt}: {out}")


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
    from pipelines.recipe import load_recipe

    try:
        r = load_recipe(path, overrides or [])
    except InputError as e:
        _fail(str(e))
    for note in r.notes:
        typer.echo(f"note: {note}", err=True)
    return r


def _stage(recipe, address: str | None, body, stage: str | None = None,
           verbose: bool = False, failures: tuple = ()):
    """Run ``body()`` inside the job's Ray session; input errors found on the way (an
    :class:`~pipelines.errors.InputError`: recipe, data, resources, before any worker
    starts) exit 2, failures of the run itself exit 1 (``failures``: errors the caller
    handles itself, passed through untouched); either way the traceback goes to
    ``run_dir/logs/peftpipe.log``, not to the console."""
    import logging

    from pydantic import ValidationError

    from pipelines import pipeline
    from pipelines.recipe import format_errors

    log_path = pipeline.log_to_file(recipe)
    log = logging.getLogger("pipelines.cli")
    try:
        with _sigterm_interrupts(), pipeline.ray_session(recipe, address, stage=stage,
                                                         verbose=verbose):
            return body()
    except KeyboardInterrupt as e:  # Ctrl-C, `kill`, `ray job stop` (a search's runs are ended)
        log.warning("interrupted", exc_info=True)
        _fail(str(e) or "interrupted", code=EXIT_INTERRUPTED)
    except pipeline.TrialsFailedError as e:
        log.error("trials failed", exc_info=True)
        _fail(f"{e}\n  (trial errors in {log_path.parent}/ray and the trials' error.txt)",
              code=EXIT_FAILED)
    except ValidationError as e:
        log.error("input error", exc_info=True)
        _fail(format_errors(e))
    except failures:
        raise
    except Exception as e:
        if exit_code(e) == EXIT_BAD_INPUT:  # an InputError (or peft_core's PeftError)
            log.error("input error", exc_info=True)
            _fail(str(e))
        # the job started and failed: one line, the rest in the log
        log.error("the job failed", exc_info=True)
        _fail(f"{type(e).__name__}: {e}\n  (traceback in {log_path})", code=EXIT_FAILED)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, a service manager, ``ray job stop``) interrupts the job as Ctrl-C
    does, so it ends the same way: runs closed, exit 130 (a search handles both itself
    while its trials run, see :mod:`pipelines.tune.stage`)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@app.command()
def run(recipe: str = RECIPE_ARG, set_: list[str] = SET_OPT, address: str = ADDRESS_OPT,
        quiet: bool = typer.Option(False, help="No per-trial status lines."),
        verbose: bool = VERBOSE_OPT) -> None:
    """Run the whole job: prepare -> search -> promote -> report."""
    from pipelines import pipeline, registry
    from pipelines.promote import PromotionError

    r = _recipe(recipe, set_)
    typer.echo(f"peftpipe run {r.name}: model {r.model}, run dir {r.run_dir}")
    # The promote step's errors: no winner (a JobError), and the registry's and promotion's
    # input errors, which exit 2 when `promote` runs alone on what the user names but here
    # concern a candidate this job's own search made: a failure of the job, exit 1, its
    # line only (no traceback in the log).
    promote_failures = (pipeline.NoWinnerError, PromotionError, registry.RegistryError)
    try:
        # the whole job runs inside _stage's Ray session (pipeline.run's own is then a no-op)
        out = _stage(r, address, lambda: pipeline.run(
            r, address=address, verbose=not quiet, on_dataset=_say_dataset, ray_verbose=verbose),
            verbose=verbose, failures=promote_failures)
    except promote_failures as e:
        _fail(str(e), code=EXIT_FAILED)
    manifest, search, decision = out.manifest, out.search, out.decision
    _print_leaderboard(r, search)
    verb = "is the new champion" if decision.promoted else "stays a candidate"
    score = "" if decision.candidate_score is None else \
        f" (test {r.registry.metric} {decision.candidate_score:.4f})"
    typer.echo(f"\n{r.registry.model_name} v{decision.version}{score} {verb}: {decision.reason}")
    typer.echo(f"report:  {out.report}  (+ quality_vs_params.png, eval_loss_curves.png)")
    typer.echo(f"MLflow:  {_mlflow_hint(search.tracking_uri)}")
    use = _serve_hint(manifest)
    typer.echo(f"serve:   peftpipe {use} --model models:/{r.registry.model_name}@champion "
               f"--run-dir {r.run_dir}")


def _mlflow_hint(uri: str) -> str:
    """How to look at the runs: a tracking server is already a UI to open; a local store
    needs ``mlflow ui`` started on it."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} (the tracking server's UI)"
    return f"mlflow ui --backend-store-uri {uri}"


def _say_dataset(m: Manifest) -> None:
    """Rows kept per split, rejected by reason, duplicates found, and where the rejects are."""
    hit = " (reused)" if m.cache_hit else ""
    kept = sum(m.rows.values())
    splits = ", ".join(f"{s} {n}" for s, n in m.rows.items())
    line = f"dataset {m.dataset_id}{hit}: {kept} rows kept ({splits}); {m.rejected} rejected"
    if m.rejected:
        kinds = ", ".join(f"{n} {k}" for k, n in m.rejected_by_kind.items())
        line += f" ({kinds}; see {m.path}/rejects.jsonl)"
    dups, dropped = m.duplicates, m.duplicates_dropped
    if dropped:
        line += f"; {dups} duplicates found and dropped"
    elif dups:
        line += f"; {dups} duplicates found and kept (data.dedup: true drops them)"
    else:
        line += "; 0 duplicates"
    full = m.rows_at_max_length
    if full:
        line += f"; {full} rows fill max_length {m.max_length} (longer inputs were cut there)"
    typer.echo(line)
    if m.label_names:
        typer.echo(f"classes: {', '.join(m.label_names)}")
    chat = m.template.get("chat_format")
    if chat:
        split = ", ".join(f"{s} {n}" for s, n in m.trained_tokens.items())
        typer.echo(f"conversations ({chat}, train_on {m.template.get('train_on')}): "
                   f"{sum(m.trained_tokens.values())} tokens trained ({split})")


def _serve_hint(m: Manifest) -> str:
    """The serve command for this dataset's model, on an input of its own eval split."""
    import shlex

    example = m.examples.get("eval") or m.examples.get("test") or m.examples.get("train")
    if m.task == "classification":
        return f"predict --text {shlex.quote(example or 'some text')}"
    return f"generate --prompt {shlex.quote(example or 'Hello, who are you?')}"


def _print_leaderboard(r: Recipe, search: SearchResult) -> None:
    from pipelines import pipeline, report

    typer.echo("\nleaderboard")
    for line in report.console_table(search.trials, pipeline.objective_of(r, search),
                                     search.reference):
        typer.echo(line)


@app.command()
def prepare(recipe: str = RECIPE_ARG, set_: list[str] = SET_OPT,
            address: str = ADDRESS_OPT, verbose: bool = VERBOSE_OPT) -> None:
    """Tokenize the recipe's corpora with Ray Data (reused when unchanged)."""
    from pipelines import pipeline

    r = _recipe(recipe, set_)
    m = _stage(r, address, lambda: pipeline.prepare_stage(r), stage="data", verbose=verbose)
    _say_dataset(m)
    typer.echo(m.path)


@app.command()
def train(recipe: str = RECIPE_ARG, set_: list[str] = SET_OPT, address: str = ADDRESS_OPT,
          verbose: bool = VERBOSE_OPT) -> None:
    """One training run of the recipe's train.method (tracked in MLflow)."""
    _search_command(recipe, set_, address, single=True, verbose=verbose)


@app.command()
def tune(recipe: str = RECIPE_ARG, set_: list[str] = SET_OPT, address: str = ADDRESS_OPT,
         verbose: bool = VERBOSE_OPT) -> None:
    """The recipe's search over methods and hyperparameters (tracked in MLflow)."""
    _search_command(recipe, set_, address, single=False, verbose=verbose)


def _search_command(recipe: str, set_: list[str] | None, address: str | None, single: bool,
                    verbose: bool = False) -> None:
    from pipelines import pipeline

    r = _recipe(recipe, set_)
    if not single and r.tune is None:
        _fail(f"tune: recipe {recipe!r} has no tune section")

    def body():
        m = pipeline.prepare_stage(r)
        _say_dataset(m)
        stage = pipeline.train_stage if single else pipeline.tune_stage
        return stage(r, m)

    res = _stage(r, address, body, stage="train" if single else "tune", verbose=verbose)
    _print_leaderboard(r, res)
    typer.echo(f"trials: {r.run_dir}/{pipeline.TRIALS_FILE}")


@app.command()
def report(recipe: str = RECIPE_ARG, set_: list[str] = SET_OPT) -> None:
    """Write report.md and the plots from the recipe's last search."""
    from pipelines import pipeline

    r = _recipe(recipe, set_)
    try:
        path = pipeline.report_stage(r)
    except InputError as e:
        _fail(str(e))
    typer.echo(path)


@app.command()
def plan(
    recipe: str = RECIPE_ARG,
    set_: list[str] = SET_OPT,
    gpus: int = typer.Option(None, help="Total GPUs of the run (default: plan the recipe's "
                             "train.num_workers CPU processes)."),
    gpu_mem: str = typer.Option(None, help="Memory of one GPU (one process on CPU): 80GB "
                                "(10^9 bytes), 80GiB (2^30), 512MB, ... (CPU default: this "
                                "machine's RAM over the ranks)."),
    nodes: int = typer.Option(None, help="Nodes the GPUs are spread over (default 1)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Predict per-device memory for each ZeRO stage and offload choice (no weights loaded)."""
    from pipelines import plan as planner
    from pipelines.recipe import load_recipe

    try:
        # Paths are not checked: a plan needs the model's config, not the data.
        r = load_recipe(recipe, set_ or [], check_paths=False)
        mem = planner.parse_size(gpu_mem) if gpu_mem is not None else None
        p = planner.plan(r, gpus=gpus, gpu_mem_bytes=mem, nodes=nodes)
    except InputError as e:  # RecipeError, PlanError
        _fail(str(e))
    typer.echo(json.dumps(p.to_dict(), indent=2) if as_json else planner.format_plan(p))


@app.command()
def demo() -> None:
    """The built-in recipe end to end (same as `peftpipe run demo`)."""
    run(recipe="demo", set_=None, address=None, quiet=False, verbose=False)


def main(cli: typer.Typer | None = None) -> None:
    """Run ``cli`` (default: this module's stage commands; the ``peftpipe`` script passes
    the app composed with the cluster commands, :mod:`peftpipe`)."""
    # Library load reports ("newly initialized head ...") are expected here, not news.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Weight loading and GGUF conversion progress bars (transformers reads huggingface_hub's
    # switch when it is first imported) would interleave with the status lines.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # On a machine without a GPU the CPU accelerator is the expected one, not a warning.
    logging.getLogger("DeepSpeed").addFilter(
        lambda r: not r.getMessage().startswith("Setting accelerator to CPU"))
    sys.exit((cli or app)())


if __name__ == "__main__":
    main()
