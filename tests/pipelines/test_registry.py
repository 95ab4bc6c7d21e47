"""Tracking and registry against real MLflow: an embedded SQLite store and a real server."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import peft_core
from cluster.mlflow_server import mlflow_server
from pipelines import registry, tracking
from tests import tiny

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module", params=["sqlite", "server"])
def store(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"mlflow-{request.param}")
    if request.param == "sqlite":
        yield tracking.TrackingConfig(experiment="t"), root
    else:
        with mlflow_server(root / "srv") as uri:
            yield tracking.TrackingConfig(tracking_uri=uri, experiment="t"), root


def _adapter(path: Path, steps: int) -> Path:
    """A real tiny BERT LoRA adapter trained ``steps`` steps on the test batch."""
    torch.manual_seed(0)
    pm = peft_core.apply(tiny.model("bert"), {"name": "lora", "rank": 4})
    opt = torch.optim.AdamW(pm.param_groups(lr=5e-2))
    b = tiny.batch("bert", size=16)
    pm.train()
    for _ in range(steps):
        opt.zero_grad()
        pm(**b).loss.backward()
        opt.step()
    return pm.save(path)


_SEEDING = threading.Lock()  # torch's global RNG: concurrent seeded inits would interleave


def _eval_loss(client, name: str, tmp: Path):
    def score(version: str) -> float:
        _, folder = registry.download(client, f"models:/{name}/{version}", tmp / f"dl-{version}")
        with _SEEDING:
            pm = peft_core.load_adapter(tiny.model("bert"), folder)
        with torch.no_grad():
            return pm(**tiny.batch("bert", size=16)).loss.item()
    return score


def _logged_trial(tracker: tracking.SearchTracker, trial: str, adapter: Path) -> str:
    run = tracker.trial_run(trial, {"method": {"name": "lora", "rank": 4}, "lr": 0.05})
    tracker.log_metrics(run, {"train_loss": 1.0, "eval_loss": 0.9, "not_a_metric": 3}, step=1)
    tracker.log_metrics(run, {"train_loss": 0.5}, step=1)  # same step again: skipped
    tracker.finish(run, "FINISHED", artifacts={"adapter": adapter})
    return run


def test_search_runs_register_promote_rollback(store, tmp_path) -> None:
    cfg, root = store
    client = tracking.client(cfg, root)
    exp = tracking.experiment_id(client, cfg, root)
    tracker = tracking.SearchTracker(client, exp, search_id=f"s-{tmp_path.name}",
                                     tags={"dataset_id": "d1", "git_sha": tracking.git_sha()})
    good = _logged_trial(tracker, "t1", _adapter(tmp_path / "good", steps=15))
    bad = _logged_trial(tracker, "t2", _adapter(tmp_path / "bad", steps=0))
    tracker.end_search("FINISHED", {"best_trial": "t1"})

    # Parent/child structure, params, metrics logged once, artifacts.
    run = client.get_run(good)
    assert run.data.tags[tracking.PARENT_TAG] == tracker.parent_id
    assert run.data.params["method.rank"] == "4" and run.data.tags["dataset_id"] == "d1"
    hist = client.get_metric_history(good, "train_loss")
    assert [(m.step, m.value) for m in hist] == [(1, 1.0)]
    assert "not_a_metric" not in run.data.metrics
    assert {f.path for f in client.list_artifacts(good, "adapter")} == {
        "adapter/adapter.safetensors", "adapter/adapter_config.json"}
    assert run.info.status == "FINISHED"
    # A restarted driver finds the same runs instead of creating new ones.
    again = tracking.SearchTracker(client, exp, search_id=f"s-{tmp_path.name}", tags={})
    assert again.parent_id == tracker.parent_id
    assert again.trial_run("t1", {"lr": 0.05}) == good

    name = f"m-{tmp_path.name}"
    rcfg = registry.RegistryConfig(model_name=name, metric="eval_loss", mode="min", margin=0.0)
    score = _eval_loss(client, name, tmp_path)

    v_bad = registry.register_candidate(client, name, bad)
    d1 = registry.decide(client, rcfg, v_bad, score)
    assert d1.promoted and d1.reason == "no champion yet"
    v_good = registry.register_candidate(client, name, good)
    d2 = registry.decide(client, rcfg, v_good, score)
    assert d2.promoted, d2.reason
    assert registry.alias_version(client, name, registry.CHAMPION) == v_good
    v_worse = registry.register_candidate(client, name, bad)
    d3 = registry.decide(client, rcfg, v_worse, score)
    assert not d3.promoted and "does not beat" in d3.reason
    assert registry.alias_version(client, name, registry.CHAMPION) == v_good
    assert registry.alias_version(client, name, registry.CANDIDATE) == v_worse
    tags = client.get_model_version(name, v_worse).tags
    assert tags["peftpipe.decision"] == "rejected"
    assert float(tags["peftpipe.champion_score"]) == pytest.approx(d3.champion_score)

    rb = registry.rollback(client, name)
    assert rb.version == v_bad
    assert registry.alias_version(client, name, registry.CHAMPION) == v_bad
    with pytest.raises(registry.RegistryError, match="first champion"):
        registry.rollback(client, name)

    # The registered adapter loads and predicts as it did when logged.
    _, folder = registry.download(client, f"models:/{name}@{registry.CHAMPION}", tmp_path / "c")
    pm = peft_core.load_adapter(tiny.model("bert"), folder)
    ref = peft_core.load_adapter(tiny.model("bert"), tmp_path / "bad")
    b = tiny.batch("bert")
    torch.testing.assert_close(tiny.logits(pm, b), tiny.logits(ref, b))


def test_concurrent_promotions_leave_consistent_aliases(store, tmp_path) -> None:
    cfg, root = store
    client = tracking.client(cfg, root)
    exp = tracking.experiment_id(client, cfg, root)
    tracker = tracking.SearchTracker(client, exp, search_id=f"c-{tmp_path.name}", tags={})
    runs = [_logged_trial(tracker, f"t{i}", _adapter(tmp_path / f"a{i}", steps=5 * i)) for i in range(2)]
    name = f"c-{tmp_path.name}"
    rcfg = registry.RegistryConfig(model_name=name, metric="eval_loss", mode="min")
    results, errors = [], []

    def promote(run_id: str) -> None:
        try:
            c = tracking.client(cfg, root)  # one client per promoter, as separate processes would
            v = registry.register_candidate(c, name, run_id)
            results.append(registry.decide(c, rcfg, v, _eval_loss(c, name, tmp_path / run_id)))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=promote, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    versions = {str(mv.version) for mv in client.search_model_versions(f"name='{name}'")}
    assert versions == {"1", "2"}
    champion = registry.alias_version(client, name, registry.CHAMPION)
    candidate = registry.alias_version(client, name, registry.CANDIDATE)
    assert champion in versions and candidate in versions
    promoted = [d for d in results if d.promoted]
    assert champion in {d.version for d in promoted}
    assert client.get_model_version(name, champion).tags["peftpipe.decision"] == "promoted"
