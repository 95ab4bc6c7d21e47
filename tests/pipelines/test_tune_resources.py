"""The per-node feasibility of a search (pipelines.tune.resources), on nodes described the
way ``ray.nodes()`` reports them. No Ray is started: the real-cluster checks (the CLI's
exit 2, a placement lost at run time) are in tests/cluster/test_readme_cluster.py."""

from __future__ import annotations

import pytest

from pipelines.train import TrainConfig
from pipelines.tune import TuneConfig
from pipelines.tune.resources import (
    TRIAL_DRIVER_CPU,
    ResourceError,
    check_job,
    cpus_per_worker,
    fits,
    plan,
)

pytestmark = pytest.mark.timeout(60)

MEM = 8 * 2**30


def nodes(*cpus: float, gpu: float = 0) -> list[dict[str, float]]:
    return [{"CPU": c, "memory": MEM, "object_store_memory": 2**28,
             **({"GPU": gpu} if gpu else {})} for c in cpus]


def tune(**kw) -> TuneConfig:
    return TuneConfig.model_validate({"space": {"methods": {"lora": {}, "ia3": {}}},
                                      "searcher": "grid", **kw})


def train(**kw) -> TrainConfig:
    return TrainConfig.model_validate({"model": {"name": "builtin:minilm"}, **kw})


def test_the_demo_on_three_one_cpu_nodes_gets_a_share_that_fits_a_node() -> None:
    # the reported hang: the old total-CPU share was (3 - 0.02) / 2 = 1.49 per worker
    p = plan(tune(max_concurrent_trials=2), TRIAL_DRIVER_CPU, nodes=nodes(1, 1, 1))
    assert (p.cpus_per_worker, p.concurrent_trials) == (0.98, 2)
    # one node: both workers and both drivers on it
    assert cpus_per_worker(tune(max_concurrent_trials=2), nodes=nodes(1)) == 0.49
    # the same machine as one 2-CPU node: what a local run gets (unchanged)
    assert cpus_per_worker(tune(max_concurrent_trials=2), nodes=nodes(2)) == 0.99
    assert cpus_per_worker(tune(max_concurrent_trials=2), train=train(num_workers=2),
                           nodes=nodes(2)) == 0.49


def test_strategies_count_what_fits_on_each_node() -> None:
    w = {"CPU": 0.45}
    d = {"CPU": TRIAL_DRIVER_CPU}
    three = nodes(1, 1, 1)
    # 2 trials x 2 workers of 0.45: two per node, six slots
    assert fits(three, w, 2, "PACK", 2, d) and fits(three, w, 2, "STRICT_SPREAD", 2, d)
    assert fits(three, w, 2, "STRICT_PACK", 2, d)
    # 3 trials x 3 workers STRICT_SPREAD on 3 nodes needs 3 per node
    assert not fits(three, w, 3, "STRICT_SPREAD", 3, d)
    assert fits(three, {"CPU": 0.3}, 3, "STRICT_SPREAD", 3, d)
    # STRICT_PACK of 3 x 0.45 never fits a 1-CPU node, PACK spreads them
    assert not fits(three, w, 3, "STRICT_PACK", 1, d) and fits(three, w, 3, "PACK", 1, d)
    # GPUs: one per worker
    g = nodes(4, 4, gpu=1)
    assert fits(g, {"CPU": 1, "GPU": 1}, 2, "SPREAD", 1, d)
    assert not fits(g, {"CPU": 1, "GPU": 1}, 2, "STRICT_PACK", 1, d)


def test_an_explicit_share_that_fits_no_node_names_the_field_and_the_fix() -> None:
    with pytest.raises(ResourceError) as e:
        cpus_per_worker(tune(), train=train(num_workers=1, cpus_per_worker=1.0),
                        nodes=nodes(1, 1, 1))
    msg = str(e.value)
    assert msg.startswith("train.cpus_per_worker: 2 trials at once of 1 worker x 1 CPU (PACK)")
    assert "3 alive nodes of 1 CPU each" in msg
    assert "train.cpus_per_worker <= 0.98" in msg


def test_fewer_trials_at_once_is_offered_when_some_fit() -> None:
    with pytest.raises(ResourceError, match=r"\(1 does; .* or tune.max_concurrent_trials <= 1"):
        cpus_per_worker(tune(), train=train(cpus_per_worker=0.9, num_workers=2),
                        nodes=nodes(1, 1, 1))


def test_strict_spread_needs_a_node_per_worker() -> None:
    with pytest.raises(ResourceError, match=r"train.placement_strategy: STRICT_SPREAD .* "
                       r"train.num_workers=4 .* set train.num_workers <= 3"):
        plan(tune(), train=train(num_workers=4, placement_strategy="STRICT_SPREAD",
                                 batch_size=8, micro_batch_size=2),
             nodes=nodes(4, 4, 4))


def test_gpu_runs_need_a_gpu_per_worker() -> None:
    with pytest.raises(ResourceError, match=r"train.use_gpu: 2 workers need a GPU each"):
        plan(tune(), train=train(num_workers=2, use_gpu=True), nodes=nodes(8, 8))
    p = plan(tune(max_concurrent_trials=2), train=train(num_workers=2),
             nodes=nodes(8, 8, gpu=2))  # use_gpu None: the cluster has GPUs
    assert p.concurrent_trials == 2 and p.cpus_per_worker == 3.99


def test_a_default_share_too_small_asks_for_fewer_trials() -> None:
    with pytest.raises(ResourceError, match=r"tune.max_concurrent_trials: 8 trials at once .*"
                       r"\(below 0.1\).*tune.max_concurrent_trials <= 4"):
        plan(tune(max_concurrent_trials=8, searcher="random", num_samples=8),
             train=train(num_workers=2), nodes=nodes(1))


def test_concurrency_is_capped_by_the_number_of_trials() -> None:
    # a grid of 2 trials never runs 4 at once: the share is computed for 2
    p = plan(tune(max_concurrent_trials=4), nodes=nodes(1))
    assert (p.wanted, p.cpus_per_worker) == (2, 0.49)


def test_a_single_run_names_the_train_fields() -> None:
    t = train(num_workers=2, cpus_per_worker=1.0)
    with pytest.raises(ResourceError, match=r"^train.cpus_per_worker: 2 workers x 1 CPU \(PACK\) "
                       r"do not fit on 1 alive node of 1 CPU each .* set train.cpus_per_worker "
                       r"<= 0.5"):
        check_job(t, None, nodes(1))
    assert check_job(t, None, nodes(1, 1)).cpus_per_worker == 1.0  # no CPU for its driver
    # a search's trials: one worker each (what the recipe defaults a search's train to)
    assert check_job(train(num_workers=1), tune(), nodes(1, 1, 1)).cpus_per_worker == 0.98
