"""The HTTP API's requests and answers, without Ray: which model a request names, the item a
replica is handed for ``/predict`` and the OpenAI-style endpoints, and the bodies answered.

Bad input raises :class:`~pipelines.errors.InputError` (a ``ValueError``); the ingress
answers it as a 400 with the message.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from ..errors import InputError

HEADER = "x-peftpipe-model"

PredictItem = tuple[str, list[str]]
GenerateItem = tuple[str, Any, int, bool]


def resolve_ref(client: Any, default_name: str, ref: str) -> tuple[str, str]:
    """(name, version) for a request's model reference: ``NAME@ALIAS``, ``NAME/VERSION``,
    ``models:/...`` or a bare version of ``default_name``."""
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


def error_response(message: str) -> JSONResponse:
    """A 400 with the reason."""
    return JSONResponse({"error": message}, status_code=400)


def wrong_endpoint(task: str, kind: str) -> JSONResponse | None:
    """The 400 for a ``kind`` endpoint (``classification`` or ``causal_lm``) on a server of
    ``task``'s model, naming the endpoint to use; None when they match."""
    if (kind == "classification") != (task == "classification"):
        other = "/predict" if task == "classification" else "/v1/completions"
        return error_response(f"this server serves a {task} model; use {other}")
    return None


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object body."""
    try:
        body = await request.json()
    except Exception:
        body = None
    if not isinstance(body, dict):
        raise InputError("request body: expected a JSON object")
    return body


def predict_item(mid: str, body: dict[str, Any]) -> PredictItem:
    """What a replica's ``predict`` gets for a ``/predict`` body."""
    texts = body.get("texts", body.get("text"))
    texts = [texts] if isinstance(texts, str) else texts
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InputError("request body: expected 'text' (a string) or 'texts' "
                         "(a list of strings)")
    return (mid, texts)


def generate_item(mid: str, body: dict[str, Any], *, chat: bool) -> GenerateItem:
    """What a replica's ``generate`` gets for a ``/v1/completions`` (``chat=False``) or
    ``/v1/chat/completions`` body: (model id, prompt or messages, max_tokens, chat)."""
    if body.get("stream"):
        raise InputError("stream: streaming is not supported; send stream=false")
    n = body.get("max_tokens", 16)
    if not isinstance(n, int) or not 1 <= n <= 2048:
        raise InputError(f"max_tokens: expected an integer in 1..2048, got {n!r}")
    if chat:
        msgs = body.get("messages")
        if (not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs)):
            raise InputError("messages: expected a list of {role, content} objects")
        return (mid, [{"role": str(m.get("role", "user")), "content": m["content"]}
                      for m in msgs], n, True)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InputError("prompt: expected a string (one prompt per request)")
    return (mid, prompt, n, False)


def predict_body(res: dict[str, Any]) -> dict[str, Any]:
    """The ``/predict`` answer from a replica's result (with model, name and version)."""
    return {k: res[k] for k in ("model", "name", "version", "predictions", "predictive",
                                "batch_size", "replica")}


def completion_body(res: dict[str, Any], *, chat: bool) -> dict[str, Any]:
    """The OpenAI-style answer (``text_completion`` or ``chat.completion``) from a replica's
    result (with model and version)."""
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
