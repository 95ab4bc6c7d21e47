"""``Api``, the HTTP ingress deployment of ``peftpipe serve`` (FastAPI): ``POST /predict``,
``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /health``.

It follows the registry alias it was started on: a thread polls the alias, has a replica load
the new version, and only then sends new requests to it; requests already routed finish on
the version they were routed to. Request parsing and answers: :mod:`pipelines.serve.protocol`.

Bound by :func:`pipelines.serve.app.build` with the ``AdapterReplica`` deployment and an
:class:`~pipelines.serve.settings.AppSettings`.
"""

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

# Real (not postponed) annotations in this module: the deployment is pickled by value, so
# FastAPI could not resolve string annotations such as 'Request' in its globals.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from .protocol import (
    HEADER,
    completion_body,
    error_response,
    generate_item,
    predict_body,
    predict_item,
    read_json,
    resolve_ref,
    wrong_endpoint,
)
from .settings import AppSettings, model_id

api = FastAPI(title="peftpipe serve")

MakeItem = Callable[[str, dict[str, Any]], tuple]


@serve.deployment
@serve.ingress(api)
class Api:
    """The HTTP endpoints, routing each request to the version it names or the one served."""

    def __init__(self, replicas: DeploymentHandle, app: AppSettings) -> None:
        from mlflow import MlflowClient

        self.replicas = replicas
        self.settings = app  # not self.app: Serve's ASGI wrapper owns that name
        self.client = MlflowClient(tracking_uri=app.serve.tracking_uri)
        self.version = app.version
        self.switches: list[dict[str, Any]] = []
        self.poll_error: str | None = None
        self._stop = threading.Event()
        threading.Thread(target=self._follow, daemon=True, name="alias-poll").start()

    def _follow(self) -> None:
        """Poll the alias; load a new version on a replica before routing to it."""
        while not self._stop.wait(self.settings.serve.poll_s):
            try:
                self._poll_once()
            except Exception as e:  # keep serving the version we have; say why in /health
                self.poll_error = f"{type(e).__name__}: {e}"

    def _poll_once(self) -> None:
        from ..registry import alias_version

        app = self.settings
        v = alias_version(self.client, app.name, app.alias) if app.alias else None
        if v is None or v == self.version:
            return
        mid = model_id(app.name, v)
        res = self.replicas.options(multiplexed_model_id=mid).warm.remote(mid) \
            .result(timeout_s=600)
        if res["error"]:
            raise RuntimeError(f"v{v} cannot be served: {res['error']}")
        self.switches.append({"from": self.version, "to": v, "at": time.time()})
        self.version, self.poll_error = v, None

    async def _target(self, request: Request, body: dict[str, Any]) -> tuple[str, str]:
        app = self.settings
        ref = body.get("model") or request.headers.get(HEADER)
        if not ref or ref in (app.name, app.serve.model, f"{app.name}@{app.alias}"):
            return app.name, self.version
        return await asyncio.to_thread(resolve_ref, self.client, app.name, str(ref))

    async def _call(self, request: Request, kind: str, make_item: MakeItem
                    ) -> tuple[dict[str, Any] | None, JSONResponse | None]:
        refused = wrong_endpoint(self.settings.task, kind)
        if refused is not None:
            return None, refused
        try:
            body = await read_json(request)
            mname, version = await self._target(request, body)
            item = make_item(model_id(mname, version), body)
        except Exception as e:  # bad input: 400 with the reason
            return None, error_response(str(e))
        handle = self.replicas.options(multiplexed_model_id=item[0])
        method = handle.predict if kind == "classification" else handle.generate
        res = await method.remote(item)
        if res.get("error"):
            return None, error_response(res["error"])
        return {"model": item[0], "version": version, "name": mname, **res}, None

    @api.post("/predict")
    async def predict(self, request: Request):
        res, err = await self._call(request, "classification", predict_item)
        if err is not None:
            return err
        return predict_body(res)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._openai(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._openai(request, chat=True)

    async def _openai(self, request: Request, chat: bool):
        res, err = await self._call(request, "causal_lm",
                                    functools.partial(generate_item, chat=chat))
        if err is not None:
            return err
        return completion_body(res, chat=chat)

    @api.get("/health")
    async def health(self):
        app = self.settings
        return {"status": "ok", "model": app.name, "alias": app.alias, "version": self.version,
                "task": app.task, "base_model": app.pipeline["model"],
                "base_fingerprint": app.base_fingerprint, "replicas": app.serve.replicas,
                "max_adapters": app.serve.max_adapters,
                "max_batch_size": app.serve.max_batch_size,
                "batch_wait_timeout_s": app.batch_wait_timeout_s,
                "switches": self.switches[-10:], "poll_error": self.poll_error}
