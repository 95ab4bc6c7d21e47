"""``peftpipe cluster up|down|status|validate`` and ``peftpipe submit`` (composed with the stage
commands by :mod:`peftpipe`)."""

from __future__ import annotations

import json

import typer

from pipelines.errors import EXIT_BAD_INPUT, InputError, PeftPipeError, exit_code

from . import local

cluster_app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="A local multi-node Ray cluster (head + workers on 127.0.0.1) and an MLflow server.",
)

ROOT_HELP = "Folder of the cluster's state file, logs, shared storage and MLflow store."


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@cluster_app.command("up")
def up(
    workers: int = typer.Option(2, help="Worker nodes besides the head."),
    cpus: float = typer.Option(1, help="Logical CPUs each worker node advertises."),
    head_cpus: float = typer.Option(None, help="CPUs of the head node (default: --cpus)."),
    gpus: int = typer.Option(0, help="GPUs each worker node advertises."),
    object_store_mb: int = typer.Option(256, help="Object store size per node (MiB)."),
    dashboard_port: int = typer.Option(None, help="Ray dashboard / job server port "
                                       "(default 8265, or a free one when 8265 is taken; "
                                       "0: any free port)."),
    port: int = typer.Option(0, help="GCS port of the head (0: any free port)."),
    client_port: int = typer.Option(None, help="Ray Client server port (default 10001, or a "
                                    "free one when taken; 0: any free port)."),
    mlflow: bool = typer.Option(True, help="Also start an MLflow server (SQLite, local "
                                "artifacts)."),
    mlflow_port: int = typer.Option(None, help="MLflow server port (default 5000, or a free "
                                    "one when taken; 0: any free port)."),
    root: str = typer.Option(local.DEFAULT_ROOT, help=ROOT_HELP),
) -> None:
    """Start a head and N worker nodes (separate `ray start` processes) and an MLflow server."""
    # A default port that is taken (a second cluster, another Ray) falls back to a free one;
    # a port given explicitly must be free.
    dashboard_port = local.preferred_port(8265) if dashboard_port is None else dashboard_port
    client_port = local.preferred_port(10001) if client_port is None else client_port
    mlflow_port = local.preferred_port(5000) if mlflow_port is None else mlflow_port
    try:
        state = local.up(root, workers=workers, cpus=cpus, head_cpus=head_cpus, gpus=gpus,
                         object_store_mb=object_store_mb, dashboard_port=dashboard_port or None,
                         port=port or None, client_port=client_port or None, mlflow=mlflow,
                         mlflow_port=mlflow_port or None)
    except PeftPipeError as e:  # a ClusterError: exit 1
        _fail(str(e), exit_code(e))
    cpus_line = ", ".join(f"{n.name} {n.num_cpus:g}" for n in state.nodes)
    typer.echo(f"cluster up: {len(state.nodes)} nodes (CPUs: {cpus_line})")
    typer.echo(f"  ray address   {state.gcs_address}")
    typer.echo(f"  dashboard     {state.dashboard_url}   (Ray's web UI and job server)")
    typer.echo(f"  ray client    {state.client_address}")
    if state.mlflow_uri:
        typer.echo(f"  mlflow        {state.mlflow_uri}   (open it: runs, models; no `mlflow "
                   "ui` needed)")
    typer.echo(f"  storage       {state.storage}")
    typer.echo(f"  state file    {state.state_file}")
    _echo_logs(state.logs())
    typer.echo("use it from a shell (peftpipe, ray status, ray job ..., mlflow):")
    for k, v in state.env().items():
        typer.echo(f"  export {k}={v}")
    if state.auth_mode == "token":
        token = f"$(cat {state.auth_token_path})" if state.auth_token_path else "$RAY_AUTH_TOKEN"
        typer.echo("the dashboard's HTTP API needs the token too: curl -H "
                   f"\"Authorization: Bearer {token}\" {state.dashboard_url}/api/jobs/")


def _echo_logs(logs: dict[str, str]) -> None:
    typer.echo("logs:")
    for k, v in logs.items():
        typer.echo(f"  {k:<12}  {v}")


@cluster_app.command("down")
def down(root: str = typer.Option(local.DEFAULT_ROOT, help=ROOT_HELP)) -> None:
    """Stop exactly the processes of the cluster (by pid) and remove its state file."""
    try:
        stopped = local.down(root)
    except PeftPipeError as e:
        _fail(str(e), exit_code(e))
    typer.echo(f"cluster down: stopped {len(stopped)} processes")


