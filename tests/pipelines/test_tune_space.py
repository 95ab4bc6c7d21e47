"""Search spaces (conditional per method, validated against the registry) and objectives."""

from __future__ import annotations

import random

import pydantic
import pytest

from pipelines.tune.objective import Objective, pareto_front
from pipelines.tune.space import SearchSpace

SPACE = {
    "methods": {"lora": {"rank": [4, 8], "alpha": 16}, "full": {}},
    "lr": {"min": 1e-4, "max": 1e-2, "log": True},
}


def test_sampling_is_conditional_and_seeded() -> None:
    space = SearchSpace.model_validate(SPACE)
    a = [space.sample(random.Random(3)) for _ in range(1)] + [space.sample(random.Random(3))]
    assert a[0] == a[1]
    seen = [space.sample(random.Random(i)) for i in range(40)]
    for t in seen:
        if t["method"]["name"] == "full":
            assert t["method"] == {"name": "full"}
        else:
            assert t["method"]["rank"] in (4, 8) and t["method"]["alpha"] == 16
        assert 1e-4 <= t["lr"] <= 1e-2
    assert {t["method"]["name"] for t in seen} == {"full", "lora"}


def test_grid_expands_each_method_separately() -> None:
    space = SearchSpace.model_validate({**SPACE, "lr": [1e-3]})
    grid = space.grid()
    assert grid == [
        {"method": {"name": "full"}, "lr": 1e-3},
        {"method": {"name": "lora", "alpha": 16, "rank": 4}, "lr": 1e-3},
        {"method": {"name": "lora", "alpha": 16, "rank": 8}, "lr": 1e-3},
    ]
    space.validate_trials(grid)


def test_a_method_may_carry_its_own_learning_rate() -> None:
    space = SearchSpace.model_validate(
        {"methods": {"lora": {"rank": 4}, "prompt_tuning": {"lr": [3e-2, 1e-1]}}, "lr": 1e-3})
    assert space.grid() == [
        {"method": {"name": "lora", "rank": 4}, "lr": 1e-3},
        {"method": {"name": "prompt_tuning"}, "lr": 3e-2},
        {"method": {"name": "prompt_tuning"}, "lr": 1e-1},
    ]
    import random

    for _ in range(20):
        t = space.sample(random.Random(_))
        assert "lr" not in t["method"]
        assert t["lr"] in ((1e-3,) if t["method"]["name"] == "lora" else (3e-2, 1e-1))


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"methods": {"loar": {}}}, "unknown method 'loar'"),
        ({"methods": {"lora": {"num_virtual_tokens": [8]}}},
         r"methods.lora: unknown hyperparameter"),
        ({"methods": {"lora": {"rank": []}}}, "empty list"),
        ({"methods": {}}, "at least 1"),
        ({"methods": {"lora": {}}, "lr": {"min": 1, "max": 0.1}}, "min"),
    ],
)
def test_bad_spaces_name_the_field(space: dict, message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        SearchSpace.model_validate(space)


def test_bad_value_caught_before_start() -> None:
    space = SearchSpace.model_validate({"methods": {"lora": {"rank": [0, 4]}}, "lr": 1e-3})
    with pytest.raises(Exception, match="lora.rank"):
        space.validate_trials(space.grid())


def test_budgeted_objective_and_pareto_front() -> None:
    results = [
        {"trial": "a", "eval_accuracy": 0.90, "trainable_params": 1000, "trainable_fraction": 0.5},
        {"trial": "b", "eval_accuracy": 0.85, "trainable_params": 10, "trainable_fraction": 0.005},
        {"trial": "c", "eval_accuracy": 0.80, "trainable_params": 20, "trainable_fraction": 0.01},
        {"trial": "d", "eval_accuracy": 0.70, "trainable_params": 5, "trainable_fraction": 0.0025},
        {"trial": "e", "eval_accuracy": None, "trainable_params": 1, "trainable_fraction": 0.001},
    ]
    assert Objective().best(results)["trial"] == "a"
    assert Objective(max_trainable_fraction=0.01).best(results)["trial"] == "b"
    assert Objective(max_trainable_fraction=0.0001).best(results) is None
    assert Objective(metric="trainable_params", mode="min").best(results)["trial"] == "e"
    assert [r["trial"] for r in pareto_front(results, "eval_accuracy", "max")] == ["d", "b", "a"]


def test_search_result_is_its_trials_json(tmp_path) -> None:
    from pipelines.tune import SearchResult

    trials = [{"trial_id": "t1", "metrics": {"eval_accuracy": 0.9}},
              {"trial_id": "t2", "metrics": {"eval_accuracy": 0.7}}]
    res = SearchResult(search_id="s", trials=trials, best=trials[0], pareto=[trials[0]],
                       parent_run_id="p", tracking_uri="sqlite:///x.db", path="/exp",
                       objective=Objective(), reference={"eval_accuracy": 0.5},
                       label_names=["neg", "pos"], dataset_id="d")
    back = SearchResult.load(res.save(tmp_path / "trials.json"))
    assert back == res
    import json

    # a file written before SearchResult had to_json: no path, objective a plain dict
    old = json.loads(res.to_json())
    del old["path"]
    old["objective"] = {"metric": "eval_accuracy", "mode": "max"}
    back = SearchResult.from_json(json.dumps(old))
    assert back.pareto == [trials[0]] and back.path is None and back.objective == Objective()
    with pytest.raises(ValueError, match="search_id"):
        SearchResult.from_json(json.dumps({"trials": []}))
