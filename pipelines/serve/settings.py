"""What the Ray Serve application of ``peftpipe serve`` runs with.

:class:`ServeSettings` is what the user asks for; :class:`AppSettings` is that plus what
:func:`pipelines.serve.app.build` looks up once before deploying (the served model's name and
alias, its version then, its base and task, the batch wait). Both deployments are bound with
the same :class:`AppSettings`, which Ray pickles to every replica. Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class ServeSettings:
    """What ``peftpipe serve`` starts. ``max_batch_size=1`` serves unbatched (the benchmark's
    comparison); ``max_adapters`` is each replica's LRU size. ``batch_wait_timeout_s``: how
    long a batch waits to fill; None: 10 ms for classifiers, 100 ms for causal LMs, whose
    generation holds the GIL so much that requests reach the batch queue late (measured
    with SmolLM2 at 16 clients: batches of 4.4 requests with 10 ms, 16 with 100 ms, 1.8x
    the requests/s; ``benchmarks/serve_load.py``)."""

    model: str
    tracking_uri: str
    replicas: int = 1
    max_adapters: int = 4
    max_batch_size: int = 16
    batch_wait_timeout_s: float | None = None
    poll_s: float = 1.0
    replica_cpus: float = 1.0
    max_ongoing_requests: int = 64

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_batch_wait(task: str) -> float:
    """The batch wait when the settings name none (why these values: :class:`ServeSettings`)."""
    return 0.01 if task == "classification" else 0.1


@dataclasses.dataclass(frozen=True)
class AppSettings:
    """The settings both deployments are bound with, resolved once by ``build()``.

    ``name``/``alias``: the registered model and the alias followed (None when the settings
    name a fixed ``NAME/VERSION``); ``version``: the version served when ``build()`` ran;
    ``pipeline``: that adapter's ``pipeline`` block (base model, task, tokenizer, labels), the
    one base every replica loads; ``base_fingerprint``: its fingerprint id;
    ``batch_wait_timeout_s``: the batch wait in effect (never None)."""

    serve: ServeSettings
    name: str
    alias: str | None
    version: str
    pipeline: dict[str, Any]
    base_fingerprint: str
    batch_wait_timeout_s: float

    @property
    def task(self) -> str:
        return self.pipeline["task"]

    @classmethod
    def resolve(cls, settings: ServeSettings, base: dict[str, Any], name: str,
                alias: str | None) -> AppSettings:
        """From the settings, :func:`~pipelines.serve.app.base_info`'s answer and the served
        model's parsed ``models:/`` URI."""
        wait = settings.batch_wait_timeout_s
        if wait is None:
            wait = default_batch_wait(base["pipeline"]["task"])
        return cls(serve=settings, name=name, alias=alias, version=base["version"],
                   pipeline=base["pipeline"], base_fingerprint=base["base_fingerprint"],
                   batch_wait_timeout_s=wait)


def model_id(name: str, version: str) -> str:
    """The multiplexed model id of a registered version: ``NAME/VERSION``."""
    return f"{name}/{version}"
