"""``AdapterReplica``, the model deployment of ``peftpipe serve``: one base model per replica
and an LRU of adapters over it (Ray Serve model multiplexing keyed by ``NAME/VERSION``; the
adapters share the base's frozen tensors, :class:`~pipelines.serve.adapters.SharedBase`), with
dynamic request batching (``serve.batch``; a batch holding several adapters runs one forward
per adapter). Every replica follows the served alias itself.

Bound by :func:`pipelines.serve.app.build` with an
:class:`~pipelines.serve.settings.AppSettings`.
"""

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

from ray import serve

from .settings import AppSettings, model_id


def replica_tag() -> str:
    """This Serve replica's id (which replica answered a request)."""
    return serve.get_replica_context().replica_id.unique_id


def rss_mb() -> float:
    """This process's resident memory (``VmRSS``), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def adapter_cache(app: AppSettings) -> Any:
    """``serve.multiplexed`` with the replica's LRU size (``max_adapters``)."""
    return serve.multiplexed(max_num_models_per_replica=app.serve.max_adapters)


def batching(app: AppSettings) -> Any:
    """``serve.batch`` with the settings' batch size and wait."""
    return serve.batch(max_batch_size=app.serve.max_batch_size,
                       batch_wait_timeout_s=app.batch_wait_timeout_s)


def check_limits(app: AppSettings) -> None:
    """Serve's own checks of the LRU size and the batching limits (they raise on a bad one).
    ``build()`` runs them so that a bad limit fails there, before anything is deployed, as
    it did when these limits were arguments of decorators on the class."""
    adapter_cache(app)
    batching(app)


def group(keys: list[Any]) -> dict[Any, list[int]]:
    """The positions of each distinct key, keys in first-seen order."""
    out: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return out


@serve.deployment
class AdapterReplica:
    """One base model and an LRU of adapters over it; ``predict``/``generate`` batched."""

    def __init__(self, app: AppSettings) -> None:
        from mlflow import MlflowClient

        from .adapters import SharedBase

        self.settings = app
        self.client = MlflowClient(tracking_uri=app.serve.tracking_uri)
        self.shared = SharedBase(app.pipeline)
        self.scratch = Path(tempfile.mkdtemp(prefix="peftpipe-replica-"))
        self.replica = replica_tag()
        self.following: str | None = None
        self.follow_error: str | None = None
        # The LRU size and the batching limits are settings, known only once bound, so
        # Serve's decorators are applied here, per instance, rather than on the class.
        self.get_adapter = adapter_cache(app)(self._adapter_loader())
        batched = batching(app)
        self._predict_batch = batched(self._predict_items)
        self._generate_batch = batched(self._generate_items)
        # Serve routes a model id only to replicas that report it loaded (others get a
        # request only when those are saturated), so a replica that waited to be asked
        # would never take its share of the champion's traffic: each one loads the
        # served version itself, now and whenever the alias moves.
        asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        from ..registry import alias_version

        app = self.settings
        while True:
            try:
                v = (await asyncio.to_thread(alias_version, self.client, app.name, app.alias)
                     if app.alias else app.version)
                if v is not None and v != self.following:
                    await self.get_adapter(model_id(app.name, v))
                    self.following, self.follow_error = v, None
            except Exception as e:  # keep the adapters we have; stats() says why
                self.follow_error = f"{type(e).__name__}: {e}"
            await asyncio.sleep(app.serve.poll_s)

    async def stats(self) -> dict[str, Any]:
        """This replica's process: pid, resident memory (VmRSS), the version it follows."""
        return {"replica": self.replica, "pid": os.getpid(), "rss_mb": rss_mb(),
                "following": self.following, "follow_error": self.follow_error}

    def _adapter_loader(self) -> Any:
        """The function ``serve.multiplexed`` wraps: a plain function of the model id (Serve
        keeps its LRU on the function it wraps, which a bound method cannot hold)."""
        async def load_adapter(model_id: str) -> Any:
            return await asyncio.to_thread(self._load, model_id)

        return load_adapter

    def _load(self, model_id: str) -> Any:
        from ..registry import download

        mname, version = model_id.rsplit("/", 1)
        _, folder = download(self.client, f"models:/{mname}/{version}",
                             self.scratch / mname / version)
        return self.shared.attach(folder, source=model_id)

    async def _adapter_or_error(self, model_id: str) -> tuple[Any, str | None]:
        try:
            return await self.get_adapter(model_id), None
        except Exception as e:  # reported to the caller as a 400 with the reason
            return None, f"{type(e).__name__}: {e}"

    async def warm(self, model_id: str) -> dict[str, Any]:
        adapter, error = await self._adapter_or_error(model_id)
        return {"model_id": model_id, "error": error}

    async def predict(self, item: tuple[str, list[str]]) -> dict[str, Any]:
        return await self._predict_batch(item)

    async def _predict_items(self, items: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
        """One batch of ``predict`` calls: one forward per adapter in it."""
        from .local import predict, uses_posterior

        out: list[dict[str, Any] | None] = [None] * len(items)
        for mid, idx in group([m for m, _ in items]).items():
            adapter, error = await self._adapter_or_error(mid)
            if error:
                for i in idx:
                    out[i] = {"error": error}
                continue
            texts = [t for i in idx for t in items[i][1]]
            rows = await asyncio.to_thread(predict, adapter, texts)
            kind = "laplace" if uses_posterior(adapter) else "softmax"
            k = 0
            for i in idx:
                n = len(items[i][1])
                out[i] = {"model_id": mid, "predictions": rows[k:k + n],
                          "predictive": kind, "batch_size": len(texts),
                          "replica": self.replica}
                k += n
        return out

    async def generate(self, item: tuple[str, Any, int, bool]) -> dict[str, Any]:
        return await self._generate_batch(item)

    async def _generate_items(self, items: list[tuple[str, Any, int, bool]]
                              ) -> list[dict[str, Any]]:
        """One batch of ``generate`` calls: one generate call per (adapter, length, chat or
        not)."""
        from .local import generate_batch

        out: list[dict[str, Any] | None] = [None] * len(items)
        for (mid, n, chat), idx in group([(m, n, c) for m, _, n, c in items]).items():
            adapter, error = await self._adapter_or_error(mid)
            if error:
                for i in idx:
                    out[i] = {"error": error}
                continue
            rows = await asyncio.to_thread(generate_batch, adapter,
                                           [items[i][1] for i in idx],
                                           max_new_tokens=n, chat=chat)
            for i, row in zip(idx, rows):
                out[i] = {"model_id": mid, **row, "batch_size": len(idx),
                          "replica": self.replica}
        return out
