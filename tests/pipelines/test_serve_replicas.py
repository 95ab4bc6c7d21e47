"""``peftpipe serve --replicas 2`` on a real local Ray: both replicas answer, and after a
promotion both answer with the new champion (each replica loads the served version itself,
since Serve routes a model id only to replicas that have it loaded)."""

from __future__ import annotations

import time

import pytest

from pipelines import registry
from pipelines.serve import app as serve_app
from tests.pipelines.test_serve import register
from tests.pipelines.test_serve_app import call, predict_traffic, two_classifiers, wait_for

pytestmark = pytest.mark.timeout(420)



def test_two_replicas_answer_and_both_follow_the_alias(tmp_path, serve_port) -> None:
    client, exp, folders, expected = two_classifiers(tmp_path, "serve-replicas", seed=5)
    assert register(client, "rep", exp, folders[0], score=1.0) == "1"
    settings = serve_app.ServeSettings(model="models:/rep@champion",
                                       tracking_uri=client.tracking_uri, replicas=2,
                                       replica_cpus=0.5, poll_s=0.3)
    url = serve_app.start(settings, port=serve_port)
    try:
        def replicas(version: str) -> set[str]:
            return {b["replica"] for b in list(seen) if b["version"] == version}

        with predict_traffic(url, clients=6) as (seen, failures):
            wait_for(lambda: len(replicas("1")) == 2, 180, "both replicas answering v1")
            assert register(client, "rep", exp, folders[1], score=0.5) == "2"
            assert registry.alias_version(client, "rep", registry.CHAMPION) == "2"
            wait_for(lambda: len(replicas("2")) == 2, 180, "both replicas answering v2")
            n = len(seen)
            wait_for(lambda: len(seen) >= n + 6, 60, "traffic on v2")
            time.sleep(0.5)
        assert not failures, failures[:5]
        # answers after the switch settled are all v2's, from both replicas
        tail = seen[-6:]
        assert {b["version"] for b in tail} == {"2"}
        for b in seen:  # every answer is the version it names
            for got, want in zip(b["predictions"], expected[b["version"]]):
                assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-4)
        status, health = call(url + "/health")
        assert status == 200 and health["replicas"] == 2 and health["version"] == "2"
    finally:
        serve_app.stop()
