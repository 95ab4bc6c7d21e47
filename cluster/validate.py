"""Offline checks of the deployment files in ``cluster/deploy`` (``peftpipe cluster validate``).

Each check parses a file and raises :class:`DeployError` naming the file and field at fault:

- the Ray cluster launcher YAML: the JSON schema Ray publishes for it
  (``ray/autoscaler/ray-schema.json``, what ``ray up`` validates against), a CPU-only head,
  autoscaling GPU workers, and every ``ray start`` command parsed by Ray's own CLI;
- KubeRay ``RayCluster``/``RayJob``: the fields the ``ray.io/v1`` CRDs require, every
  ``rayStartParams`` entry parsed as a ``ray start`` flag, images and Ray versions consistent,
  GPUs requested by the worker groups, the RayJob entrypoint parsed by the CLI's own ``run``
  command (its parameters asked from the Typer app);
- the MLflow server deployment: ``mlflow server`` flags parsed by MLflow's own CLI, a SQL
  backend store and an object-store artifact destination;
- the Dockerfile: instructions parsed by ``dockerfile-parse`` (continuations, parser
  directives), JSON forms, a CUDA base image, CUDA torch, DeepSpeed, ``COPY`` sources present
  in the build context.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import InputError

DEPLOY = Path(__file__).parent / "deploy"
REPO = Path(__file__).resolve().parent.parent


class DeployError(InputError):
    """A deployment file is invalid; the message names the file and the field."""


def load_docs(path: str | Path) -> list[dict[str, Any]]:
    """Every YAML document in ``path`` (empty documents dropped)."""
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except yaml.YAMLError as e:
        raise DeployError(f"{path}: not valid YAML: {e}") from e
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise DeployError(f"{path}: document {i} is not a mapping")
    return docs


def _get(doc: Any, dotted: str, where: str) -> Any:
    node = doc
    for part in dotted.split("."):
        if isinstance(node, list):
            try:
                node = node[int(part)]
                continue
            except (ValueError, IndexError):
                raise DeployError(f"{where}: {dotted}: missing") from None
        if not isinstance(node, dict) or part not in node:
            raise DeployError(f"{where}: {dotted}: missing")
        node = node[part]
    return node


# -- ray start flags -------------------------------------------------------------------------------

def parse_ray_start(args: list[str], where: str) -> dict[str, Any]:
    """Parse ``ray start`` arguments with Ray's own CLI definition (nothing is started)."""
    import click

    from pipelines import compat

    try:
        ctx = compat.ray_start_cli().make_context("start", list(args), resilient_parsing=False)
    except click.ClickException as e:
        raise DeployError(f"{where}: `ray start {' '.join(args)}`: {e.format_message()}") from e
    return dict(ctx.params)


def ray_start_params_args(params: dict[str, Any]) -> list[str]:
    """KubeRay ``rayStartParams`` as ``ray start`` flags (as the operator builds them)."""
    args = []
    for k, v in params.items():
        if str(v).lower() == "true" and k in ("block", "head", "disable-usage-stats"):
            args.append(f"--{k}")
        else:
            args.append(f"--{k}={v}")
    return args


def _start_commands(commands: list[str], where: str) -> list[dict[str, Any]]:
    out = []
    for cmd in commands:
        for part in cmd.split(";"):
            words = shlex.split(part.replace("$RAY_HEAD_IP", "10.0.0.1"))
            if words[:2] == ["ray", "start"]:
                out.append(parse_ray_start(words[2:], where))
    return out


# -- the cluster launcher --------------------------------------------------------------------------

