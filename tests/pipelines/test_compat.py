"""The private API pipelines/compat.py relies on is still where it was checked: run after an
upgrade of Ray, DeepSpeed or torch, a failure here names what moved (nothing is started)."""

from __future__ import annotations

import importlib.metadata
import os

from pipelines import compat


def test_ray_train_reads_the_variables_compat_sets() -> None:
    from ray.train.v2._internal import constants, exceptions

    assert constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR == compat.RAY_TRAIN_START_TIMEOUT_ENV
    assert constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR == compat.RAY_TRAIN_POLL_INTERVAL_ENV
    assert hasattr(exceptions, "WorkerGroupStartupTimeoutError")


def test_a_start_timeout_is_recognised_by_its_cause_only() -> None:
    class WorkerGroupStartupTimeoutError(Exception):
        pass

    class ControllerError(Exception):
        def __init__(self, failure: BaseException) -> None:
            self.controller_failure = failure

    assert compat.is_ray_train_start_timeout(ControllerError(WorkerGroupStartupTimeoutError()))
    assert not compat.is_ray_train_start_timeout(ControllerError(RuntimeError()))
    assert not compat.is_ray_train_start_timeout(RuntimeError())


def test_ray_train_variables_are_set_in_this_process(monkeypatch) -> None:
    monkeypatch.delenv(compat.RAY_TRAIN_START_TIMEOUT_ENV, raising=False)
    monkeypatch.setenv(compat.RAY_TRAIN_POLL_INTERVAL_ENV, "3")
    compat.set_ray_train_start_timeout(30.0)
    compat.default_ray_train_poll_interval(0.2)
    assert os.environ[compat.RAY_TRAIN_START_TIMEOUT_ENV] == "30"
    assert os.environ[compat.RAY_TRAIN_POLL_INTERVAL_ENV] == "3"  # the operator's value kept


def test_ray_token_auth_helpers_are_importable() -> None:
    from ray._private.authentication import (  # noqa: F401
        authentication_token_setup,
        http_token_authentication,
    )

    assert callable(authentication_token_setup.maybe_enable_token_auth_if_token_available)
    assert callable(http_token_authentication.get_auth_headers_if_auth_enabled)
    assert isinstance(compat.ray_client_auth_headers(), dict)


def test_ray_cli_is_the_console_scripts_entry_point() -> None:
    (ep,) = [e for e in importlib.metadata.entry_points(group="console_scripts")
             if e.name == "ray"]
    assert ep.value == "ray.scripts.scripts:main"
    assert "from ray.scripts.scripts import main" in compat.ray_cli_command()[-1]
    ctx = compat.ray_start_cli().make_context("start", ["--head", "--port=6390"])
    assert ctx.params["head"] and ctx.params["port"] == 6390


def test_deepspeed_still_reads_the_compatible_ops_dict() -> None:
    # read from the installed files: importing deepspeed costs seconds and probes compilers
    dist = importlib.metadata.distribution("deepspeed")
    comm = dist.locate_file("deepspeed/comm/torch.py").read_text()
    assert "deepspeed.ops.__compatible_ops__" in comm
    builder = dist.locate_file("deepspeed/ops/op_builder/cpu/comm.py").read_text()
    assert 'NAME = "deepspeed_shm_comm"' in builder


def test_release_freed_tensors_to_the_os_runs() -> None:
    compat.release_freed_tensors_to_the_os()  # twice is harmless: a process-wide setting
    compat.release_freed_tensors_to_the_os()


def test_torch_dispatch_mode_sees_outputs_on_the_meta_device() -> None:
    import torch

    seen: list[tuple[int, ...]] = []

    class Shapes(compat.torch_dispatch_mode()):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen.extend(tuple(t.shape) for t in compat.tree_leaves(out)
                        if isinstance(t, torch.Tensor))
            return out

    a = torch.empty(2, 3, device="meta")
    with Shapes():
        a @ torch.empty(3, 4, device="meta")
    assert (2, 4) in seen
    assert compat.tree_leaves(((1, [2]), {"a": 3})) == [1, 2, 3]


def test_fast_failure_detection_names_ray_config_entries() -> None:
    env = compat.fast_node_failure_detection_env()
    assert all(k.startswith("RAY_health_check_") for k in env)
