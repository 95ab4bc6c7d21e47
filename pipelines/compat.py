"""Every use of another library's private or internal API, one small function each.

Each function names the version it was checked against and why no public API does the
job, so an upgrade of Ray, DeepSpeed, PyTorch or glibc is checked here and in
``tests/pipelines/test_compat.py``, not across the project. ``tests/test_architecture.py``
fails when a module other than this one imports a library's ``_private``/``_internal``
(any underscored) module or uses ``ctypes``.

Imports are inside the functions: the CLI and ``cluster`` import this module without
loading Ray, DeepSpeed or torch.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# -- glibc ---------------------------------------------------------------------------------------


def release_freed_tensors_to_the_os() -> None:
    """Make glibc return every large freed block to the OS at once (Linux only).

    glibc serves allocations below a threshold from its heap and raises that threshold
    (up to 32 MiB) whenever a larger block is freed; under ZeRO-3 every gathered weight is
    such a block, so its successors stay in a fragmented heap that RSS keeps counting. A
    fixed 1 MiB threshold (as ``MALLOC_MMAP_THRESHOLD_`` would set at process start) maps
    large tensors separately. Measured on a 1.4 GB Llama, 2 ranks, ZeRO-3: per-rank peak
    RSS after loading 2441 -> 1676 MB, after the first step 2799 -> 1848 MB.
    """
    # Checked against glibc 2.36 (Debian 12). ctypes because neither Python nor torch
    # exposes mallopt, and MALLOC_MMAP_THRESHOLD_ counts only at the start of a process,
    # which Ray, not this code, starts.
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    m_mmap_threshold = -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 20)


# -- DeepSpeed -----------------------------------------------------------------------------------


def disable_deepspeed_shm_comm() -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce in this process.

    DeepSpeed builds that op on first use (a ~95 s JIT compile) whenever it is marked
    compatible."""
    # Checked against DeepSpeed 0.19.8: deepspeed/comm/torch.py reads
    # deepspeed.ops.__compatible_ops__[builder.NAME]; the dict is probed once per process
    # (deepspeed/ops/__init__.py keeps one instance, so the edit persists). No config key
    # or environment variable turns the op off.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# -- Ray -----------------------------------------------------------------------------------------

#: Ray Train (v2) reads these from the environment of the process that calls ``fit()`` and
#: passes them to its controller; checked against Ray 2.60, where they are defined in
#: ray.train.v2._internal.constants (WORKER_GROUP_START_TIMEOUT_S_ENV_VAR,
#: HEALTH_CHECK_INTERVAL_S_ENV_VAR) and no TrainConfig/RunConfig field sets them.
RAY_TRAIN_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
RAY_TRAIN_POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def set_ray_train_start_timeout(seconds: float) -> None:
    """How long Ray Train waits for a worker group's placement group before it counts a
    failed start (call it in the process that runs ``fit``)."""
    os.environ[RAY_TRAIN_START_TIMEOUT_ENV] = f"{seconds:g}"


def default_ray_train_poll_interval(seconds: float) -> None:
    """How often Ray Train's controller polls its workers (and so takes their reports),
    unless the operator set it; call it in the process that runs ``fit``."""
    os.environ.setdefault(RAY_TRAIN_POLL_INTERVAL_ENV, f"{seconds:g}")


def is_ray_train_start_timeout(error: BaseException) -> bool:
    """Whether ``error`` (a ``ray.train.ControllerError``) is Ray Train giving up on a
    worker group it could not place within the start timeout."""
    # Checked against Ray 2.60: the public ControllerError wraps the cause as
    # .controller_failure; the cause's class, WorkerGroupStartupTimeoutError, lives in
    # ray.train.v2._internal.exceptions and is exported nowhere public, so it is matched
    # by name (an import would break on the next move of that module).
    failure = getattr(error, "controller_failure", None)
    return failure is not None and type(failure).__name__ == "WorkerGroupStartupTimeoutError"


def ray_client_auth_headers() -> dict[str, str]:
    """Turn on Ray's token authentication for this process's Ray clients when the user
    has a token (``$RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``; ``RAY_AUTH_MODE`` set by the
    user wins) and return the HTTP headers that carry it ({} without one)."""
    # Checked against Ray 2.60: Ray turns token mode on and loads the token only inside
    # `ray start`/`ray.init` and its own SDK clients; it has no public function for a
    # process that only talks to a cluster it did not start (finding the token where Ray
    # looks for it, in Ray's order, and the header Ray's servers accept). Doing that by
    # hand would copy Ray's rules and drift from them.
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
        from ray._private.authentication.http_token_authentication import (
            get_auth_headers_if_auth_enabled,
        )
    except ImportError:  # a Ray without token authentication
        return {}
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    return dict(get_auth_headers_if_auth_enabled({}))


def ray_cli_command() -> list[str]:
    """The command line of Ray's ``ray`` CLI run by this interpreter (for an environment
    whose ``ray`` script is not beside ``sys.executable``)."""
    # Checked against Ray 2.60: ray.scripts.scripts:main is the `ray` console script's
    # entry point in Ray's package metadata; Ray has no Python API that starts a node.
    return [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]


def ray_start_cli() -> Any:
    """The click command of ``ray start`` (to parse its flags with Ray's own definition,
    nothing started)."""
    # Checked against Ray 2.60: the `start` command of ray.scripts.scripts (the `ray`
    # console script's module); Ray documents the flags, not a parser for them.
    from ray.scripts.scripts import start

    return start


def fast_node_failure_detection_env() -> dict[str, str]:
    """Environment for ``ray start`` under which a lost node is declared dead within ~3 s
    instead of ~30 s (GCS health checks every second, dead after 3 misses)."""
    # Checked against Ray 2.60: RayConfig entries (src/ray/common/ray_config_def.h), read
    # as RAY_<name> by every Ray process; `ray start` has no flag for them and
    # ray.init's _system_config only reaches a cluster it starts itself.
    return {"RAY_health_check_initial_delay_ms": "1000",
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3"}


# -- PyTorch -------------------------------------------------------------------------------------


def torch_dispatch_mode() -> type:
    """``TorchDispatchMode``: the base class of a mode that sees every op's outputs,
    backward's included, on the meta device too."""
    # Checked against torch 2.13: the documented __torch_dispatch__ extension point
    # ("Extending PyTorch") is only importable from torch.utils._python_dispatch.
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of a nested structure of lists, tuples and dicts (an op's outputs)."""
    # Checked against torch 2.13: torch.utils._pytree is the flattening that dispatch
    # modes use for op outputs; torch has no public torch.utils.pytree yet.
    from torch.utils._pytree import tree_leaves as leaves

    return list(leaves(tree))
