"""The deployment files in cluster/deploy pass the offline checks, and the checks catch
broken copies of them (each mutation below must be rejected, naming the field)."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster import validate as v

pytestmark = pytest.mark.timeout(120)

DEPLOY = v.DEPLOY
K8S = DEPLOY / "kubernetes"


def test_shipped_files_pass_every_check() -> None:
    assert set(v.check_all()) == {"ray-cluster-aws.yaml", "kubernetes/raycluster.yaml",
                                  "kubernetes/rayjob.yaml", "kubernetes/mlflow.yaml", "Dockerfile"}


def test_launcher_is_a_cpu_head_with_autoscaling_gpu_workers() -> None:
    cfg = v.check_launcher()
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["max_workers"] == 0 and not head["resources"].get("GPU")
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith("g")
    assert gpu["max_workers"] > gpu["min_workers"]
    assert cfg["setup_commands"] == []  # no default `pip install ray nightly` merged in
    assert any("/shared" in o for o in cfg["docker"]["run_options"])


def _write(tmp: Path, name: str, docs) -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump_all(docs if isinstance(docs, list) else [docs], sort_keys=False))
    return p


def _mutated(path: Path, tmp: Path, fn, index: int = 0) -> Path:
    docs = v.load_docs(path)
    docs = copy.deepcopy(docs)
    fn(docs[index])
    return _write(tmp, path.name, docs)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda c: c.pop("provider"), "provider"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(bogus_key=1), "bogus_key"),
    (lambda c: c["available_node_types"]["head"].update(resources={"GPU": 1}), "CPU only"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(max_workers=1), "max_workers"),
    (lambda c: c.update(head_start_ray_commands=["ray start --head --no-such-flag"]),
     "no-such-flag"),
])
def test_launcher_checks_reject(tmp_path, mutate, message) -> None:
    bad = _mutated(DEPLOY / "ray-cluster-aws.yaml", tmp_path, mutate)
    with pytest.raises(v.DeployError, match=message):
        v.check_launcher(bad)


def _spec(doc):
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


RAY_MUTATIONS = [
    (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    (lambda d: _spec(d).pop("headGroupSpec"), "headGroupSpec"),
    (lambda d: _spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"),
     "image"),
    (lambda d: _spec(d)["workerGroupSpecs"][0].pop("groupName"), "groupName"),
    (lambda d: _spec(d)["workerGroupSpecs"][0].update(replicas=9), "replicas"),
    (lambda d: _spec(d)["headGroupSpec"]["rayStartParams"].update({"dashbord-host": "0.0.0.0"}),
     "dashbord-host"),
    (lambda d: _spec(d)["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "string"),
    (lambda d: _spec(d).update(rayVersion="2.9.0"), "rayVersion"),
    (lambda d: _spec(d)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"].pop("nvidia.com/gpu"), "nvidia.com/gpu"),
    (lambda d: _spec(d)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
        image="other:1"), "different images"),
]


@pytest.mark.parametrize(("mutate", "message"), RAY_MUTATIONS)
@pytest.mark.parametrize("kind", ["raycluster", "rayjob"])
def test_kuberay_checks_reject(tmp_path, kind, mutate, message) -> None:
    check = v.check_raycluster if kind == "raycluster" else v.check_rayjob
    bad = _mutated(K8S / f"{kind}.yaml", tmp_path, mutate)
    with pytest.raises(v.DeployError, match=message):
        check(bad)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["spec"].pop("entrypoint"), "entrypoint"),
    (lambda d: d["spec"].update(entrypoint="python train.py"), "pipelines.cli run"),
    (lambda d: d["spec"].update(entrypoint="python -m pipelines.cli run demo --sett x=1"), "sett"),
    (lambda d: d["spec"].update(
        entrypoint="python -m pipelines.cli run demo --set train.max_stepz=3"),
     "max_stepz"),
    (lambda d: d["spec"].update(runtimeEnvYAML="pip: [a\n"), "runtimeEnvYAML"),
    (lambda d: d["spec"].update(submissionMode="Batch"), "submissionMode"),
])
def test_rayjob_entrypoint_and_fields_are_checked(tmp_path, mutate, message) -> None:
    bad = _mutated(K8S / "rayjob.yaml", tmp_path, mutate)
    with pytest.raises(v.DeployError, match=message):
        v.check_rayjob(bad)


def test_rayjob_runs_the_demo_recipe_on_shared_storage_and_the_mlflow_service() -> None:
    doc = v.check_rayjob()
    params = v.check_entrypoint(doc["spec"]["entrypoint"], "rayjob")
    sets = dict(s.split("=", 1) for s in params["set_"])
    assert sets["run_dir"].startswith("/shared/") and sets["tracking.tracking_uri"] == "http://mlflow:5000"
    mounts = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {"claimName": "peftpipe-shared"} in [m.get("persistentVolumeClaim") for m in mounts]


def _mlflow_container(d):
    for doc in d if isinstance(d, list) else [d]:
        if doc.get("kind") == "Deployment":
            return doc["spec"]["template"]["spec"]["containers"][0]
    raise AssertionError


def _mlflow_mutated(tmp: Path, fn) -> Path:
    docs = copy.deepcopy(v.load_docs(K8S / "mlflow.yaml"))
    fn(docs)
    return _write(tmp, "mlflow.yaml", docs)


def _set_flag(docs, flag, value):
    c = _mlflow_container(docs)
    c["command"] = [a for a in c["command"] if not a.startswith(flag)] + [f"{flag}={value}"]


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda ds: _set_flag(ds, "--backend-store-uri", "sqlite:///mlflow.db"), "SQL database"),
    (lambda ds: _set_flag(ds, "--artifacts-destination", "/mnt/artifacts"), "object store"),
    (lambda ds: _mlflow_container(ds)["command"].append("--no-such-option"), "no-such-option"),
    (lambda ds: _mlflow_container(ds).update(env=[]), "MLFLOW_BACKEND_STORE_URI"),
    (lambda ds: [d for d in ds if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow"][0][
        "spec"].update(selector={"app": "nope"}), "Service"),
])
def test_mlflow_checks_reject(tmp_path, mutate, message) -> None:
    with pytest.raises(v.DeployError, match=message):
        v.check_mlflow(_mlflow_mutated(tmp_path, mutate))


def test_mlflow_server_uses_postgres_and_s3() -> None:
    p = v.check_mlflow()
    assert p["backend_store_uri"].startswith("postgresql://")
    assert p["artifacts_destination"].startswith("s3://") and p["serve_artifacts"] is True


def test_dockerfile_parses_and_installs_cuda_torch_and_deepspeed() -> None:
    steps = v.check_dockerfile()
    words = [w for w, _, _ in steps]
    assert words[words.index("FROM") - 1] == "ARG" and "USER" in words
    assert any("DS_BUILD_FUSED_ADAM=1" in rest for w, rest, _ in steps if w == "ENV")


@pytest.mark.parametrize(("text", "message"), [
    ("FROM ubuntu:24.04\n"
     "RUN pip install torch --index-url https://download.pytorch.org/whl/cu128 deepspeed\n",
     "CUDA base image"),
    ("RUN echo hi\nFROM nvidia/cuda:12.8.1-devel-ubuntu24.04\n", "before FROM"),
    ("FROM nvidia/cuda:12.8.1-devel-ubuntu24.04\nRUNN echo\n", "unknown instruction"),
    ("FROM nvidia/cuda:12.8.1-devel-ubuntu24.04\nRUN pip install torch deepspeed\n",
     "CUDA wheel index"),
    ("FROM nvidia/cuda:12.8.1-devel-ubuntu24.04\n"
     "RUN pip install torch --index-url https://download.pytorch.org/whl/cu128\n", "DeepSpeed"),
    ("FROM nvidia/cuda:12.8.1-devel-ubuntu24.04\nCOPY no_such_dir /app\n", "build context"),
    ("FROM nvidia/cuda:12.8.1-devel-ubuntu24.04\nCMD [\"a\",]\n", "JSON"),
    ("FROM nvidia/cuda:12.8.1-devel-ubuntu24.04\nRUN echo ${UNDEFINED}\n", "UNDEFINED"),
    ("FROM nvidia/cuda:12.8.1-devel-ubuntu24.04\nRUN echo a \\\n", "continuation"),
])
def test_dockerfile_checks_reject(tmp_path, text, message) -> None:
    p = tmp_path / "Dockerfile"
    p.write_text(text)
    with pytest.raises(v.DeployError, match=message):
        v.check_dockerfile(p)


def test_dockerfile_parser_joins_continuations_and_honours_directives() -> None:
    steps = v.parse_dockerfile(
        "# syntax=docker/dockerfile:1\n# escape=`\nFROM a\nRUN x `\n  # c\n  y\n")
    assert steps == [("FROM", "a", 3), ("RUN", "x y", 4)]


def test_dockerignore_keeps_only_what_the_image_copies() -> None:
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "*" in lines and {"!peft_core/", "!pipelines/", "!cluster/"} <= set(lines)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("files", [["shared-storage.yaml", "mlflow.yaml", "raycluster.yaml"],
                                   ["rayjob.yaml"]])
def test_kubectl_kustomize_builds_the_manifests(tmp_path, files) -> None:
    """kubectl's own offline build: every document is a well-formed Kubernetes object."""
    for f in files:
        shutil.copy(K8S / f, tmp_path / f)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": files}))
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(out.stdout)}
    assert kinds == ({"RayJob"} if files == ["rayjob.yaml"] else
                     {"PersistentVolumeClaim", "Secret", "ServiceAccount", "StatefulSet",
                      "Service", "Deployment", "RayCluster"})


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_shipped_kustomization_builds() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
