"""The Ray Serve application behind ``peftpipe serve``: registered adapters over HTTP.

Two deployments, module-level classes bound here with one
:class:`~pipelines.serve.settings.AppSettings` that :func:`build` resolves once:

- ``AdapterReplica`` (:mod:`pipelines.serve.replica`; ``replicas`` of them): one base model
  per replica and an LRU of adapters over it (Ray Serve model multiplexing keyed by
  ``NAME/VERSION``; the adapters share the base's frozen tensors,
  :class:`~pipelines.serve.adapters.SharedBase`), with dynamic request batching
  (``serve.batch``; a batch holding several adapters runs one forward per adapter).
- ``Api`` (:mod:`pipelines.serve.ingress`; the HTTP ingress, FastAPI): ``POST /predict``
  (classifiers), OpenAI-style ``POST /v1/completions`` and ``POST /v1/chat/completions``
  (causal LMs, greedy, no streaming), ``GET /health``. It follows the registry alias it was
  started on: a thread polls the alias, has a replica load the new version, and only then
  sends new requests to it; requests already routed finish on the version they were routed
  to, and the version that answered (and the replica) is in every response. Each replica
  also loads the served version itself when the alias moves, so with ``replicas > 1`` all of
  them share its traffic (Serve routes a model id to the replicas that have it loaded). A
  request may name another version or model sharing the base (``model`` field or
  ``x-peftpipe-model`` header: ``NAME@ALIAS``, ``NAME/VERSION``, ``models:/...``, or a bare
  version of the served model; :mod:`pipelines.serve.protocol`).
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING, Any

from .protocol import HEADER
from .settings import AppSettings, ServeSettings

if TYPE_CHECKING:
    from ray.serve import Application

__all__ = ["APP_NAME", "HEADER", "AppSettings", "ServeSettings", "app_settings", "base_info",
           "build", "start", "stop"]

APP_NAME = "peftpipe"


def base_info(settings: ServeSettings) -> dict[str, Any]:
    """The served alias's current adapter's ``pipeline`` block and base fingerprint id: what
    every replica loads as its one base."""
    from mlflow import MlflowClient

    import peft_core

    from ..registry import download
    from .local import pipeline_info
    from .mlflow_model import base_fingerprint_id

    client = MlflowClient(tracking_uri=settings.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="peftpipe-serve-") as tmp:
        version, folder = download(client, settings.model, tmp)
        info = pipeline_info(folder)
        fp = base_fingerprint_id(peft_core.read_adapter_config(folder)["base_model"])
    return {"pipeline": info, "base_fingerprint": fp, "version": version}


def app_settings(settings: ServeSettings) -> AppSettings:
    """What both deployments are bound with: ``settings`` plus the served model's name,
    alias, current version, base and task, looked up once."""
    from ..registry import parse_model_uri

    base = base_info(settings)
    name, alias, _ = parse_model_uri(settings.model)
    return AppSettings.resolve(settings, base, name, alias)


def build(settings: ServeSettings) -> Application:
    """The Serve application (bound deployments) for ``settings``."""
    from .ingress import Api
    from .replica import AdapterReplica, check_limits

    app = app_settings(settings)
    replica = AdapterReplica.options(num_replicas=settings.replicas,
                                     max_ongoing_requests=settings.max_ongoing_requests,
                                     ray_actor_options={"num_cpus": settings.replica_cpus})
    check_limits(app)
    ingress = Api.options(num_replicas=1, max_ongoing_requests=4 * settings.max_ongoing_requests,
                          ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(app), app)


def start(settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy the application on the connected Ray cluster; returns its base URL."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(build(settings), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def stop() -> None:
    """Delete the application (Serve itself keeps running on the cluster)."""
    from ray import serve

    serve.delete(APP_NAME)
