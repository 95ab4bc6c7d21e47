"""Where a job's output goes: the pipeline's own log records and the libraries' (Ray, Ray
Data, MLflow) to ``run_dir/logs/peftpipe.log``, the console kept for the job's status lines.

Nothing here starts Ray (that is :mod:`pipelines.ray_runtime`); ``quiet_ray`` imports it
to configure its loggers, every other function is plain ``logging`` and ``sys.stdout``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .recipe import Recipe

#: libraries' own loggers: their console lines (INFO progress, warnings) go to the log file
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "mlflow", "alembic")

_RAY_LOG = logging.getLogger("peftpipe.ray")


def log_to_file(recipe: Recipe) -> Path:
    """Send the pipeline's own log records to ``run_dir/logs/peftpipe.log``."""
    path = Path(recipe.run_dir) / "logs" / "peftpipe.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if not any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in root.handlers):
        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
    return path


def quiet_ray(recipe: Recipe) -> None:
    """Ray's (and MLflow's) log records go to ``run_dir/logs/peftpipe.log``; on the
    console only errors.

    Through Ray's documented knobs where they exist: Ray Data's progress bars
    (``DataContext.enable_progress_bars``) and its periodic progress log lines
    (``enable_progress_bars`` off makes it log them instead, so those are raised to
    WARNING like the rest), the driver's copy of worker output (``log_to_driver``), and
    ``RAY_DEDUP_LOGS`` left on. The loggers' own console handlers are set to ERROR and a
    file handler is added (standard ``logging`` API, no Ray internals)."""
    # MLflow's documented level (read when mlflow is first imported): its INFO lines
    # ("Creating initial MLflow database tables...") are not news for the user
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Tune's classic output, silent at the search's verbose=0 (the newer output engine
    # prints an experiment box and TensorBoard hints even when silent); our status lines
    # stand in for it
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # download and weight-loading progress bars (MLflow's artifacts, transformers' loads
    # through huggingface_hub's switch) are noise between the status lines
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    import ray  # noqa: F401 - configures the "ray" loggers and their handlers on import
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "enable_operator_progress_bars"):
        ctx.enable_operator_progress_bars = False
    path = log_to_file(recipe)
    file_handler = next((h for h in logging.getLogger().handlers
                         if getattr(h, "baseFilename", None) == str(path.resolve())), None)
    for name in RAY_LOGGERS:
        lg = logging.getLogger(name)
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.ERROR)
        if file_handler is not None and file_handler not in lg.handlers and not lg.propagate:
            lg.addHandler(file_handler)


def link_ray_logs(recipe: Recipe, ctx: Any) -> None:
    """``run_dir/logs/ray`` points at the logs (worker stdout, errors) of the Ray session
    ``ctx`` (what ``ray.init`` returned)."""
    session = (getattr(ctx, "address_info", None) or {}).get("session_dir")
    if not session:
        return
    logs = Path(recipe.run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    link = logs / "ray"
    with contextlib.suppress(OSError):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(session) / "logs", target_is_directory=True)


class RayletLineFilter(io.TextIOBase):
    """``sys.stdout`` while a quiet job runs: lines Ray's driver prints on behalf of the
    raylet (``(raylet) WARNING: ... worker processes have been started``) go to the log
    file; every other line passes through unchanged."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.pending = stream, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if "(raylet)" in line[:20]:
                _RAY_LOG.warning(re.sub(r"\x1b\[[0-9;]*m", "", line))
            else:
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and "(raylet)" not in self.pending[:20]:
            self.stream.write(self.pending)
            self.pending = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


@contextlib.contextmanager
def raylet_lines_to_log() -> Iterator[None]:
    """Ray's driver prints the raylet's error messages straight to ``sys.stdout`` (its
    error-listener thread; no logger, and ``log_to_driver`` covers worker output only), so
    the only public seam to keep them off a quiet console is the stream itself."""
    original = sys.stdout
    sys.stdout = RayletLineFilter(original)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = original
