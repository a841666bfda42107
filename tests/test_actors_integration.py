"""The Ray application end to end: real Ray, real Redis, real HTTP, one shared instance.

One session fixture starts everything (local Ray, a private redis-server, the registry,
one trainer, one Serve replica on a free port); the tests then run in file order: the
drift replay first (it produces the versions the later tests look at), the fault tests
last.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_REQUESTS = 96
SWITCH_AT = 16
MAX_TOKENS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(data_dir):
    from osd.actors.cluster import launch
    from osd.actors.config import ClusterConfig

    cfg = ClusterConfig.from_dict(
        {
            "serve": {"port": free_port(), "num_cpus": 1, "body_timeout_s": 2.0},
            "buffer": {"holdout_every": 4},
            "registry": {"poll_s": 0.1, "gate_margin": 0.02},
            "trainer": {
                "distill": {
                    "lr": 1e-3,
                    "batch_records": 4,
                    "publish_every_steps": 4,
                    "publish_every_s": 10.0,
                }
            },
        }
    )
    c = launch(cfg, num_cpus=4)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def drift(cluster, data_dir):
    """The replay every test below looks at: instruct, then math."""
    from osd.actors.replay import ReplayConfig, replay

    from osd.workloads.schedule import parse_schedule

    reqs = parse_schedule(f"switch:instruct>math@{SWITCH_AT}", N_REQUESTS, seed=1).build(
        data_dir=data_dir
    )
    rcfg = ReplayConfig(url=cluster.url, max_tokens=MAX_TOKENS, concurrency=2, keep_text=True)
    return reqs, replay(reqs, rcfg)


def post(cluster, body, **kw) -> httpx.Response:
    return httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=60, **kw)


def test_every_request_answers_and_the_loop_closes(cluster, drift):
    import redis
    from osd.actors.replay import pooled_alpha

    _, records = drift
    assert [r.status for r in records] == [200] * N_REQUESTS, [r.error for r in records]
    assert all(r.completion_tokens > 0 and r.alpha is not None for r in records)
    # records reached Redis: the training stream and the gate's held-out stream
    client = redis.Redis.from_url(cluster.cfg.redis_url)
    assert client.xlen("osd:records:draft") > 0 and client.xlen("osd:records:draft.holdout") > 0
    # the trainer published ≥ 2 versions and the registry kept them
    report = cluster.report()
    published = [v for v in report["versions"] if v["version"] > 0]
    assert len(published) >= 2, report["decisions"]
    assert all(v["provenance"]["trainer"] == "osd-trainer-0" for v in published)
    # the replica's version changed under live traffic, without a failed request
    served = sorted({r.version for r in records})
    assert len(served) >= 2 and served[0] == 0, served
    assert report["adoptions"] and max(a["pause_ms"] for a in report["adoptions"]) < 250
    # α on the drifted domain rises as versions trained on it are swapped in: its first 20
    # requests (served by the base draft or versions that had seen almost no math) against
    # its last 20
    math = [r for r in records if r.domain == "math"]
    first, last = math[:20], math[-20:]
    assert max(r.version for r in first) < min(r.version for r in last)
    a0, a1 = pooled_alpha(first), pooled_alpha(last)
    assert a1 > a0 + 0.05, (a0, a1, served)


def test_greedy_outputs_equal_target_only_greedy(drift):
    import torch

    from osd.models import load_model, load_tokenizer

    reqs, records = drift
    target, tok = load_model("zoo:target", "cpu"), load_tokenizer("zoo:target")
    checked = 0
    for req, rec in list(zip(reqs, records, strict=True))[:: N_REQUESTS // 6]:
        ids = tok(req.query.prompt, add_special_tokens=False).input_ids
        with torch.inference_mode():
            out = target.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
        assert tok.decode(out[0, len(ids) :], skip_special_tokens=True) == rec.text, req.index
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"max_tokens": 4}, 400, "prompt is required"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
        ({"prompt": 17}, 400, "prompt must be"),
        ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "x", "stream": "yes"}, 400, "stream"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
        ({"prompt": "word " * 3000, "max_tokens": 4}, 400, "context"),
        ({"prompt": [10**9]}, 400, "vocabulary"),
    ],
)
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(cluster, body, status, words):
    r = post(cluster, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and words in err["message"]
    ok = post(cluster, {"prompt": "Question: 1 + 1?\nAnswer:", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def _raw(cluster, head: bytes, body: bytes = b"", timeout_s: float = 30) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a raw socket (for what httpx will not send): (status, body)."""
    from urllib.parse import urlsplit

    url = urlsplit(cluster.url)
    with socket.create_connection((url.hostname, url.port), timeout=timeout_s) as s:
        s.sendall(head + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 8:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_bad_input_through_serve_is_4xx_and_health_stays_fast(cluster):
    """Issue 13 point 1 through the real Serve proxy: surrogate, nesting, media type,
    a 10 MB body, a body shorter than its Content-Length; /health answers meanwhile."""
    import threading

    url = f"{cluster.url}/v1/completions"
    js = {"content-type": "application/json"}
    r = httpx.post(url, content=b'{"prompt": "\\ud800"}', headers=js, timeout=30)
    assert r.status_code == 400 and "Unicode" in r.json()["error"]["message"]
    r = httpx.post(url, content=b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", headers=js)
    assert r.status_code == 400 and "nests" in r.json()["error"]["message"]
    r = httpx.post(url, content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = post(cluster, {"prompt": "x", "temperature": 1e-38, "max_tokens": 2})
    assert r.status_code == 200
    slow: list[float] = []

    def probe(stop: threading.Event) -> None:
        while not stop.is_set():
            t = time.monotonic()
            assert httpx.get(f"{cluster.url}/health", timeout=10).status_code == 200
            slow.append(time.monotonic() - t)
            time.sleep(0.05)

    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(stop,))
    prober.start()
    try:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        big = 10 * 2**20
        status, _ = _raw(cluster, head + f"Content-Length: {big}\r\n".encode(), b"{")
        assert status == 413
        t = time.monotonic()
        status, data = _raw(cluster, head + b"Content-Length: 100\r\n", b'{"prompt": "x"')
        assert status == 408 and b"did not arrive" in data and time.monotonic() - t < 10
    finally:
        stop.set()
        prober.join()
    assert slow and max(slow) < 1.0, slow


def test_invalid_json_is_a_400(cluster):
    r = httpx.post(
        f"{cluster.url}/v1/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def settled_version(cluster) -> int:
    """Stop publishing and wait until the replica serves the registry's live version: with
    sampling, the same seed gives the same text only with the same draft (the draws the
    drafter consumes differ between versions; each output is distributed as the target's)."""
    import ray

    ray.get([t.set_publishing.remote(False) for t in cluster.trainers])
    deadline, stable, previous = time.monotonic() + 30, 0, None
    while stable < 3:  # unchanged for ~1.5 s: a publish that was in flight has landed
        live = ray.get(cluster.registry.live_version.remote("draft"))
        served = httpx.get(f"{cluster.url}/health", timeout=10).json()["drafter_version"]
        stable = stable + 1 if served == live == previous else 0
        previous = live
        assert time.monotonic() < deadline, (served, live)
        time.sleep(0.5)
    return live


def test_streaming_returns_the_same_text_as_non_streaming(cluster):
    import ray

    version = settled_version(cluster)
    try:
        check_streaming(cluster, version)
    finally:
        ray.get([t.set_publishing.remote(True) for t in cluster.trainers])


def check_streaming(cluster, version: int) -> None:
    body = {
        "prompt": "Instruction: name three colours\nOutput:",
        "max_tokens": 20,
        "temperature": 0.8,
        "top_p": 0.95,
        "seed": 5,
    }
    plain = post(cluster, body).json()
    chunks, done = [], False
    with httpx.stream(
        "POST", f"{cluster.url}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done = True
                break
            chunks.append(json.loads(line[6:]))
    assert done and len(chunks) >= 2
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == plain["choices"][0]["text"]
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert last["usage"] == plain["usage"] and "alpha" in last["osd"]
    assert last["osd"]["drafter_version"] == plain["osd"]["drafter_version"] == version


def test_models_health_and_metrics(cluster, drift):
    models = httpx.get(f"{cluster.url}/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == "osd" and models["data"][0]["max_model_len"] > 0
    health = httpx.get(f"{cluster.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    text = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    for name in (
        "osd:spec_decode_num_draft_tokens_total",
        "osd:spec_decode_num_accepted_tokens_total",
        "osd:spec_decode_num_accepted_tokens_per_pos_total",
        "osd:distill_records_logged_total",
        "osd:drafter_weight_version",
        "osd:drafter_swaps_total",
    ):
        assert name in text, name


def test_registry_restart_keeps_every_version_and_serving_goes_on(cluster, drift):
    import ray

    # the trainers keep publishing while this runs: pause them, so that the lists compare
    ray.get([t.set_publishing.remote(False) for t in cluster.trainers])
    try:
        before = cluster.report()
        ray.kill(cluster.registry, no_restart=False)  # Ray restarts it (max_restarts=-1)
        r = post(cluster, {"prompt": "SELECT", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200  # the replica keeps serving while the registry restarts
        deadline = time.monotonic() + 60
        while True:
            try:
                after = cluster.report()
                break
            except Exception:
                assert time.monotonic() < deadline, "registry did not come back"
                time.sleep(0.5)
    finally:
        ray.get([t.set_publishing.remote(True) for t in cluster.trainers])
    kept = [v["version"] for v in before["versions"]]
    # every version kept, in order (a publication already in flight when publishing paused
    # may add one after them), and the live version never rolled back
    assert [v["version"] for v in after["versions"]][: len(kept)] == kept
    assert after["live_version"] >= before["live_version"]
    assert after["holdout_records"] >= before["holdout_records"] > 0  # window refilled


def test_trainer_restart_resumes_from_the_live_version(cluster, drift):
    import ray

    trainer = cluster.trainers[0]
    stats = ray.get(trainer.stats.remote())
    old_pid = stats["pid"]
    # trainer.nice: spare compute by default, applied to the training threads themselves
    assert stats["nice"] == 19 and stats["thread_nice"] == [19]
    ray.get(trainer.set_nice.remote(0))  # the threads are replaced by ones at nice 0
    stats = ray.get(trainer.stats.remote())
    assert stats["nice"] == 0 and stats["thread_nice"] == [0]
    live_before = ray.get(cluster.registry.live_version.remote("draft"))
    assert live_before > 0, "the drift replay should have promoted versions by now"
    ray.kill(trainer, no_restart=False)
    deadline = time.monotonic() + 60
    while True:  # the kill is asynchronous: wait for the *restarted* actor to answer
        try:
            stats = ray.get(trainer.stats.remote(), timeout=10)
            if stats["pid"] != old_pid:
                break
        except Exception:
            pass
        assert time.monotonic() < deadline, "trainer did not come back"
        time.sleep(0.5)
    live = ray.get(cluster.registry.live_version.remote("draft"))
    # the restarted trainer starts from the live version of its restart, not from v0
    # (it may already have published a newer one)
    assert live_before <= stats["resumed_from"] <= live


def test_replica_killed_comes_back_serving_the_live_version(cluster, drift):
    """Issue 13 point 6: Serve replaces a killed replica; the new one starts from the
    zoo draft and adopts the registry's live version (it is not served v0)."""
    import ray

    live = settled_version(cluster)  # publishing paused: live stays put
    assert live > 0
    before = httpx.get(f"{cluster.url}/v1/osd/stats", timeout=10).json()
    names = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "OSDServer" in a["name"] and "Controller" not in a["name"]
    ]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            stats = httpx.get(f"{cluster.url}/v1/osd/stats", timeout=10).json()
            if stats.get("replica") != before["replica"] and stats["drafter_version"] == live:
                break
        except (httpx.HTTPError, ValueError):
            pass
        assert time.monotonic() < deadline, "no replacement replica serving the live version"
        time.sleep(1.0)
    assert stats["serving"]["version"] == live
    r = post(cluster, {"prompt": "SELECT", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["osd"]["drafter_version"] == live
    ray.get([t.set_publishing.remote(True) for t in cluster.trainers])