def check_launcher(path: str | Path = DEPLOY / "ray-cluster-aws.yaml") -> dict[str, Any]:
    """A launcher config against the schema Ray ships for it, plus the shape this project
    needs. The file is checked as written: ``ray up`` merges its provider defaults in only
    where a field is absent, so every field these checks read is in the file."""
    from importlib import resources

    import jsonschema

    where = str(path)
    (cfg,) = load_docs(path)
    schema = json.loads((resources.files("ray.autoscaler") / "ray-schema.json").read_text())
    try:
        jsonschema.validate(cfg, schema)
    except jsonschema.ValidationError as e:
        loc = ".".join(str(p) for p in e.absolute_path) or "<top level>"
        raise DeployError(f"{where}: rejected by Ray's cluster config schema: {loc}: "
                          f"{e.message}") from None
    types = _get(cfg, "available_node_types", where)
    head_type = _get(cfg, "head_node_type", where)
    if head_type not in types:
        raise DeployError(f"{where}: head_node_type: {head_type!r} is not one of "
                          f"available_node_types {sorted(types)}")
    head = types[head_type]
    if head.get("resources", {}).get("GPU"):
        raise DeployError(f"{where}: the head node type advertises GPUs; it should be CPU only")
    gpu_types = [n for n, t in types.items() if n != head_type
                 and re.match(r"^(g|p)\d", str(t.get("node_config", {}).get("InstanceType", "")))]
    if not gpu_types:
        raise DeployError(f"{where}: no GPU worker node type (g*/p* instances)")
    for n in gpu_types:
        t = types[n]
        if not t.get("max_workers", 0) > t.get("min_workers", 0):
            raise DeployError(f"{where}: available_node_types.{n}: max_workers must exceed "
                              "min_workers for the autoscaler to add GPU nodes")
    if not cfg.get("docker", {}).get("image"):
        raise DeployError(f"{where}: docker.image: the nodes must run the peftpipe image")
    heads = _start_commands(cfg.get("head_start_ray_commands", []),
                            where + ": head_start_ray_commands")
    workers = _start_commands(cfg.get("worker_start_ray_commands", []),
                              where + ": worker_start_ray_commands")
    if not heads or not heads[0]["head"]:
        raise DeployError(f"{where}: head_start_ray_commands: no `ray start --head`")
    if not workers or not workers[0]["address"]:
        raise DeployError(f"{where}: worker_start_ray_commands: no `ray start --address`")
    return cfg


# -- KubeRay ---------------------------------------------------------------------------------------

# The schemas below are the parts of KubeRay's ray.io/v1 CRDs the operator needs, written
# here, checked with the `jsonschema` library. Why not a maintained package: KubeRay
# publishes its CRD schemas only inside its Helm chart and Go module (no Python package
# ships them), and the Kubernetes validators on PyPI (e.g. kubernetes-validate) carry the
# core API's schemas, not custom resources; the full CRD is checked by the API server at
# `kubectl apply --dry-run=server`, which needs a cluster (tests run `kubectl kustomize`
# offline where kubectl is installed).
_CONTAINER_SCHEMA = {
    "type": "object", "required": ["name", "image"],
    "properties": {"name": {"type": "string", "minLength": 1},
                   "image": {"type": "string", "minLength": 1},
                   "resources": {"type": "object"}},
}
_TEMPLATE_SCHEMA = {
    "type": "object", "required": ["spec"],
    "properties": {"spec": {"type": "object", "required": ["containers"], "properties": {
        "containers": {"type": "array", "minItems": 1, "items": _CONTAINER_SCHEMA}}}},
}
_PARAMS_SCHEMA = {"type": "object", "additionalProperties": {"type": "string"}}
#: the parts of the ray.io/v1 RayCluster spec the operator requires (and their types)
RAYCLUSTER_SPEC_SCHEMA = {
    "type": "object", "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "headGroupSpec": {"type": "object", "required": ["template"], "properties": {
            "rayStartParams": _PARAMS_SCHEMA, "template": _TEMPLATE_SCHEMA,
            "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}}},
        "workerGroupSpecs": {"type": "array", "items": {
            "type": "object", "required": ["groupName", "template"],
            "properties": {
                "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "replicas": {"type": "integer", "minimum": 0},
                "minReplicas": {"type": "integer", "minimum": 0},
                "maxReplicas": {"type": "integer", "minimum": 0},
                "rayStartParams": _PARAMS_SCHEMA, "template": _TEMPLATE_SCHEMA}}},
    },
}
RAYJOB_SPEC_SCHEMA = {
    "type": "object", "required": ["entrypoint"],
    "properties": {
        "entrypoint": {"type": "string", "minLength": 1},
        "runtimeEnvYAML": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "clusterSelector": {"type": "object"},
        "rayClusterSpec": RAYCLUSTER_SPEC_SCHEMA,
    },
}


def _schema(doc: Any, schema: dict[str, Any], where: str) -> None:
    import jsonschema

    try:
        jsonschema.validate(doc, schema)
    except jsonschema.ValidationError as e:
        loc = ".".join(str(p) for p in e.absolute_path) or "<spec>"
        raise DeployError(f"{where}: spec.{loc}: {e.message}") from None


def _k8s_object(doc: dict[str, Any], kind: str, where: str) -> None:
    if doc.get("apiVersion") != "ray.io/v1" and kind in ("RayCluster", "RayJob"):
        raise DeployError(f"{where}: apiVersion: expected ray.io/v1, got {doc.get('apiVersion')!r}")
    if doc.get("kind") != kind:
        raise DeployError(f"{where}: kind: expected {kind}, got {doc.get('kind')!r}")
    name = _get(doc, "metadata.name", where)
    if not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", str(name)) or len(name) > 63:
        raise DeployError(f"{where}: metadata.name: {name!r} is not a DNS-1123 label")


