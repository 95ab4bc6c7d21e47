"""Every recipe shipped in ``pipelines/recipes`` loads, and every run it can start (its own
``train`` run, each trial of its search's grid, or sampled trials) builds the worker spec
the workers would receive, without starting Ray."""

from __future__ import annotations

import random

import pytest

import peft_core
from pipelines.recipe import available_recipes, builtin_recipe, load_recipe
from pipelines.train import TrainConfig
from pipelines.train.spec import WorkerSpec


def test_the_shipped_recipes_are_the_ones_tested() -> None:
    assert {"demo", "sentiment_minilm", "qa_smollm2", "llama_lora_zero3"} <= set(
        available_recipes())


@pytest.mark.parametrize("name", available_recipes())
def test_every_shipped_recipe_loads_and_its_runs_build(name: str) -> None:
    recipe = load_recipe(builtin_recipe(name))
    assert recipe.name == name
    configs = [recipe.train]
    if recipe.tune is not None:
        space = recipe.tune.space
        trials = (space.grid() if recipe.tune.searcher == "grid"
                  else [space.sample(random.Random(i)) for i in range(8)])
        assert trials
        configs += [recipe.train.model_copy(update=t) for t in trials]
    for config in configs:
        config = TrainConfig.model_validate(config.model_dump())  # as a trial re-validates it
        method = WorkerSpec.build(config, _manifest_stub()).method
        assert isinstance(method, peft_core.MethodConfig)
        assert method.name == config.method["name"]


def _manifest_stub():
    """A dataset record for the spec (the spec stores it; nothing here reads the data)."""
    from pipelines.data.manifest import Manifest

    return Manifest.model_construct(task="causal_lm", dataset_id="stub")