@cluster_app.command("status")
def status(
    root: str = typer.Option(local.DEFAULT_ROOT, help=ROOT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Nodes (process and Ray's view), addresses, MLflow health. Exit 1 if a node is down."""
    try:
        st = local.status(root)
    except PeftPipeError as e:
        _fail(str(e), exit_code(e))
    healthy = st["ray_reachable"] and all(
        n["process"] == "running" and n["ray"] == "ALIVE" for n in st["nodes"]) and \
        st.get("mlflow", "healthy") == "healthy"
    if as_json:
        typer.echo(json.dumps({**st, "healthy": healthy}, indent=2))
    else:
        typer.echo(f"dashboard {st['dashboard_url']}  ray {st['gcs_address']}  "
                   f"storage {st['storage']}")
        for n in st["nodes"]:
            typer.echo(f"  {n['name']:<10} pid {n['pid']:<8} process {n['process']:<8} "
                       f"ray {n['ray']:<6} cpus {n['cpus']:g} gpus {n['gpus']}")
        if st.get("mlflow_uri"):
            typer.echo(f"  mlflow     {st['mlflow_uri']} {st.get('mlflow')}")
        _echo_logs(st["logs"])
    if not healthy:
        raise typer.Exit(1)


@cluster_app.command("validate")
def validate(deploy: str = typer.Option(None, help="Folder of the deployment files "
                                        "(default: the ones shipped in cluster/deploy).")) -> None:
    """Check the deployment files offline: Ray launcher config, KubeRay RayCluster/RayJob,
    MLflow server deployment, Dockerfile."""
    from . import validate as checks

    try:
        ok = checks.check_all(deploy or checks.DEPLOY)
    except InputError as e:  # a DeployError
        _fail(str(e))
    for name, verdict in ok.items():
        typer.echo(f"{verdict}  {name}")


def submit(
    recipe: str = typer.Argument(..., help="Recipe YAML file, or a built-in recipe name (demo)."),
    address: str = typer.Option(None, help="Ray dashboard (job server) address, "
                                "http://HEAD:8265; default $RAY_API_SERVER_ADDRESS or the local "
                                "cluster."),
    set_: list[str] = typer.Option(None, "--set", help="Override a recipe field: key.path=value "
                                   "(repeatable)."),
    storage: str = typer.Option(None, help="Where run outputs go, reachable from every node: a "
                                "shared "
                                "folder or s3://... / gs://... (run_dir becomes STORAGE/NAME)."),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI for the job."),
    pip: list[str] = typer.Option(None, help="Extra pip package for the job's runtime env, or one "
                                  "requirements file (repeatable)."),
    image: str = typer.Option(None, help="Container image for the job (runtime env image_uri); "
                              "its installed code is used."),
    env: list[str] = typer.Option(None, help="Environment variable for the job: KEY=VALUE "
                                  "(repeatable)."),
    wait: bool = typer.Option(True, help="Stream the logs and wait for the job's end."),
    check: bool = typer.Option(True, help="Validate the recipe here before submitting."),
    timeout: float = typer.Option(None, help="Stop the job after this many seconds."),
    cluster_root: str = typer.Option(local.DEFAULT_ROOT,
                                     help="Local cluster folder (for defaults)."),
) -> None:
    """Submit a recipe as a Ray Job, stream its logs, exit with the job's exit code."""
    from . import submit as submission

    env_vars = {}
    for item in env or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            _fail(f"--env {item!r}: expected KEY=VALUE")
        env_vars[k] = v
    try:
        spec = submission.prepare(recipe, address=address, overrides=list(set_ or []),
                                  storage=storage, tracking_uri=tracking_uri, pip=list(pip or []),
                                  image=image, env=env_vars, check=check,
                                  cluster_root=cluster_root)
        if check:
            submission.check_resources(spec)
    except InputError as e:  # a SubmitError
        _fail(str(e))
    for note in spec.notes:
        typer.echo(f"note: {note}", err=True)
    try:
        code = submission.run_job(spec, wait=wait, timeout_s=timeout)
    except (ConnectionError, RuntimeError) as e:  # unreachable, or the submission refused
        _fail(f"job server at {spec.address}: {e}", 1)
    raise typer.Exit(code)
