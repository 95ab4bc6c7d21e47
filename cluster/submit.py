"""Ray Job submission of a recipe: ``peftpipe submit RECIPE --address http://HEAD:8265``.

What is submitted:

- a staging folder (the job's ``working_dir``) holding one ``recipe.yaml``: the recipe with
  the ``--set`` overrides applied, ``run_dir`` on storage every node reaches (``--storage``:
  a shared folder or an ``s3://``/``gs://`` URI), the tracking URI, and ``ray.address: auto``
  (a job's driver joins the cluster it runs on);
- the project's code (``peft_core``, ``pipelines``, ``cluster``) as ``py_modules``, unless
  an image (``--image``, runtime env ``image_uri``) already carries it; extra ``--pip``
  packages or a requirements file; ``--env`` variables;
- the entrypoint ``python -m pipelines.cli run recipe.yaml``.

The recipe is validated on the submitting machine first (a broken recipe exits 2 without
submitting; ``check=False`` skips this), and so is what its search asks of the target
cluster's nodes (:func:`check_resources`, the check the job itself would make: a trial's
workers that no node can hold exit 2 here instead of waiting on the cluster).
Then the job's logs are streamed and its exit status returned: 0 when the job SUCCEEDED,
the driver's own exit code when it FAILED (2 for a recipe the cluster rejects, 1 for a
failed run), 130 when it was STOPPED (``ray job stop``: an interruption, as Ctrl-C is for
``peftpipe run``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import EXIT_FAILED, EXIT_INTERRUPTED, InputError

from . import local

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
#: the packages shipped with a job (the project's own code)
PACKAGES = ("peft_core", "pipelines", "cluster")
ENTRYPOINT = "python -m pipelines.cli run recipe.yaml"


class SubmitError(InputError):
    """The job cannot be submitted as asked (bad recipe, no storage, no cluster): exit 2,
    nothing submitted."""


@dataclasses.dataclass
class JobSpec:
    """A ready-to-submit job: what ``JobSubmissionClient.submit_job`` receives."""

    address: str
    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str
    metadata: dict[str, str]
    recipe: dict[str, Any]
    staging_dir: str
    notes: list[str] = dataclasses.field(default_factory=list)  # what the overrides changed


def is_uri(path: str) -> bool:
    return bool(_URI.match(path)) and not path.startswith("file://")


def _project_packages() -> list[str]:
    import importlib

    out = []
    for name in PACKAGES:
        mod = importlib.import_module(name)
        out.append(str(Path(mod.__file__).resolve().parent))
    return out


def resolve_address(address: str | None, cluster_root: str | Path = local.DEFAULT_ROOT) -> str:
    """The Ray dashboard (job server) address: ``address``, else ``$RAY_API_SERVER_ADDRESS``
    or an ``http`` ``$RAY_ADDRESS``, else the local cluster under ``cluster_root``."""
    import os

    if address:
        return address if "://" in address else f"http://{address}"
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        v = os.environ.get(var, "")
        if v.startswith(("http://", "https://")):
            return v
    state = local.find_state(None, cluster_root)
    if state is not None:
        return state.dashboard_url
    raise SubmitError("no cluster address: give --address http://HEAD:8265 (the Ray dashboard), "
                      "set RAY_API_SERVER_ADDRESS, or start a local one with `peftpipe cluster up`")


def prepare(recipe: str | Path, *, address: str | None = None, overrides: list[str] | None = None,
            storage: str | None = None, tracking_uri: str | None = None,
            pip: list[str] | None = None, image: str | None = None,
            env: dict[str, str] | None = None,
            ship_code: bool | None = None, check: bool = True, submission_id: str | None = None,
            cluster_root: str | Path = local.DEFAULT_ROOT) -> JobSpec:
    """Build the job for ``recipe`` (a file or a built-in recipe name); raises
    :class:`SubmitError` for anything that must be fixed before submitting."""
    from pipelines.recipe import RecipeError, apply_overrides, load_recipe, read_recipe_file

    address = resolve_address(address, cluster_root)
    cluster = local.find_state(address, cluster_root)
    try:
        original = read_recipe_file(recipe)
        raw = apply_overrides(original, overrides or [])
    except RecipeError as e:
        raise SubmitError(str(e)) from None
    notes: list[str] = []
    try:
        # what `peftpipe run` makes of the same overrides (a shortened max_steps scales the
        # recipe's warmup): the job runs the recipe as the user would locally
        fitted = load_recipe(data=original, overrides=overrides or [], check_paths=False)
    except RecipeError:
        fitted = None  # reported by the check below (or by the job, unchecked)
    if fitted is not None and fitted.notes:
        notes = list(fitted.notes)
        raw["train"] = {**(raw.get("train") or {}), "warmup_steps": fitted.train.warmup_steps}
    name = str(raw.get("name") or "peftpipe")

    storage = storage or (cluster.storage if cluster else None)
    run_dir = raw.get("run_dir")
    if storage:
        raw["run_dir"] = f"{storage.rstrip('/')}/{name}"
    elif not run_dir or not (is_uri(str(run_dir)) or Path(str(run_dir)).is_absolute()):
        raise SubmitError(
            f"run_dir: {run_dir or f'runs/{name} (the default)'} is relative to the job's "
            "temporary working folder on the head node; give --storage (a folder every node "
            "reaches, or s3://... / gs://...) or an absolute run_dir")
    tracking = dict(raw.get("tracking") or {})
    if tracking_uri:
        tracking["tracking_uri"] = tracking_uri
    elif not tracking.get("tracking_uri") and cluster and cluster.mlflow_uri:
        tracking["tracking_uri"] = cluster.mlflow_uri
    if tracking:
        raw["tracking"] = tracking
    ray_cfg = dict(raw.get("ray") or {})
    ray_cfg["address"] = "auto"  # the job's driver joins the cluster it was submitted to
    for key in ("num_cpus", "num_gpus"):  # the cluster's nodes define these
        ray_cfg.pop(key, None)
    raw["ray"] = ray_cfg
    raw = _absolute_sources(raw)

    if check:
        try:
            parsed = load_recipe(data=raw, check_paths=True)
        except RecipeError as e:
            raise SubmitError(str(e)) from None
        for field, value in (("data.data_root", parsed.data.data_root),
                             ("train.storage_path", parsed.train.storage_path)):
            if value and not (is_uri(str(value)) or Path(str(value)).is_absolute()):
                raise SubmitError(f"{field}: {value!r} is relative to the job's temporary "
                                  "working folder; make it absolute/a URI or drop it")

    staging = Path(tempfile.mkdtemp(prefix=f"peftpipe-job-{name}-"))
    (staging / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    runtime_env = build_runtime_env(staging, pip=pip, image=image, env=env, ship_code=ship_code)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    sid = submission_id or f"peftpipe-{name}-{stamp}-{secrets.token_hex(3)}"
    return JobSpec(address=address, entrypoint=ENTRYPOINT, runtime_env=runtime_env,
                   submission_id=sid, staging_dir=str(staging), recipe=raw, notes=notes,
                   metadata={"peftpipe.recipe": name, "peftpipe.user": getpass.getuser(),
                             "peftpipe.run_dir": str(raw["run_dir"])})


def check_resources(spec: JobSpec) -> None:
    """The job's trials fit on the target cluster's alive nodes (per node, under the
    recipe's placement strategy, as ``pipelines.tune.resources`` decides in the job);
    raises :class:`SubmitError` naming the fields and a setting that fits. A cluster that
    does not answer is left to :func:`run_job` to report."""
    from pipelines.recipe import RecipeError, load_recipe
    from pipelines.tune.resources import ResourceError, check_job, nodes_from_state_api

    local.client_auth()
    try:
        nodes = nodes_from_state_api(spec.address)
    except Exception:  # unreachable or refused: the submission reports it (exit 1)
        return
    try:
        recipe = load_recipe(data=spec.recipe, check_paths=False)
        check_job(recipe.train, recipe.tune, nodes)
    except (ResourceError, RecipeError) as e:
        raise SubmitError(f"{e} (the cluster at {spec.address})") from None


def _absolute_sources(raw: dict[str, Any]) -> dict[str, Any]:
    """Relative local data sources resolve against the submitting folder (which must then
    be reachable from the cluster: a shared folder); URIs and builtins stay as they are."""
    data = raw.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("sources"), list):
        return raw
    out = []
    for s in data["sources"]:
        if isinstance(s, str) and not s.startswith("builtin:") and not is_uri(s):
            p = Path(s.removeprefix("file://")).expanduser()
            s = str(p if p.is_absolute() else p.resolve())
        out.append(s)
    return {**raw, "data": {**data, "sources": out}}


def build_runtime_env(working_dir: str | Path, *, pip: list[str] | None = None,
                      image: str | None = None, env: dict[str, str] | None = None,
                      ship_code: bool | None = None) -> dict[str, Any]:
    """The job's runtime env. ``pip``: package specs or one requirements file; ``image``: a
    container image with the project installed (``image_uri``; its code is then used, not
    shipped, unless ``ship_code``)."""
    renv: dict[str, Any] = {"working_dir": str(working_dir),
                            "excludes": ["__pycache__", "*.pyc"]}
    if ship_code is None:
        ship_code = image is None
    if ship_code:
        renv["py_modules"] = _project_packages()
    if pip:
        if len(pip) == 1 and Path(pip[0]).is_file():
            reqs = [ln.strip() for ln in Path(pip[0]).read_text().splitlines()
                    if ln.strip() and not ln.lstrip().startswith("#")]
            renv["pip"] = {"packages": reqs}
        else:
            renv["pip"] = {"packages": list(pip)}
    if image:
        renv["image_uri"] = image
    renv["env_vars"] = {"PYTHONUNBUFFERED": "1", **(env or {})}
    return renv


_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_STOPPED = EXIT_INTERRUPTED  # the code `peftpipe run` exits with when interrupted


def run_job(spec: JobSpec, *, wait: bool = True, echo: Callable[[str], None] | None = None,
            timeout_s: float | None = None) -> int:
    """Submit ``spec``, stream its logs through ``echo`` and return its exit code (0 when
    submitted and not waited for)."""
    from ray.job_submission import JobSubmissionClient

    echo = echo or (lambda s: print(s, end="", flush=True))
    local.client_auth()
    client = JobSubmissionClient(spec.address)
    job_id = client.submit_job(entrypoint=spec.entrypoint, runtime_env=spec.runtime_env,
                               submission_id=spec.submission_id, metadata=spec.metadata)
    echo(f"submitted job {job_id} to {spec.address}\n")
    if not wait:
        return 0
    try:
        _stream_logs(client, job_id, echo, timeout_s)
        info = _wait_terminal(client, job_id, timeout_s=30 if timeout_s is None else timeout_s)
    except KeyboardInterrupt:
        client.stop_job(job_id)
        echo(f"\njob {job_id}: stop requested\n")
        return EXIT_STOPPED
    except TimeoutError:
        client.stop_job(job_id)
        echo(f"\njob {job_id}: still running after {timeout_s:g}s, stopped\n")
        return EXIT_FAILED
    code = job_exit_code(info)
    echo(f"job {job_id}: {info.status} (exit code {code})"
         + (f": {info.message}" if info.status != "SUCCEEDED" and info.message else "") + "\n")
    return code


def job_exit_code(info: Any) -> int:
    status = str(getattr(info.status, "value", info.status))
    if status == "SUCCEEDED":
        return 0
    if status == "FAILED":
        code = getattr(info, "driver_exit_code", None)
        return code if isinstance(code, int) and code > 0 else EXIT_FAILED
    if status == "STOPPED":
        return EXIT_STOPPED
    return EXIT_FAILED


def _stream_logs(client, job_id: str, echo, timeout_s: float | None) -> None:
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            echo(lines)

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout_s))
    except asyncio.TimeoutError:
        raise TimeoutError from None
    except (OSError, RuntimeError) as e:  # the log socket failed: poll instead
        echo(f"(log stream lost: {e}; polling)\n")
        _poll_logs(client, job_id, echo, timeout_s)


def _poll_logs(client, job_id: str, echo, timeout_s: float | None) -> None:
    seen = 0
    deadline = None if timeout_s is None else time.time() + timeout_s
    while True:
        logs = client.get_job_logs(job_id)
        if len(logs) > seen:
            echo(logs[seen:])
            seen = len(logs)
        if str(client.get_job_status(job_id).value) in _TERMINAL:
            return
        if deadline and time.time() > deadline:
            raise TimeoutError
        time.sleep(1)


def _wait_terminal(client, job_id: str, timeout_s: float) -> Any:
    deadline = time.time() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        if str(getattr(info.status, "value", info.status)) in _TERMINAL:
            return info
        if time.time() > deadline:
            raise TimeoutError
        time.sleep(0.5)


def submit(recipe: str | Path, *, wait: bool = True, echo: Callable[[str], None] | None = None,
           timeout_s: float | None = None, **kw: Any) -> int:
    """Prepare and submit ``recipe``; returns the job's exit code (see the module doc).
    Keyword arguments are those of :func:`prepare`."""
    spec = prepare(recipe, **kw)
    if kw.get("check", True):
        check_resources(spec)
    return run_job(spec, wait=wait, echo=echo, timeout_s=timeout_s)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(submit(sys.argv[1]))
