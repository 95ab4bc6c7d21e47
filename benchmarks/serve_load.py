"""Load on ``peftpipe serve`` (P16), loopback only, every phase bounded in requests and time.

Champions come from small, short runs: LoRA on the real MiniLM (movie-review sentiment) and
the real SmolLM2-135M (chatterbot Q/A), a few AdamW steps each in this process, registered
through ``promote.register_model`` (an MLflow Model per version) and the registry's gate,
exactly as a search's winner is. The Ray Serve application runs on a local Ray; C client
threads send HTTP requests over 127.0.0.1 (one keep-alive connection each).

Phases (each a fresh deployment of the application):

1. classifier, batched: requests/s at C=16 (and ``GET /health`` at C=16: the HTTP path
   alone, proxy + ingress, the ceiling any model's rate is under); then C clients while the
   champion alias moves twice (two better versions promoted by the gate) and is rolled back
   once. Every answer is checked against the version it names (its probabilities must be
   that version's, computed here beforehand): failed and wrong-version requests are
   counted, and so are off-alias answers (a version that was champion neither when the
   request was sent nor when it came back, by the server's switch log).
2. classifier, unbatched (``max_batch_size=1``): requests/s at C=16; then the adapter switch:
   requests naming a version that is not in the replica's LRU (2 adapters, 3 versions
   cycled, so every one loads its adapter from the registry), latency p50/p99.
3. memory: the replica process's resident set (``VmRSS`` of the replica, read in it) after
   traffic on 1 adapter and after the same traffic on 4 adapters over its one base.
4. causal LM: ``/v1/chat/completions`` from C/2 clients while its alias moves twice and
   rolls back (each answer's text must be its version's greedy one); then requests/s at
   C=16 batched and unbatched (generation is where a replica's compute dominates), and
   batched with the classifiers' 10 ms batch wait instead of the LM default 100 ms.
5. ``--replicas 2``: both replicas answer, and both answer with the new champion after a
   promotion.

Baseline: the same classifier requests sent to ``peftpipe predict``, one process per request
(loads torch, the base and the adapter each time), a bounded number of them. And the model
alone in this process, one request at a time against 16 at a time: the most batching could
gain on this CPU before any serving overhead.

    python -m benchmarks.serve_load [--quick] [--clients 8]

Prints a table and writes ``benchmarks/results/serve_load.json`` (``--quick``:
``serve_load_quick.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._common import bench_env, table, write_json

MINILM, SMOLLM2 = "builtin:minilm", "builtin:smollm2"
LABELS = ["negative", "positive"]
TOLERANCE = 1e-4  # batched (padded) forwards differ from single ones by ~1e-6
# chat prompts tried in turn until the LM versions answer each differently
PROMPTS = ["What is the capital of France?", "What is AI?", "Tell me a joke.",
           "Who are you?", "What is your favourite book?", "Do you like music?"]
TARGETS = {"failed_or_wrong": 0, "batched_over_unbatched": 3.0, "memory_4_over_1": 1.2,
           "switch_p99_s": 1.0}


# -- adapters and registry --------------------------------------------------------------------

def _classifier_rows(n: int, seed: int) -> list[dict[str, Any]]:
    from pipelines.data.builtin import movie_review_rows

    rows = movie_review_rows()
    random.Random(seed).shuffle(rows)
    return rows[:n]


def train_classifier(out: Path, seed: int, steps: int) -> Path:
    """LoRA (rank 8) + a new head on MiniLM, ``steps`` AdamW steps of 16 reviews."""
    import torch

    import peft_core
    from pipelines import models

    torch.manual_seed(seed)
    base = models.load_model(MINILM, "classification", num_labels=2)
    tok = models.load_tokenizer(MINILM)
    pm = peft_core.apply(base, {"name": "lora", "rank": 8})
    opt = torch.optim.AdamW([p for _, p in pm.trainable_parameters()], lr=2e-3)
    rows = _classifier_rows(16 * steps, seed)
    pm.train()
    for s in range(steps):
        batch = rows[16 * s:16 * (s + 1)]
        enc = tok([r["text"] for r in batch], padding=True, truncation=True, max_length=64,
                  return_tensors="pt")
        labels = torch.tensor([LABELS.index(r["label"]) for r in batch])
        loss = pm(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    block = {"model": MINILM, "task": "classification", "tokenizer": MINILM,
             "label_names": LABELS, "max_length": 64}
    return pm.save(out, pipeline=block)


def train_lm(out: Path, seed: int, steps: int) -> Path:
    """LoRA (rank 8) on SmolLM2-135M, ``steps`` AdamW steps of 4 chat-templated Q/A pairs
    (a large rate, so versions answer differently after so few steps)."""
    import torch

    import peft_core
    from pipelines import models
    from pipelines.data.builtin import chatterbot_rows

    torch.manual_seed(seed)
    base = models.load_model(SMOLLM2, "causal_lm")
    tok = models.load_tokenizer(SMOLLM2)
    pm = peft_core.apply(base, {"name": "lora", "rank": 8})
    opt = torch.optim.AdamW([p for _, p in pm.trainable_parameters()], lr=1e-2)
    rows = chatterbot_rows()
    random.Random(seed).shuffle(rows)
    pm.train()
    for s in range(steps):
        texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                          {"role": "assistant", "content": r["response"]}],
                                         tokenize=False) for r in rows[4 * s:4 * (s + 1)]]
        enc = tok(texts, padding=True, truncation=True, max_length=96, return_tensors="pt",
                  add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = pm(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    block = {"model": SMOLLM2, "task": "causal_lm", "tokenizer": SMOLLM2, "label_names": None,
             "max_length": 96}
    return pm.save(out, pipeline=block)


class Registry:
    """An embedded MLflow store; versions are registered as a search's winner is and go
    through the gate with a given score (eval loss: lower wins)."""

    def __init__(self, root: Path):
        from pipelines import tracking

        cfg = tracking.TrackingConfig(experiment="serve-load")
        self.client = tracking.client(cfg, root)
        self.experiment = tracking.experiment_id(self.client, cfg, root)
        self.scores: dict[tuple[str, str], float] = {}

    @property
    def uri(self) -> str:
        return self.client.tracking_uri

    def register(self, name: str, adapter: Path, score: float) -> dict[str, Any]:
        from pipelines import promote, registry

        t0 = time.time()
        run = self.client.create_run(self.experiment).info.run_id
        self.client.log_artifacts(run, str(adapter), "adapter")
        self.client.set_terminated(run)
        version = promote.register_model(self.client, name, run)
        self.scores[(name, version)] = score
        cfg = registry.RegistryConfig(model_name=name, metric="eval_loss", mode="min")
        d = registry.decide(self.client, cfg, version, lambda v: self.scores[(name, v)])
        return {"version": version, "promoted": d.promoted, "moved_at": time.time(),
                "register_s": time.time() - t0}

    def rollback(self, name: str) -> dict[str, Any]:
        from pipelines import registry

        d = registry.rollback(self.client, name)
        return {"version": d.version, "rolled_back": True, "moved_at": time.time()}


def expected_predictions(folders: dict[str, Path], texts: list[str]) -> dict[str, list]:
    """Each version's class probabilities for ``texts``, one text per forward (the server
    batches them; the tolerance covers padding)."""
    from pipelines import serve
    from pipelines.serve.adapters import SharedBase

    shared = SharedBase(serve.pipeline_info(next(iter(folders.values()))))
    out = {v: [serve.predict(shared.attach(f), [t])[0]["probabilities"] for t in texts]
           for v, f in folders.items()}
    del shared
    gc.collect()
    return out


def expected_completions(folders: dict[str, Path], prompts: list[str], n: int
                         ) -> tuple[str, dict[str, str]]:
    """The first of ``prompts`` whose greedy chat answers differ between every two versions
    (else the last), and each version's answer to it: the text check can then tell the
    versions apart."""
    from pipelines import serve
    from pipelines.serve.adapters import SharedBase

    shared = SharedBase(serve.pipeline_info(next(iter(folders.values()))))
    adapters = {v: shared.attach(f) for v, f in folders.items()}
    for prompt in prompts:
        msgs = [{"role": "user", "content": prompt}]  # as /v1/chat/completions sends it
        out = {v: serve.generate_batch(a, [msgs], max_new_tokens=n)[0]["text"]
               for v, a in adapters.items()}
        if len(set(out.values())) == len(out):
            break
    del shared, adapters
    gc.collect()
    return prompt, out


def forward_cost(clf: Path, lm: Path, texts: list[str], prompt: str, n: int
                 ) -> dict[str, Any]:
    """The model alone, in this process: seconds per request answered one at a time and 16
    at a time (one review; one chat prompt with ``n`` new tokens). Their ratio bounds what
    dynamic batching can gain on this CPU before any serving overhead."""
    from pipelines import serve

    out: dict[str, Any] = {}
    a = serve.load(str(clf))
    batch = [texts[i % len(texts)] for i in range(16)]
    serve.predict(a, batch)  # warm-up
    t0 = time.perf_counter()
    for t in batch:
        serve.predict(a, [t])
    one = (time.perf_counter() - t0) / 16
    t0 = time.perf_counter()
    for _ in range(2):
        serve.predict(a, batch)
    sixteen = (time.perf_counter() - t0) / 32
    out["classifier"] = {"s_per_request_1": one, "s_per_request_16": sixteen,
                         "bound": one / sixteen}
    del a
    a = serve.load(str(lm))
    msgs = [{"role": "user", "content": prompt}]
    serve.generate_batch(a, [msgs], max_new_tokens=n)  # warm-up
    t0 = time.perf_counter()
    for _ in range(4):
        serve.generate_batch(a, [msgs], max_new_tokens=n)
    one = (time.perf_counter() - t0) / 4
    t0 = time.perf_counter()
    serve.generate_batch(a, [msgs] * 16, max_new_tokens=n)
    sixteen = (time.perf_counter() - t0) / 16
    out["lm"] = {"s_per_request_1": one, "s_per_request_16": sixteen, "bound": one / sixteen}
    del a
    gc.collect()
    return out


def separation(expected: dict[str, list]) -> float:
    """The smallest difference between two versions' answers (largest over texts and
    classes): what the wrong-version check can resolve, against TOLERANCE."""
    vs = sorted(expected)
    worst = float("inf")
    for i, a in enumerate(vs):
        for b in vs[i + 1:]:
            d = max(abs(pa[k] - pb[k]) for ta, tb in zip(expected[a], expected[b])
                    for pa, pb in [(ta, tb)] for k in pa)
            worst = min(worst, d)
    return worst


# -- HTTP load --------------------------------------------------------------------------------

class Client:
    """One keep-alive HTTP connection to the server (reconnects after an error)."""

    def __init__(self, port: int):
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def call(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            try:
                if body is None:
                    self.conn.request("GET", path)
                else:
                    self.conn.request("POST", path, json.dumps(body),
                                      {"content-type": "application/json"})
                r = self.conn.getresponse()
                data = r.read()
                return r.status, json.loads(data or b"{}")
            except (http.client.HTTPException, ConnectionError, OSError):
                self.conn.close()
                self.conn = None
                if attempt:  # a second failure is the server's, not a stale connection's
                    raise
        raise AssertionError("unreachable")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the server binds it right after)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def load(port: int, path: str, make_body, *, clients: int, max_requests: int,
         max_s: float, stop: threading.Event | None = None) -> list[dict[str, Any]]:
    """``clients`` threads send requests until ``max_requests`` were sent, ``max_s`` passed
    or ``stop`` is set. One record per request: start/end time, status, body or error."""
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    count = [0]
    deadline = time.time() + max_s
    stop = stop or threading.Event()

    def worker(i: int) -> None:
        c = Client(port)
        while not stop.is_set() and time.time() < deadline:
            with lock:
                if count[0] >= max_requests:
                    return
                n = count[0]
                count[0] += 1
            body = make_body(n)
            t0 = time.time()
            try:
                status, out = c.call(path, body)
                rec = {"n": n, "t0": t0, "t1": time.time(), "status": status, "body": out,
                       "req": body}
            except Exception as e:  # a dropped connection counts as a failed request
                rec = {"n": n, "t0": t0, "t1": time.time(), "status": None,
                       "error": f"{type(e).__name__}: {e}", "req": body}
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == 200]
    lat = [r["t1"] - r["t0"] for r in ok]
    span = (max(r["t1"] for r in records) - min(r["t0"] for r in records)) if records else 0
    return {"requests": len(records), "ok": len(ok), "failed": len(records) - len(ok),
            "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99),
            "req_per_s": len(ok) / span if span else None, "wall_s": span,
            "mean_batch": (sum(r["body"].get("batch_size", 1) for r in ok) / len(ok)
                           if ok else None)}


def wait_health(port: int, pred, timeout_s: float) -> dict:
    c = Client(port)
    deadline = time.time() + timeout_s
    while True:
        try:
            status, h = c.call("/health")
            if status == 200 and pred(h):
                return h
        except Exception:
            pass
        if time.time() > deadline:
            raise TimeoutError("the server did not reach the expected state")
        time.sleep(0.2)


# -- the server -------------------------------------------------------------------------------

def deploy(reg: Registry, model: str, port: int, **kw) -> float:
    """Deploy the application (replacing the previous one); seconds until /health answered."""
    from pipelines.serve import app as serve_app

    t0 = time.time()
    settings = serve_app.ServeSettings(model=model, tracking_uri=reg.uri, poll_s=0.3,
                                       replica_cpus=1.0, **kw)
    serve_app.start(settings, port=port)
    wait_health(port, lambda h: h.get("version") is not None, 300)
    return time.time() - t0


def replica_stats(n: int = 1, timeout_s: float = 60) -> list[dict[str, Any]]:
    """``stats()`` of the replicas (asked until ``n`` distinct replicas answered)."""
    from ray import serve

    from pipelines.serve.app import APP_NAME

    h = serve.get_deployment_handle("AdapterReplica", app_name=APP_NAME)
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.time() + timeout_s
    while len(seen) < n and time.time() < deadline:
        s = h.stats.remote().result(timeout_s=60)
        seen[s["replica"]] = s
    return list(seen.values())


def check_classifier(records: list[dict[str, Any]], expected: dict[str, list],
                     texts: list[str], name: str) -> dict[str, int]:
    """Wrong-version answers: probabilities that are not those of the version named."""
    wrong = unknown = 0
    for r in records:
        if r["status"] != 200:
            continue
        b = r["body"]
        v = b["version"]
        if v not in expected or b["model"] != f"{name}/{v}":
            unknown += 1
            continue
        want = expected[v][texts.index(r["req"]["text"])]
        got = b["predictions"][0]["probabilities"]
        if any(abs(got[k] - want[k]) > TOLERANCE for k in want):
            wrong += 1
    return {"wrong_version": wrong, "unknown_version": unknown}


def off_alias(records: list[dict[str, Any]], initial: str, switches: list[dict]) -> int:
    """Answers from a version that was being served neither when the request was sent nor
    when its answer came back (the server's own switch log gives the times)."""

    def at(t: float) -> str:
        v = initial
        for s in switches:
            if s["at"] <= t:
                v = s["to"]
        return v

    return sum(1 for r in records if r["status"] == 200
               and r["body"]["version"] not in (at(r["t0"]), at(r["t1"])))


def moves_phase(reg: Registry, name: str, port: int, adapters: list[Path], path: str,
                make_body, *, clients: int, max_requests: int, max_s: float,
                settle_s: float) -> dict[str, Any]:
    """Load while ``adapters[0]`` and then ``adapters[1]`` are promoted (each scored better
    than the champion) and the alias is rolled back once."""
    stop = threading.Event()
    moves: list[dict[str, Any]] = []
    errors: list[str] = []
    initial = wait_health(port, lambda h: True, 30)["version"]

    def mover() -> None:
        try:
            for i, folder in enumerate(adapters):
                time.sleep(settle_s)
                m = reg.register(name, folder, score=-1.0 - i)
                moves.append({"kind": "promote", **m})
                h = wait_health(port, lambda h, v=m["version"]: h["version"] == v, 120)
                moves[-1]["followed_s"] = h["switches"][-1]["at"] - m["moved_at"]
            time.sleep(settle_s)
            m = reg.rollback(name)
            moves.append({"kind": "rollback", **m})
            h = wait_health(port, lambda h: h["version"] == m["version"], 120)
            moves[-1]["followed_s"] = h["switches"][-1]["at"] - m["moved_at"]
            time.sleep(settle_s)
        except Exception as e:  # recorded: the phase's result says the moves did not finish
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            stop.set()

    t = threading.Thread(target=mover)
    t.start()
    records = load(port, path, make_body, clients=clients, max_requests=max_requests,
                   max_s=max_s, stop=stop)
    stop.set()
    t.join()
    switches = wait_health(port, lambda h: True, 30)["switches"]
    by_version: dict[str, int] = {}
    for r in records:
        if r["status"] == 200:
            by_version[r["body"]["version"]] = by_version.get(r["body"]["version"], 0) + 1
    return {"records": records, "moves": moves, "mover_errors": errors,
            "switches": switches, "initial": initial, "by_version": by_version,
            "off_alias": off_alias(records, initial, switches)}


# -- the baseline -----------------------------------------------------------------------------

def baseline(reg: Registry, name: str, texts: list[str], n: int, clients: int
             ) -> dict[str, Any]:
    """``peftpipe predict`` as one process per request, ``clients`` at a time."""
    exe = str(Path(sys.executable).with_name("peftpipe"))
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    queue = list(range(n))

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop(0)
            t0 = time.time()
            p = subprocess.run([exe, "predict", "--model", f"models:/{name}@champion",
                                "--text", texts[i % len(texts)], "--tracking-uri", reg.uri],
                               capture_output=True, text=True, timeout=300)
            rec = {"n": i, "t0": t0, "t1": time.time(), "status": 200 if p.returncode == 0
                   else None, "body": {}}
            if p.returncode:
                rec["error"] = (p.stderr or p.stdout).strip().splitlines()[-1:]
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {**summary(records), "clients": clients,
            "errors": [r["error"] for r in records if "error" in r][:3]}


# -- main -------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer requests and shorter phases")
    p.add_argument("--clients", type=int, default=8, help="C: concurrent clients (moves)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    bench_env()
    q = args.quick
    budget = {"steps": 2 if q else 4, "throughput_requests": 160 if q else 480,
              "throughput_s": 15 if q else 30, "moves_requests": 1500 if q else 4000,
              "settle_s": 3 if q else 6, "switches": 8 if q else 24,
              "memory_requests": 8 if q else 24, "baseline_requests": 4 if q else 8,
              "lm_tokens": 8, "lm_requests": 32 if q else 64}
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="peftpipe-serve-load-"))
    log = lambda msg: print(f"[{time.time() - started:6.1f}s] {msg}", flush=True)  # noqa: E731

    # Adapters from short runs; one text per classifier request, from the reviews.
    clf = [train_classifier(work / f"clf{i}", seed=i + 1, steps=budget["steps"])
           for i in range(5)]
    lm = [train_lm(work / f"lm{i}", seed=i + 1, steps=budget["steps"]) for i in range(3)]
    gc.collect()
    log("trained 5 MiniLM and 3 SmolLM2 LoRA adapters")
    texts = [r["text"] for r in _classifier_rows(200, seed=99)[-8:]]
    expected = expected_predictions({str(i + 1): f for i, f in enumerate(clf)}, texts)
    prompt, want_lm = expected_completions({str(i + 1): f for i, f in enumerate(lm)},
                                           PROMPTS, budget["lm_tokens"])
    log(f"expected answers computed; classifier versions differ by >= {separation(expected):.3g}"
        f"; LM prompt {prompt!r}: {want_lm}")
    cost = forward_cost(clf[0], lm[0], texts, prompt, budget["lm_tokens"])
    log(f"model alone, per request at batch 1 / 16: {cost}")

    reg = Registry(work / "registry")
    first_clf = reg.register("clf", clf[0], score=0.0)
    first_lm = reg.register("lm", lm[0], score=0.0)
    log(f"registered clf v{first_clf['version']}, lm v{first_lm['version']} "
        f"({first_clf['register_s']:.1f} s per version)")

    result: dict[str, Any] = {"settings": {"clients": args.clients, "quick": q, **budget,
                                           "tolerance": TOLERANCE, "prompt": prompt,
                                           "texts": texts},
                              "commands": [f"python -m benchmarks.serve_load"
                                           f"{' --quick' if q else ''}"
                                           f" --clients {args.clients}"]}

    # The baseline first, while nothing else runs: one peftpipe predict process per request.
    result["baseline"] = baseline(reg, "clf", texts, budget["baseline_requests"], clients=2)
    log(f"baseline: {result['baseline']}")

    import ray
    from ray import serve

    from pipelines.serve import app as serve_app

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    clf_body = lambda n: {"text": texts[n % len(texts)]}  # noqa: E731
    try:
        # 1. classifier, batched: throughput at C=16, then the alias moves.
        up = deploy(reg, "models:/clf@champion", port, max_batch_size=16, max_adapters=4)
        load(port, "/predict", clf_body, clients=4, max_requests=16, max_s=30)  # warm-up
        recs = load(port, "/predict", clf_body, clients=16,
                    max_requests=budget["throughput_requests"], max_s=budget["throughput_s"])
        batched = {**summary(recs), **check_classifier(recs, expected, texts, "clf"),
                   "deploy_s": up}
        log(f"batched C=16: {batched}")
        # the HTTP path alone (proxy + ingress, no replica call): the ceiling for any model
        ingress = summary(load(port, "/health", lambda n: None, clients=16,
                               max_requests=budget["throughput_requests"],
                               max_s=budget["throughput_s"]))
        log(f"/health C=16: {ingress}")
        moves = moves_phase(reg, "clf", port, clf[1:3], "/predict", clf_body,
                            clients=args.clients, max_requests=budget["moves_requests"],
                            max_s=240, settle_s=budget["settle_s"])
        recs = moves.pop("records")
        clf_moves = {**summary(recs), **check_classifier(recs, expected, texts, "clf"),
                     **moves, "clients": args.clients}
        log(f"classifier under alias moves: {clf_moves}")
        reg.register("clf", clf[3], score=5.0)  # v4: registered, worse than the champion

        # 2. classifier, unbatched: throughput at C=16, then adapter switches (LRU of 2).
        up = deploy(reg, "models:/clf@champion", port, max_batch_size=1, max_adapters=2)
        load(port, "/predict", clf_body, clients=4, max_requests=16, max_s=30)
        recs = load(port, "/predict", clf_body, clients=16,
                    max_requests=budget["throughput_requests"], max_s=budget["throughput_s"])
        unbatched = {**summary(recs), **check_classifier(recs, expected, texts, "clf"),
                     "deploy_s": up}
        log(f"unbatched C=16: {unbatched}")
        c = Client(port)
        # three versions cycled through an LRU of two: every request loads its adapter (the
        # champion, v2, is not among them)
        cycle = ["1", "3", "4"]
        switch, warm = [], []
        for i in range(budget["switches"]):
            v = cycle[i % len(cycle)]
            t0 = time.time()
            status, b = c.call("/predict", {"text": texts[0], "model": f"clf/{v}"})
            switch.append({"s": time.time() - t0, "ok": status == 200 and b["version"] == v})
        for i in range(budget["switches"]):
            v = cycle[i % 2]  # two versions alternating: both stay in the LRU
            if i < 2:
                c.call("/predict", {"text": texts[0], "model": f"clf/{v}"})
            t0 = time.time()
            status, b = c.call("/predict", {"text": texts[0], "model": f"clf/{v}"})
            warm.append({"s": time.time() - t0, "ok": status == 200 and b["version"] == v})
        lat = [s["s"] for s in switch]
        adapter_switch = {"requests": len(switch), "failed": sum(not s["ok"] for s in switch),
                          "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99),
                          "max_s": max(lat), "lru": 2, "cycle": cycle,
                          "warm_p50_s": percentile([w["s"] for w in warm], 50),
                          "warm_p99_s": percentile([w["s"] for w in warm], 99)}
        log(f"adapter switch: {adapter_switch}")

        # 3. replica memory: 1 adapter, then 4 over the same base, the same traffic on each.
        up = deploy(reg, "models:/clf@champion", port, max_batch_size=16, max_adapters=4)
        served = ["2", "1", "3", "4"]
        memory: dict[str, Any] = {"deploy_s": up, "adapters": served}

        def traffic(v: str) -> None:
            load(port, "/predict", lambda n: {"text": texts[n % len(texts)],
                                              "model": f"clf/{v}"},
                 clients=4, max_requests=budget["memory_requests"], max_s=60)

        traffic(served[0])
        time.sleep(1)
        memory["one"] = replica_stats()[0]
        for v in served[1:]:
            traffic(v)
        traffic(served[0])
        time.sleep(1)
        memory["four"] = replica_stats()[0]
        memory["ratio"] = memory["four"]["rss_mb"] / memory["one"]["rss_mb"]
        log(f"replica memory: {memory}")

        # 4. causal LM: chat completions under alias moves, then batched vs unbatched.
        up = deploy(reg, "models:/lm@champion", port, max_batch_size=16, max_adapters=4)
        chat = "/v1/chat/completions"
        lm_body = lambda n: {"messages": [{"role": "user", "content": prompt}],  # noqa: E731
                             "max_tokens": budget["lm_tokens"]}

        def lm_wrong(recs: list[dict[str, Any]]) -> int:
            return sum(1 for r in recs if r["status"] == 200
                       and r["body"]["choices"][0]["message"]["content"]
                       != want_lm.get(r["body"]["version"]))

        load(port, chat, lm_body, clients=2, max_requests=4, max_s=60)
        moves = moves_phase(reg, "lm", port, lm[1:3], chat, lm_body,
                            clients=max(2, args.clients // 2),
                            max_requests=budget["moves_requests"], max_s=300,
                            settle_s=budget["settle_s"])
        recs = moves.pop("records")
        lm_moves = {**summary(recs), **moves, "wrong_version": lm_wrong(recs),
                    "clients": max(2, args.clients // 2), "deploy_s": up,
                    "versions_distinguishable": len(set(want_lm.values())) == len(want_lm),
                    "expected_texts": want_lm}
        log(f"causal LM under alias moves: {lm_moves}")
        recs = load(port, chat, lm_body, clients=16, max_requests=budget["lm_requests"],
                    max_s=90)
        lm_batched = {**summary(recs), "wrong_version": lm_wrong(recs)}
        log(f"causal LM batched C=16: {lm_batched}")
        up = deploy(reg, "models:/lm@champion", port, max_batch_size=1, max_adapters=4)
        load(port, chat, lm_body, clients=2, max_requests=4, max_s=60)
        recs = load(port, chat, lm_body, clients=16, max_requests=budget["lm_requests"],
                    max_s=120)
        lm_unbatched = {**summary(recs), "wrong_version": lm_wrong(recs), "deploy_s": up}
        log(f"causal LM unbatched C=16: {lm_unbatched}")
        # batched with the classifiers' 10 ms batch wait instead of the LM default 100 ms:
        # generation holds the GIL, requests reach the queue late and batches stay small
        up = deploy(reg, "models:/lm@champion", port, max_batch_size=16, max_adapters=4,
                    batch_wait_timeout_s=0.01)
        load(port, chat, lm_body, clients=2, max_requests=4, max_s=60)
        recs = load(port, chat, lm_body, clients=16, max_requests=budget["lm_requests"],
                    max_s=90)
        lm_batched_wait = {**summary(recs), "wrong_version": lm_wrong(recs), "deploy_s": up,
                           "batch_wait_timeout_s": 0.01}
        log(f"causal LM batched C=16, 10 ms wait: {lm_batched_wait}")

        # 5. two replicas: both answer, both follow the alias.
        up = deploy(reg, "models:/clf@champion", port, max_batch_size=16, max_adapters=4,
                    replicas=2)
        before = load(port, "/predict", clf_body, clients=args.clients,
                      max_requests=budget["throughput_requests"], max_s=20)
        m = reg.register("clf", clf[4], score=-10.0)  # v5 beats the champion
        wait_health(port, lambda h: h["version"] == m["version"], 120)
        time.sleep(2)  # both replicas' own alias polls
        after = load(port, "/predict", clf_body, clients=args.clients,
                     max_requests=budget["throughput_requests"], max_s=20)
        stats = replica_stats(2)
        answered = lambda rs, v=None: sorted({r["body"]["replica"] for r in rs  # noqa: E731
                                              if r["status"] == 200
                                              and (v is None or r["body"]["version"] == v)})
        replicas = {"deploy_s": up, "before": summary(before), "after": summary(after),
                    "replicas_before": answered(before),
                    "replicas_after_on_new_version": answered(after, m["version"]),
                    "new_version": m["version"],
                    "following": {s["replica"]: s["following"] for s in stats},
                    **{f"wrong_{k}": v for k, v in check_classifier(
                        before + after, expected, texts, "clf").items()}}
        replicas["ok"] = (len(replicas["replicas_before"]) == 2
                          and len(replicas["replicas_after_on_new_version"]) == 2
                          and set(replicas["following"].values()) == {m["version"]}
                          and replicas["after"]["failed"] == 0)
        log(f"two replicas: {replicas}")
    finally:
        with contextlib.suppress(Exception):  # the app may not have been deployed
            serve_app.stop()
        serve.shutdown()
        ray.shutdown()

    result.update({"classifier_batched": batched, "classifier_unbatched": unbatched,
                   "ingress_health": ingress, "lm_batched": lm_batched,
                   "lm_unbatched": lm_unbatched, "lm_batched_wait": lm_batched_wait,
                   "forward_cost": cost,
                   "classifier_moves": clf_moves, "adapter_switch": adapter_switch,
                   "memory": memory, "lm_moves": lm_moves, "replicas": replicas})
    result["targets"] = judge(result)
    result["total_s"] = time.time() - started
    rows = [
        {"phase": "classifier, alias moves", "C": args.clients, **_row(clf_moves)},
        {"phase": "classifier batched", "C": 16, **_row(batched)},
        {"phase": "classifier unbatched", "C": 16, **_row(unbatched)},
        {"phase": "GET /health (HTTP path alone)", "C": 16, **_row(ingress)},
        {"phase": "peftpipe predict per request", "C": 2, **_row(result["baseline"])},
        {"phase": "causal LM, alias moves", "C": lm_moves["clients"], **_row(lm_moves)},
        {"phase": "causal LM batched", "C": 16, **_row(lm_batched)},
        {"phase": "causal LM unbatched", "C": 16, **_row(lm_unbatched)},
        {"phase": "causal LM batched, 10 ms wait", "C": 16, **_row(lm_batched_wait)},
        {"phase": "2 replicas, after a promotion", "C": args.clients,
         **_row(replicas["after"])},
    ]
    print(table(rows, ["phase", "C", "requests", "failed", "wrong", "p50_s", "p99_s",
                       "req_per_s", "mean_batch"]))
    print(table(result["targets"], ["target", "limit", "measured", "status"]))
    path = write_json("serve_load_quick" if q else "serve_load", result, args.out)
    print(f"wrote {path} ({result['total_s']:.0f} s)")


def _row(s: dict[str, Any]) -> dict[str, Any]:
    return {"requests": s["requests"], "failed": s["failed"],
            "wrong": s.get("wrong_version", "–"), "p50_s": s["p50_s"], "p99_s": s["p99_s"],
            "req_per_s": s["req_per_s"], "mean_batch": s.get("mean_batch")}


def judge(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's four targets, each met or missed with the measured value."""
    m, lmm = r["classifier_moves"], r["lm_moves"]
    bad = (m["failed"] + m["wrong_version"] + m["unknown_version"] + m["off_alias"]
           + lmm["failed"] + lmm["wrong_version"] + lmm["off_alias"])
    moved = (len(m["moves"]) == 3 and len(lmm["moves"]) == 3
             and not m["mover_errors"] and not lmm["mover_errors"])
    def speedup(kind: str) -> float:
        return (r[f"{kind}_batched"]["req_per_s"] or 0) / (
            r[f"{kind}_unbatched"]["req_per_s"] or float("inf"))

    speed, lm_speed = speedup("classifier"), speedup("lm")
    out = [
        {"target": "failed or wrong-version requests through 2 moves + 1 rollback",
         "limit": "0", "measured": f"{bad} (moves done: {moved})",
         "status": "met" if bad == 0 and moved else "missed"},
        {"target": "batched / unbatched requests/s at C=16, MiniLM classifier",
         "limit": ">= 3", "measured": f"{speed:.2f}",
         "status": "met" if speed >= 3 else "missed"},
        {"target": "batched / unbatched requests/s at C=16, SmolLM2 chat completions",
         "limit": ">= 3", "measured": f"{lm_speed:.2f}",
         "status": "met" if lm_speed >= 3 else "missed"},
        {"target": "replica RSS, 4 adapters / 1 adapter", "limit": "<= 1.2",
         "measured": f"{r['memory']['ratio']:.3f}",
         "status": "met" if r["memory"]["ratio"] <= 1.2 else "missed"},
        {"target": "MiniLM adapter switch p99 (s)", "limit": "< 1",
         "measured": f"{r['adapter_switch']['p99_s']:.3f}",
         "status": "met" if r["adapter_switch"]["p99_s"] < 1
         and not r["adapter_switch"]["failed"] else "missed"},
    ]
    return out


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