def check_raycluster_spec(spec: dict[str, Any], where: str) -> None:
    """A RayCluster spec (also the ``rayClusterSpec`` of a RayJob)."""
    import ray

    _schema(spec, RAYCLUSTER_SPEC_SCHEMA, where)
    version = spec.get("rayVersion")
    if version != ray.__version__:
        raise DeployError(f"{where}: rayVersion: {version!r}, but the project is tested with "
                          f"ray {ray.__version__}")
    groups = [("headGroupSpec", spec["headGroupSpec"])] + [
        (f"workerGroupSpecs.{i}", g) for i, g in enumerate(spec.get("workerGroupSpecs", []))]
    for loc, g in groups:
        parse_ray_start(ray_start_params_args(g.get("rayStartParams", {})),
                        f"{where}: {loc}.rayStartParams")
        containers = g["template"]["spec"]["containers"]
        if "nvidia.com/gpu" in str(containers[0].get("resources", {})) and loc == "headGroupSpec":
            raise DeployError(f"{where}: {loc}: the head should not request GPUs")
    images = {c["image"] for _, g in groups for c in g["template"]["spec"]["containers"][:1]}
    if len(images) != 1:
        raise DeployError(f"{where}: head and workers run different images: {sorted(images)}")
    workers = spec.get("workerGroupSpecs", [])
    if not workers:
        raise DeployError(f"{where}: workerGroupSpecs: no worker group")
    for i, g in enumerate(workers):
        lo, hi, n = g.get("minReplicas", 0), g.get("maxReplicas", 0), g.get("replicas", 0)
        if not lo <= n <= hi:
            raise DeployError(f"{where}: workerGroupSpecs.{i}: replicas {n} outside "
                              f"[minReplicas {lo}, maxReplicas {hi}]")
        res = g["template"]["spec"]["containers"][0].get("resources", {})
        if "nvidia.com/gpu" not in res.get("limits", {}):
            raise DeployError(f"{where}: workerGroupSpecs.{i}: containers.0.resources.limits "
                              "requests no nvidia.com/gpu")
    if spec.get("enableInTreeAutoscaling") and not any(
            g.get("maxReplicas", 0) > g.get("minReplicas", 0) for g in workers):
        raise DeployError(f"{where}: enableInTreeAutoscaling, but no group can grow "
                          "(maxReplicas == minReplicas)")


def check_raycluster(path: str | Path = DEPLOY / "kubernetes" / "raycluster.yaml") -> dict:
    (doc,) = load_docs(path)
    _k8s_object(doc, "RayCluster", str(path))
    check_raycluster_spec(_get(doc, "spec", str(path)), str(path))
    return doc


def check_rayjob(path: str | Path = DEPLOY / "kubernetes" / "rayjob.yaml") -> dict:
    where = str(path)
    (doc,) = load_docs(path)
    _k8s_object(doc, "RayJob", where)
    spec = _get(doc, "spec", where)
    _schema(spec, RAYJOB_SPEC_SCHEMA, where)
    if "rayClusterSpec" not in spec and "clusterSelector" not in spec:
        raise DeployError(f"{where}: spec: needs rayClusterSpec (or clusterSelector)")
    if "rayClusterSpec" in spec:
        check_raycluster_spec(spec["rayClusterSpec"], where + ": spec.rayClusterSpec")
    if "runtimeEnvYAML" in spec:
        try:
            renv = yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError as e:
            raise DeployError(f"{where}: spec.runtimeEnvYAML: not valid YAML: {e}") from e
        from ray.runtime_env import RuntimeEnv

        try:
            RuntimeEnv(**(renv or {}))
        except Exception as e:
            raise DeployError(f"{where}: spec.runtimeEnvYAML: {e}") from e
    check_entrypoint(spec["entrypoint"], where + ": spec.entrypoint")
    return doc


#: how a job may start the CLI: the stage commands alone, or the composed ``peftpipe``
ENTRY_PREFIXES = tuple([py, "-m", mod] for py in ("python", "python3")
                       for mod in ("pipelines.cli", "peftpipe")) + (["peftpipe"],)


