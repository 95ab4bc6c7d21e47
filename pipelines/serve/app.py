"""The Ray Serve application behind ``peftpipe serve``: registered adapters over HTTP.

Two deployments:

- ``AdapterReplica`` (``replicas`` of them): one base model per replica and an LRU of
  adapters over it (Ray Serve model multiplexing keyed by ``NAME/VERSION``; the adapters
  share the base's frozen tensors, :class:`~pipelines.serve.adapters.SharedBase`), with
  dynamic request batching (``@serve.batch``; a batch holding several adapters runs one
  forward per adapter).
- ``Api`` (the HTTP ingress, FastAPI): ``POST /predict`` (classifiers), OpenAI-style
  ``POST /v1/completions`` and ``POST /v1/chat/completions`` (causal LMs, greedy, no
  streaming), ``GET /health``. It follows the registry alias it was started on: a thread
  polls the alias, has a replica load the new version, and only then sends new requests to
  it; requests already routed finish on the version they were routed to, and the version
  that answered (and the replica) is in every response. Each replica also loads the served
  version itself when the alias moves, so with ``replicas > 1`` all of them share its
  traffic (Serve routes a model id to the replicas that have it loaded). A request may name
  another version or model sharing the base (``model`` field or ``x-peftpipe-model``
  header: ``NAME@ALIAS``, ``NAME/VERSION``, ``models:/...``, or a bare version of the served
  model).
"""

import asyncio
import dataclasses
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

# Real (not postponed) annotations in this module: the deployments are pickled by value, so
# FastAPI could not resolve string annotations such as 'Request' in their globals.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

APP_NAME = "peftpipe"
HEADER = "x-peftpipe-model"


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


def _replica_tag() -> str:
    """This Serve replica's id (which replica answered a request)."""
    from ray import serve

    return serve.get_replica_context().replica_id.unique_id


def _rss_mb() -> float:
    """This process's resident memory (``VmRSS``), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _model_id(name: str, version: str) -> str:
    return f"{name}/{version}"


def _resolve(client, default_name: str, ref: str) -> tuple[str, str]:
    """(name, version) for a request's model reference."""
    from ..registry import RegistryError, alias_version, parse_model_uri

    ref = ref.strip()
    if ref.isdigit():
        return default_name, ref
    name, alias, version = parse_model_uri(ref if ref.startswith("models:/") else f"models:/{ref}")
    if alias:
        version = alias_version(client, name, alias)
        if version is None:
            raise RegistryError(f"model {name!r} has no version with alias {alias!r}")
    return name, str(version)


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


