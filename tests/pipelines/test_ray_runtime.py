"""ensure_ray: the one place a driver process starts or joins Ray (ray.init itself is faked:
nothing starts)."""

from __future__ import annotations

import pytest

from pipelines import ray_runtime


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    calls: list[dict] = []
    state = {"up": False}

    def init(**kwargs):
        calls.append(kwargs)
        state["up"] = True
        return "ctx"

    monkeypatch.setattr(ray, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(ray, "init", init)
    return calls, state


def test_a_local_ray_gets_the_local_options_and_the_defaults(fake_ray) -> None:
    calls, _ = fake_ray
    assert ray_runtime.ensure_ray(local={"num_cpus": 2}, logging_level="ERROR") == "ctx"
    assert calls == [{"address": None, "include_dashboard": True, "num_cpus": 2,
                      "logging_level": "ERROR"}]


def test_joining_leaves_the_local_options_out(fake_ray) -> None:
    calls, _ = fake_ray
    ray_runtime.ensure_ray("auto", local={"num_cpus": 2}, log_to_driver=False)
    assert calls == [{"address": "auto", "log_to_driver": False}]


def test_a_connected_process_is_left_as_it_is(fake_ray) -> None:
    calls, state = fake_ray
    state["up"] = True
    assert ray_runtime.ensure_ray("auto") is None
    assert calls == []


def test_the_caller_overrides_a_default(fake_ray) -> None:
    calls, _ = fake_ray
    ray_runtime.ensure_ray(local={"include_dashboard": False})
    assert calls[0]["include_dashboard"] is False