def check_entrypoint(entrypoint: str, where: str) -> dict[str, Any]:
    """``python -m pipelines.cli run RECIPE [--set ...]`` (or ``peftpipe run ...``): parsed by
    the CLI's own ``run`` command, whose parameters are asked from its Typer app (the recipe
    argument, the ``--set`` option), the recipe loaded with its overrides (no cluster needed).
    """
    import typer

    # `run` is a stage command: pipelines.cli holds it (cluster builds on pipelines, so this
    # import is the allowed direction; the composed app in `peftpipe` mounts the same one)
    from pipelines.cli import app

    words = shlex.split(entrypoint)
    rest = next((words[len(p):] for p in ENTRY_PREFIXES if words[:len(p)] == p), None)
    if not rest or rest[0] != "run":
        raise DeployError(f"{where}: expected `python -m pipelines.cli run RECIPE ...`, "
                          f"got {entrypoint!r}")
    # the command group Typer builds and runs (Typer carries its own copy of click, so the
    # objects are read by their documented attributes, not checked against click's classes)
    cmd = getattr(typer.main.get_command(app), "commands", {}).get("run")
    if cmd is None:
        raise DeployError(f"{where}: this peftpipe has no `run` command")
    try:
        ctx = cmd.make_context("run", rest[1:])
    except typer.TyperException as e:  # the base of its usage errors
        raise DeployError(f"{where}: {e.format_message()}") from e
    (recipe_arg,) = [p for p in cmd.params if p.param_type_name == "argument"]
    overrides_opt = next((p for p in cmd.params if "--set" in p.opts), None)
    recipe = ctx.params[recipe_arg.name]
    overrides = ctx.params.get(overrides_opt.name) if overrides_opt is not None else None
    from pipelines.recipe import RecipeError, load_recipe

    try:
        load_recipe(recipe, list(overrides or []), check_paths=False)
    except RecipeError as e:
        raise DeployError(f"{where}: the recipe it runs: {e}") from e
    return dict(ctx.params)


# -- MLflow ----------------------------------------------------------------------------------------

def check_mlflow(path: str | Path = DEPLOY / "kubernetes" / "mlflow.yaml") -> dict[str, Any]:
    """The MLflow Deployment's ``mlflow server`` flags, its SQL store and object-store artifacts."""
    import click
    from mlflow.cli import server

    where = str(path)
    docs = load_docs(path)
    deployments = [d for d in docs if d.get("kind") == "Deployment"]
    found = None
    for d in deployments:
        for c in _get(d, "spec.template.spec.containers", where):
            argv = list(c.get("command", [])) + list(c.get("args", []))
            if argv[:2] == ["mlflow", "server"]:
                found = (d, c, argv[2:])
    if found is None:
        raise DeployError(f"{where}: no Deployment whose container runs `mlflow server`")
    dep, container, argv = found
    env = {e["name"]: e for e in container.get("env", [])}

    def expand(a: str) -> str:
        # Kubernetes expands $(VAR) from the container's env; check the reference resolves.
        def sub(m):
            var = m.group(1)
            if var not in env:
                raise DeployError(f"{where}: {a!r} references $({var}), not in the container's env")
            e = env[var]
            if "value" in e:
                return e["value"]
            ref = e.get("valueFrom", {}).get("secretKeyRef", {})
            return _secret_value(docs, ref, where)
        return re.sub(r"\$\((\w+)\)", sub, a)

    argv = [expand(a) for a in argv]
    try:
        ctx = server.make_context("server", argv)
    except click.ClickException as e:
        raise DeployError(f"{where}: `mlflow server {' '.join(argv)}`: {e.format_message()}") from e
    p = ctx.params
    store = p.get("backend_store_uri") or ""
    if not re.match(r"^(postgresql|mysql|mssql)(\+\w+)?://", store):
        raise DeployError(f"{where}: --backend-store-uri: expected a SQL database "
                          f"(postgresql://...), got {store!r}")
    dest = p.get("artifacts_destination") or ""
    if not re.match(r"^(s3|gs|wasbs|abfss)://", dest):
        raise DeployError(f"{where}: --artifacts-destination: expected an object store "
                          f"(s3://, gs://...), got {dest!r}")
    if p.get("serve_artifacts") is False:
        raise DeployError(f"{where}: --no-serve-artifacts: clients would need object-store "
                          "credentials")
    services = [d for d in docs if d.get("kind") == "Service"]
    labels = _get(dep, "spec.template.metadata.labels", where)
    if not any(all(labels.get(k) == v for k, v in (s.get("spec", {}).get("selector") or {}).items())
               for s in services):
        raise DeployError(f"{where}: no Service selects the MLflow pods")
    return p


