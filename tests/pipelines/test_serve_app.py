"""The Ray Serve application over HTTP on 127.0.0.1, on a real local Ray: a classifier and a
causal LM, the champion alias promoted and rolled back mid-traffic, every response checked
against the version that says it answered."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from pipelines import registry, serve, tracking
from pipelines.serve import app as serve_app
from tests.pipelines.test_serve import TEXTS, make_adapter, register, tiny_lm_folder

pytestmark = pytest.mark.timeout(420)


def call(url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json",
                                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def wait_for(pred, timeout_s: float = 120, what: str = "") -> None:
    deadline = time.time() + timeout_s
    while not pred():
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


@contextlib.contextmanager
def predict_traffic(url: str, clients: int) -> Iterator[tuple[list[dict], list]]:
    """``clients`` threads posting ``TEXTS`` to ``/predict`` until the block ends: yields
    the answers (in arrival order) and the failures (a non-200 or a dropped connection)."""
    seen: list[dict] = []
    failures: list = []
    stop = threading.Event()

    def client_loop() -> None:
        while not stop.is_set():
            try:
                status, body = call(url + "/predict", {"texts": TEXTS})
            except Exception as e:  # a dropped connection counts as a failure
                failures.append(repr(e))
                continue
            if status != 200:
                failures.append((status, body))
            else:
                seen.append(body)

    workers = [threading.Thread(target=client_loop) for _ in range(clients)]
    for w in workers:
        w.start()
    try:
        yield seen, failures
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)



def _settings(client, model: str, **kw) -> serve_app.ServeSettings:
    return serve_app.ServeSettings(model=model, tracking_uri=client.tracking_uri, replicas=1,
                                   replica_cpus=0.5, poll_s=0.3, **kw)


def two_classifiers(tmp_path, experiment: str, seed: int) -> tuple[Any, str, list, dict]:
    """A tracking client, its experiment, two MiniLM classifier adapters (seeds ``seed``,
    ``seed + 1``) and what each answers for ``TEXTS``, keyed by the version it will get."""
    cfg = tracking.TrackingConfig(experiment=experiment)
    client = tracking.client(cfg, tmp_path)
    exp = tracking.experiment_id(client, cfg, tmp_path)
    folders = [make_adapter(tmp_path / f"a{i}", "builtin:minilm", "classification",
                            seed=seed + i) for i in range(2)]
    expected = {str(i + 1): serve.predict(serve.load(str(f)), TEXTS)
                for i, f in enumerate(folders)}
    assert expected["1"] != expected["2"]
    return client, exp, folders, expected


def test_classifier_follows_the_alias_through_promotion_and_rollback(tmp_path, serve_port) -> None:
    client, exp, folders, expected = two_classifiers(tmp_path, "serve-app", seed=1)
    assert register(client, "clf", exp, folders[0], score=1.0) == "1"
    url = serve_app.start(_settings(client, "models:/clf@champion"), port=serve_port)
    try:
        status, health = call(url + "/health")
        assert status == 200 and health["version"] == "1" and health["task"] == "classification"
        assert health["base_model"] == "builtin:minilm" and len(health["base_fingerprint"]) == 16

        with predict_traffic(url, clients=4) as (seen, failures):
            wait_for(lambda: len(seen) >= 8, what="first responses")
            # Promotion mid-traffic: v2 beats v1, the alias moves, the server follows.
            assert register(client, "clf", exp, folders[1], score=0.5) == "2"
            assert registry.alias_version(client, "clf", registry.CHAMPION) == "2"
            wait_for(lambda: any(b["version"] == "2" for b in seen[-4:]), what="switch to v2")
            n = len(seen)
            wait_for(lambda: len(seen) >= n + 8, what="traffic on v2")
            registry.rollback(client, "clf")
            wait_for(lambda: seen[-1]["version"] == "1"
                     and call(url + "/health")[1]["version"] == "1", what="rollback to v1")
            n = len(seen)
            wait_for(lambda: len(seen) >= n + 8, what="traffic after the rollback")
        assert not failures, failures[:5]
        versions = [b["version"] for b in seen]
        assert "1" in versions and "2" in versions
        for body in seen:  # the version that says it answered is the one that did
            v = body["version"]
            assert body["model"] == f"clf/{v}" and body["predictive"] == "softmax"
            for got, want in zip(body["predictions"], expected[v]):
                assert got["label"] == want["label"]
                assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-4)
        assert any(b["batch_size"] > len(TEXTS) for b in seen)  # requests were batched
        assert [s["to"] for s in call(url + "/health")[1]["switches"]] == ["2", "1"]

        # Another version over the same base, by field and by header; bad input is a 400.
        status, body = call(url + "/predict", {"text": TEXTS[0], "model": "clf/2"})
        assert status == 200 and body["version"] == "2"
        assert body["predictions"][0]["probabilities"] == pytest.approx(
            expected["2"][0]["probabilities"], abs=1e-4)
        status, body = call(url + "/predict", {"text": TEXTS[0]}, {serve_app.HEADER: "2"})
        assert status == 200 and body["version"] == "2"
        status, body = call(url + "/predict", {"texts": [1, 2]})
        assert status == 400 and "texts" in body["error"]
        status, body = call(url + "/v1/completions", {"prompt": "hi"})
        assert status == 400 and "/predict" in body["error"]
        status, body = call(url + "/predict", {"text": "x", "model": "clf/9"})
        assert status == 400 and "9" in body["error"]
    finally:
        serve_app.stop()


def test_causal_lm_openai_endpoints(tmp_path, serve_port) -> None:
    cfg = tracking.TrackingConfig(experiment="serve-lm")
    client = tracking.client(cfg, tmp_path)
    exp = tracking.experiment_id(client, cfg, tmp_path)
    base = str(tiny_lm_folder(tmp_path / "tiny-llama"))
    folders = [make_adapter(tmp_path / f"lm{i}", base, "causal_lm", seed=i + 1) for i in range(2)]
    register(client, "lm", exp, folders[0], score=1.0)
    register(client, "lm", exp, folders[1], score=2.0)  # worse: stays a candidate
    prompt = "What is the capital of France?"
    want = [serve.generate_batch(serve.load(str(f)), [prompt], max_new_tokens=6, chat=False)[0]
            for f in folders]
    msgs = [{"role": "user", "content": prompt}]
    want_chat = serve.generate_batch(serve.load(str(folders[0])), [msgs], max_new_tokens=6)[0]
    url = serve_app.start(_settings(client, "models:/lm@champion"), port=serve_port)
    try:
        status, health = call(url + "/health")
        assert status == 200 and health["version"] == "1" and health["task"] == "causal_lm"
        results: list = []

        def one(i: int) -> None:  # concurrent requests: batched together
            results.append(call(url + "/v1/completions", {"prompt": prompt, "max_tokens": 6}))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(results) == 6
        for status, body in results:
            assert status == 200, body
            assert body["object"] == "text_completion" and body["version"] == "1"
            assert body["choices"][0]["text"] == want[0]["text"]
            assert body["usage"]["completion_tokens"] == want[0]["completion_tokens"]

        status, body = call(url + "/v1/completions",
                            {"prompt": prompt, "max_tokens": 6, "model": "lm@candidate"})
        assert status == 200 and body["version"] == "2"
        assert body["choices"][0]["text"] == want[1]["text"]
        status, body = call(url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 6})
        assert status == 200 and body["object"] == "chat.completion" and body["version"] == "1"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": want_chat["text"]}
        status, body = call(url + "/v1/completions", {"prompt": prompt, "stream": True})
        assert status == 400 and "stream" in body["error"]
        status, body = call(url + "/predict", {"text": "x"})
        assert status == 400 and "/v1/completions" in body["error"]
    finally:
        serve_app.stop()
