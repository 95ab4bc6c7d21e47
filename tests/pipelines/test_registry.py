"""Tracking and registry against real MLflow: an embedded SQLite store and a real server."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
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


# -- concurrency: separate processes released together by a barrier ---------------------------

_EVAL_S = 0.5  # how long one evaluation takes: the window in which a champion can move


def _promoter(cfg, root, name, run_id, losses, barrier, out) -> None:
    """Register ``run_id``'s adapter and run the gate, in a fresh (spawned) process. The score
    is the adapter's eval loss measured once by the parent (keyed by the version's run), read
    after an evaluation's time."""
    try:
        c = tracking.client(cfg, root)
        rcfg = registry.RegistryConfig(model_name=name, metric="eval_loss", mode="min")

        def score(version: str) -> float:
            time.sleep(_EVAL_S)
            return losses[c.get_model_version(name, version).run_id]

        barrier.wait(timeout=120)
        v = registry.register_candidate(c, name, run_id)
        out.put(("ok", registry.decide(c, rcfg, v, score).as_dict()))
    except BaseException as e:  # surfaced by the parent
        out.put(("error", f"{type(e).__name__}: {e}"))


def _roller(cfg, root, name, barrier, out) -> None:
    try:
        c = tracking.client(cfg, root)
        barrier.wait(timeout=120)
        out.put(("ok", registry.rollback(c, name).as_dict()))
    except BaseException as e:
        out.put(("error", f"{type(e).__name__}: {e}"))


def _run_together(target, argsets: list[tuple]) -> list[dict]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(len(argsets)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, barrier, out)) for a in argsets]
    for p in procs:
        p.start()
    results = [out.get(timeout=200) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    errors = [r for kind, r in results if kind == "error"]
    assert not errors, errors
    return [r for _, r in results]


def test_concurrent_promotions_and_rollbacks_serialise(store, tmp_path) -> None:
    """Three promotions at once from three processes: the champion ends on the best version
    (lowest eval loss) and the previous_champion chain links every promoted version in order
    of improvement. Then two rollbacks at once go back two steps, not one."""
    cfg, root = store
    client = tracking.client(cfg, root)
    exp = tracking.experiment_id(client, cfg, root)
    tracker = tracking.SearchTracker(client, exp, search_id=f"c-{tmp_path.name}", tags={})
    b = tiny.batch("bert", size=16)
    runs, losses = [], {}
    for i, steps in enumerate((0, 4, 15)):
        folder = _adapter(tmp_path / f"a{i}", steps=steps)
        with torch.no_grad():
            loss = peft_core.load_adapter(tiny.model("bert"), folder)(**b).loss.item()
        run = _logged_trial(tracker, f"t{i}", folder)
        runs.append(run)
        losses[run] = loss
    assert len(set(losses.values())) == 3
    name = f"c-{tmp_path.name}"

    decisions = _run_together(_promoter, [(cfg, root, name, r, losses) for r in runs])
    by_version = {str(mv.version): mv for mv in client.search_model_versions(f"name='{name}'")}
    assert len(by_version) == 3
    loss_of = {v: losses[mv.run_id] for v, mv in by_version.items()}
    best = min(loss_of, key=loss_of.get)
    assert registry.alias_version(client, name, registry.CHAMPION) == best, decisions
    chain = registry.champion_chain(client, name)
    promoted = {d["version"] for d in decisions if d["promoted"]}
    assert set(chain) == promoted, (chain, decisions)  # nobody's promotion was lost
    assert client.get_model_version(name, chain[-1]).tags["peftpipe.previous_champion"] == ""
    assert [loss_of[v] for v in chain] == sorted(loss_of[v] for v in chain)  # each improved
    for newer, older in zip(chain, chain[1:]):
        assert by_version[newer].tags["peftpipe.champion_version_at_decision"] == older

    # A chain of three champions, then two rollbacks at once: back to the first.
    for extra in range(3 - len(chain)):
        v = registry.register_candidate(client, name, runs[0])
        losses_now = {**loss_of, v: min(loss_of.values()) - 0.1 * (extra + 1)}
        rcfg = registry.RegistryConfig(model_name=name, metric="eval_loss", mode="min")
        assert registry.decide(client, rcfg, v, losses_now.__getitem__).promoted
        loss_of = losses_now
    chain = registry.champion_chain(client, name)
    assert len(chain) >= 3
    _run_together(_roller, [(cfg, root, name), (cfg, root, name)])
    assert registry.alias_version(client, name, registry.CHAMPION) == chain[2]
    assert not any(m.name.endswith(registry.LOCK_SUFFIX) for m in client.search_registered_models())


def _die_holding(cfg, root, name, barrier, out) -> None:
    """Take the lock with a short lease and exit without releasing it (a crashed holder)."""
    registry.RegistryLock(tracking.client(cfg, root), name, lease_s=1.0).acquire()
    out.put(("ok", {}))
    out.close()
    out.join_thread()  # the queue's feeder thread must flush before the hard exit
    barrier.wait(timeout=60)
    os._exit(0)


def test_lock_is_exclusive_and_a_dead_holders_lock_expires(store, tmp_path) -> None:
    cfg, root = store
    client = tracking.client(cfg, root)
    name = f"l-{tmp_path.name}"
    lock = registry.RegistryLock(client, name, lease_s=60)
    with lock, pytest.raises(registry.RegistryError, match="still held by"):
        registry.RegistryLock(client, name, timeout_s=0.5).acquire()
    _run_together(_die_holding, [(cfg, root, name)])
    tags = client.get_registered_model(name + registry.LOCK_SUFFIX).tags
    assert tags["peftpipe.lock.token"] != lock.token  # the dead process's lock is still there
    with registry.RegistryLock(client, name, timeout_s=30) as again:
        tags = client.get_registered_model(name + registry.LOCK_SUFFIX).tags
        assert tags["peftpipe.lock.token"] == again.token
    assert not any(m.name.startswith(name) for m in client.search_registered_models())