def _secret_value(docs: list[dict], ref: dict[str, str], where: str) -> str:
    for d in docs:
        if d.get("kind") == "Secret" and d.get("metadata", {}).get("name") == ref.get("name"):
            data = d.get("stringData") or {}
            if ref.get("key") in data:
                return str(data[ref["key"]])
    raise DeployError(f"{where}: secretKeyRef {ref}: no such Secret key in this file")


# -- Dockerfile ------------------------------------------------------------------------------------

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
                "MAINTAINER"}


def parse_dockerfile(text: str) -> list[tuple[str, str, int]]:
    """``(INSTRUCTION, arguments, line)`` for each instruction, as ``dockerfile-parse`` reads
    them (comments dropped, continuations joined, the ``escape`` directive honoured); runs of
    whitespace in the arguments become one space."""
    import io

    from dockerfile_parse import DockerfileParser

    parsed = DockerfileParser(fileobj=io.BytesIO(text.encode())).structure
    steps = [i for i in parsed if i["instruction"] != "COMMENT"]
    # dockerfile-parse silently drops an instruction whose continuation never ends
    covered = max((i["endline"] for i in parsed), default=-1)
    lines = text.splitlines()
    left = [n for n in range(covered + 1, len(lines)) if lines[n].strip()]
    if left:
        raise DeployError(f"Dockerfile line {left[0] + 1}: continuation runs past the end of "
                          "the file")
    return [(i["instruction"].upper(), " ".join(i["value"].split()), i["startline"] + 1)
            for i in steps]


def check_dockerfile(path: str | Path = DEPLOY / "Dockerfile", context: str | Path = REPO
                     ) -> list[tuple[str, str, int]]:
    where = str(path)
    steps = parse_dockerfile(Path(path).read_text())
    if not steps:
        raise DeployError(f"{where}: no instructions")
    args: dict[str, str] = {}
    seen_from = False
    for word, rest, line in steps:
        at = f"{where}:{line}"
        if word not in INSTRUCTIONS:
            raise DeployError(f"{at}: unknown instruction {word!r}")
        if not seen_from and word not in ("ARG", "FROM"):
            raise DeployError(f"{at}: {word} before FROM")
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
        if word == "FROM":
            seen_from = True
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""),
                           rest.split()[0])
            if "cuda" not in image.lower():
                raise DeployError(f"{at}: FROM {image}: expected a CUDA base image")
        if word in ("CMD", "ENTRYPOINT", "SHELL") and rest.startswith("["):
            try:
                json.loads(rest)
            except ValueError as e:
                raise DeployError(f"{at}: {word} {rest}: invalid JSON form: {e}") from e
        if word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            if len(parts) < 2:
                raise DeployError(f"{at}: {word} needs a source and a destination")
            for src in parts[:-1]:
                if not (Path(context) / src).exists():
                    raise DeployError(f"{at}: {word} source {src!r} is not in the build context")
        for ref in re.findall(r"\$\{(\w+)\}", rest):
            if word in ("RUN", "FROM", "ENV") and ref not in args and ref not in _env_names(steps):
                raise DeployError(f"{at}: ${{{ref}}} is neither an ARG nor an ENV")
    runs = " ".join(rest for word, rest, _ in steps if word == "RUN")
    if not re.search(r"pip install[^&]*torch[^&]*--index-url[^&]*(cu\d+|TORCH_INDEX)", runs):
        raise DeployError(f"{where}: torch is not installed from a CUDA wheel index")
    if "deepspeed" not in runs:
        raise DeployError(f"{where}: DeepSpeed is not installed")
    return steps


def _env_names(steps) -> set[str]:
    names = set()
    for word, rest, _ in steps:
        if word == "ENV":
            names |= set(re.findall(r"(?:^|\s)(\w+)=", rest))
    return names


def check_all(deploy: str | Path = DEPLOY) -> dict[str, str]:
    """Run every check; returns ``{file: "ok"}`` or raises the first :class:`DeployError`."""
    d = Path(deploy)
    check_launcher(d / "ray-cluster-aws.yaml")
    check_raycluster(d / "kubernetes" / "raycluster.yaml")
    check_rayjob(d / "kubernetes" / "rayjob.yaml")
    check_mlflow(d / "kubernetes" / "mlflow.yaml")
    check_dockerfile(d / "Dockerfile")
    return {str(p.relative_to(d)): "ok" for p in (
        d / "ray-cluster-aws.yaml", d / "kubernetes" / "raycluster.yaml",
        d / "kubernetes" / "rayjob.yaml", d / "kubernetes" / "mlflow.yaml", d / "Dockerfile")}