def build(settings: ServeSettings):
    """The Serve application (bound deployments) for ``settings``."""
    from ray import serve

    from ..registry import parse_model_uri

    base = base_info(settings)
    name, alias, _ = parse_model_uri(settings.model)
    task = base["pipeline"]["task"]
    batch_wait = settings.batch_wait_timeout_s
    if batch_wait is None:
        batch_wait = 0.01 if task == "classification" else 0.1

    @serve.deployment(num_replicas=settings.replicas,
                      max_ongoing_requests=settings.max_ongoing_requests,
                      ray_actor_options={"num_cpus": settings.replica_cpus})
    class AdapterReplica:
        def __init__(self) -> None:
            from mlflow import MlflowClient

            from .adapters import SharedBase

            self.client = MlflowClient(tracking_uri=settings.tracking_uri)
            self.shared = SharedBase(base["pipeline"])
            self.scratch = Path(tempfile.mkdtemp(prefix="peftpipe-replica-"))
            self.replica = _replica_tag()
            self.following: str | None = None
            self.follow_error: str | None = None
            # Serve routes a model id only to replicas that report it loaded (others get a
            # request only when those are saturated), so a replica that waited to be asked
            # would never take its share of the champion's traffic: each one loads the
            # served version itself, now and whenever the alias moves.
            asyncio.get_running_loop().create_task(self._follow())

        async def _follow(self) -> None:
            from ..registry import alias_version

            while True:
                try:
                    v = (await asyncio.to_thread(alias_version, self.client, name, alias)
                         if alias else base["version"])
                    if v is not None and v != self.following:
                        await self.get_adapter(_model_id(name, v))
                        self.following, self.follow_error = v, None
                except Exception as e:  # keep the adapters we have; stats() says why
                    self.follow_error = f"{type(e).__name__}: {e}"
                await asyncio.sleep(settings.poll_s)

        async def stats(self) -> dict[str, Any]:
            """This replica's process: pid, resident memory (VmRSS), the version it follows."""
            return {"replica": self.replica, "pid": os.getpid(), "rss_mb": _rss_mb(),
                    "following": self.following, "follow_error": self.follow_error}

        @serve.multiplexed(max_num_models_per_replica=settings.max_adapters)
        async def get_adapter(self, model_id: str):
            return await asyncio.to_thread(self._load, model_id)

        def _load(self, model_id: str):
            from ..registry import download

            mname, version = model_id.rsplit("/", 1)
            _, folder = download(self.client, f"models:/{mname}/{version}",
                                 self.scratch / mname / version)
            return self.shared.attach(folder, source=model_id)

        async def _adapter_or_error(self, model_id: str):
            try:
                return await self.get_adapter(model_id), None
            except Exception as e:  # reported to the caller as a 400 with the reason
                return None, f"{type(e).__name__}: {e}"

        async def warm(self, model_id: str) -> dict[str, Any]:
            adapter, error = await self._adapter_or_error(model_id)
            return {"model_id": model_id, "error": error}

        async def predict(self, item: tuple[str, list[str]]) -> dict[str, Any]:
            return await self._predict_batch(item)

        @serve.batch(max_batch_size=settings.max_batch_size,
                     batch_wait_timeout_s=batch_wait)
        async def _predict_batch(self, items: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
            from .local import predict, uses_posterior

            out: list[dict[str, Any] | None] = [None] * len(items)
            for model_id in dict.fromkeys(m for m, _ in items):
                idx = [i for i, (m, _) in enumerate(items) if m == model_id]
                adapter, error = await self._adapter_or_error(model_id)
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
                    out[i] = {"model_id": model_id, "predictions": rows[k:k + n],
                              "predictive": kind, "batch_size": len(texts),
                              "replica": self.replica}
                    k += n
            return out

        async def generate(self, item: tuple[str, Any, int, bool]) -> dict[str, Any]:
            return await self._generate_batch(item)

        @serve.batch(max_batch_size=settings.max_batch_size,
                     batch_wait_timeout_s=batch_wait)
        async def _generate_batch(self, items: list[tuple[str, Any, int, bool]]
                                  ) -> list[dict[str, Any]]:
            from .local import generate_batch

            out: list[dict[str, Any] | None] = [None] * len(items)
            # one generate call per (adapter, length, chat or not)
            for key in dict.fromkeys((m, n, c) for m, _, n, c in items):
                idx = [i for i, it in enumerate(items) if (it[0], it[2], it[3]) == key]
                adapter, error = await self._adapter_or_error(key[0])
                if error:
                    for i in idx:
                        out[i] = {"error": error}
                    continue
                rows = await asyncio.to_thread(generate_batch, adapter,
                                               [items[i][1] for i in idx],
                                               max_new_tokens=key[1], chat=key[2])
                for i, row in zip(idx, rows):
                    out[i] = {"model_id": key[0], **row, "batch_size": len(idx),
                              "replica": self.replica}
            return out

    api = FastAPI(title="peftpipe serve")

    @serve.deployment(num_replicas=1, max_ongoing_requests=4 * settings.max_ongoing_requests,
                      ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Api:
        def __init__(self, replicas) -> None:
            from mlflow import MlflowClient

            self.replicas = replicas
            self.client = MlflowClient(tracking_uri=settings.tracking_uri)
            self.version = base["version"]
            self.switches: list[dict[str, Any]] = []
            self.poll_error: str | None = None
            self._stop = threading.Event()
            threading.Thread(target=self._follow, daemon=True, name="alias-poll").start()

        def _follow(self) -> None:
            """Poll the alias; load a new version on a replica before routing to it."""
            from ..registry import alias_version

            while not self._stop.wait(settings.poll_s):
                try:
                    v = alias_version(self.client, name, alias) if alias else None
                    if v is None or v == self.version:
                        continue
                    mid = _model_id(name, v)
                    res = self.replicas.options(multiplexed_model_id=mid).warm.remote(mid) \
                        .result(timeout_s=600)
                    if res["error"]:
                        raise RuntimeError(f"v{v} cannot be served: {res['error']}")
                    self.switches.append({"from": self.version, "to": v, "at": time.time()})
                    self.version, self.poll_error = v, None
                except Exception as e:  # keep serving the version we have; say why in /health
                    self.poll_error = f"{type(e).__name__}: {e}"

        async def _target(self, request: Request, body: dict[str, Any]) -> tuple[str, str]:
            ref = body.get("model") or request.headers.get(HEADER)
            if not ref or ref in (name, settings.model, f"{name}@{alias}"):
                return name, self.version
            return await asyncio.to_thread(_resolve, self.client, name, str(ref))

        def _need(self, kind: str) -> JSONResponse | None:
            if (kind == "classification") != (task == "classification"):
                other = "/predict" if task == "classification" else "/v1/completions"
                return JSONResponse({"error": f"this server serves a {task} model; use {other}"},
                                    status_code=400)
            return None

        @staticmethod
        async def _json(request: Request) -> dict[str, Any]:
            try:
                body = await request.json()
            except Exception:
                body = None
            if not isinstance(body, dict):
                raise ValueError("request body: expected a JSON object")
            return body

        async def _call(self, request: Request, kind: str, make_item):
            refused = self._need(kind)
            if refused is not None:
                return None, refused
            try:
                body = await self._json(request)
                mname, version = await self._target(request, body)
                item = make_item(_model_id(mname, version), body)
            except Exception as e:  # bad input: 400 with the reason
                return None, JSONResponse({"error": str(e)}, status_code=400)
            handle = self.replicas.options(multiplexed_model_id=item[0])
            method = handle.predict if kind == "classification" else handle.generate
            res = await method.remote(item)
            if res.get("error"):
                return None, JSONResponse({"error": res["error"]}, status_code=400)
            return {"model": item[0], "version": version, "name": mname, **res}, None

        @api.post("/predict")
        async def predict(self, request: Request):
            def item(mid: str, body: dict[str, Any]):
                texts = body.get("texts", body.get("text"))
                texts = [texts] if isinstance(texts, str) else texts
                if not texts or not all(isinstance(t, str) for t in texts):
                    raise ValueError("request body: expected 'text' (a string) or 'texts' "
                                     "(a list of strings)")
                return (mid, texts)

            res, err = await self._call(request, "classification", item)
            if err is not None:
                return err
            return {k: res[k] for k in ("model", "name", "version", "predictions", "predictive",
                                        "batch_size", "replica")}

        @api.post("/v1/completions")
        async def completions(self, request: Request):
            return await self._openai(request, chat=False)

        @api.post("/v1/chat/completions")
        async def chat_completions(self, request: Request):
            return await self._openai(request, chat=True)

        async def _openai(self, request: Request, chat: bool):
            def item(mid: str, body: dict[str, Any]):
                if body.get("stream"):
                    raise ValueError("stream: streaming is not supported; send stream=false")
                n = body.get("max_tokens", 16)
                if not isinstance(n, int) or not 1 <= n <= 2048:
                    raise ValueError(f"max_tokens: expected an integer in 1..2048, got {n!r}")
                if chat:
                    msgs = body.get("messages")
                    if (not isinstance(msgs, list) or not msgs or not all(
                            isinstance(m, dict) and isinstance(m.get("content"), str)
                            for m in msgs)):
                        raise ValueError("messages: expected a list of {role, content} objects")
                    return (mid, [{"role": str(m.get("role", "user")), "content": m["content"]}
                                  for m in msgs], n, True)
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                if not isinstance(prompt, str):
                    raise ValueError("prompt: expected a string (one prompt per request)")
                return (mid, prompt, n, False)

            res, err = await self._call(request, "causal_lm", item)
            if err is not None:
                return err
            usage = {"prompt_tokens": res["prompt_tokens"],
                     "completion_tokens": res["completion_tokens"],
                     "total_tokens": res["prompt_tokens"] + res["completion_tokens"]}
            common = {"created": int(time.time()), "model": res["model"],
                      "version": res["version"], "usage": usage, "batch_size": res["batch_size"],
                      "replica": res["replica"]}
            if chat:
                return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                        "choices": [{"index": 0, "finish_reason": res["finish_reason"],
                                     "message": {"role": "assistant", "content": res["text"]}}],
                        **common}
            return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                    "choices": [{"index": 0, "text": res["text"], "logprobs": None,
                                 "finish_reason": res["finish_reason"]}], **common}

        @api.get("/health")
        async def health(self):
            return {"status": "ok", "model": name, "alias": alias, "version": self.version,
                    "task": task, "base_model": base["pipeline"]["model"],
                    "base_fingerprint": base["base_fingerprint"], "replicas": settings.replicas,
                    "max_adapters": settings.max_adapters,
                    "max_batch_size": settings.max_batch_size,
                    "batch_wait_timeout_s": batch_wait,
                    "switches": self.switches[-10:], "poll_error": self.poll_error}

    return Api.bind(AdapterReplica.bind())


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
