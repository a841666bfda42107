"""Bad input never gets a 500 (issue 13 points 1 and 5): the replica's real FastAPI app, on a
real serving loop with the zoo models, driven by Starlette's TestClient — no Ray, no Redis
(the sink writes to the in-memory buffer)."""

import asyncio
import inspect
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from osd.actors.config import ClusterConfig
from osd.actors.http_guard import HttpGuard, check_json
from osd.actors.openai_api import ApiError

from osd.buffer.memory import MemoryBuffer

KEYS = ["sk-one", "sk-two"]


def _servable_dependency(api):
    """The dependency Ray Serve injects ``self`` with (the replica instance)."""
    stack = list(api.router.routes)
    while stack:
        route = stack.pop()
        if hasattr(route, "original_router"):
            stack.extend(route.original_router.routes)
            continue
        params = inspect.signature(getattr(route, "endpoint", lambda: None)).parameters
        if "self" in params:
            return params["self"].default.dependency
    raise AssertionError("no class-based route found")


@pytest.fixture(scope="module")
def replica():
    from osd.actors import server

    cfg = ClusterConfig.from_dict(
        {
            "serve": {"api_keys": KEYS, "max_body_bytes": 16384, "max_prompt_chars": 2000},
            "buffer": {"key_max_share": 0.5, "key_window": 16},
            "trainer": {"count": 0},
        }
    )
    cls = server.OSDServer.func_or_class
    inst = cls.__new__(cls)
    inst.replica = "test"
    inst._start(cfg, MemoryBuffer(consumer="test"))
    dep = _servable_dependency(server.api)
    server.api.dependency_overrides[dep] = lambda: inst
    yield inst
    server.api.dependency_overrides.pop(dep, None)
    inst.loop.stop(timeout_s=5)
    inst.sink.close(timeout_s=5)


@pytest.fixture(scope="module")
def client(replica):
    from osd.actors.server import api

    with TestClient(api, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {KEYS[0]}"
        yield c


def post(client, body, path="/v1/completions", **kw):
    return client.post(
        path,
        content=body if isinstance(body, bytes | str) else json.dumps(body),
        headers={"Content-Type": "application/json", **kw.pop("headers", {})},
        **kw,
    )


OK = {"prompt": "2 + 2 =", "max_tokens": 4, "temperature": 0}
MSG = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
DEEP = "[" * 3000 + "]" * 3000


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b'{"prompt": "\\ud800 lone surrogate"}', 400, "not valid Unicode"),
        (b'{"prompt": "x", "stop": ["\\udfff"]}', 400, "not valid Unicode"),
        (b'{"\\ud800": 1}', 400, "not valid Unicode"),
        ('{"prompt": ' + DEEP + "}", 400, "nests deeper"),
        ('{"prompt": "x", "user": ' + "[" * 40 + "]" * 40 + "}", 400, "nests deeper"),
        (b'{"prompt": "x", "temperature": NaN}', 400, "not JSON"),
        (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
        (b'{"prompt": "x"', 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not UTF-8"),
        (b"[1, 2]", 400, "JSON object"),
        ({"prompt": "x", "logit_bias": {"50": 5}}, 400, "logit_bias"),
        ({"prompt": "x", "frobnicate": 1}, 400, "unknown fields"),
        ({"prompt": "x", "seed": 2**64}, 400, "seed"),
        ({"prompt": "x", "max_tokens": 10**9}, 400, "context"),
        ({"prompt": [10**12]}, 400, "vocabulary"),
        ({"prompt": "x" * 3000}, 400, "characters"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
        (b"x" * 20000, 413, "too large"),
    ],
)
def test_bad_input_is_4xx_with_a_message(client, body, status, words):
    r = post(client, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and (words is None or words in err["message"]), err


@pytest.mark.parametrize(
    "body, words",
    [
        ({**MSG, "messages": [{"role": "user", "content": "\ud800"}]}, "not valid Unicode"),
        ({**MSG, "logit_bias": {"1": 1}}, "logit_bias"),
        ({**MSG, "tools": [{"type": "function"}]}, "tools"),
        ({**MSG, "messages": [{"role": "user", "content": "x" * 3000}]}, "characters"),
    ],
)
def test_bad_chat_input_is_4xx(client, body, words):
    raw = json.dumps(body).encode()  # json escapes the surrogate: \ud800 on the wire
    r = post(client, raw, path="/v1/chat/completions")
    assert 400 <= r.status_code < 500 and words in r.json()["error"]["message"], r.text


def test_tiny_temperature_is_greedy_not_nan(client):
    greedy = post(client, OK).json()["choices"][0]["text"]
    for t in (1e-38, 5e-324, 1e-6):
        r = post(client, {**OK, "temperature": t})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy
    r = post(client, {**OK, "temperature": 1e-38, "stream": True})
    assert r.status_code == 200 and "error" not in r.text and r.text.endswith("data: [DONE]\n\n")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    "auth", [None, "Bearer wrong", "Basic c2stb25l", "Bearer", f"bearer {KEYS[1]}x"]
)
def test_api_key_required_on_v1(client, path, auth):
    headers = {"Authorization": auth} if auth else {}
    c = TestClient(client.app, raise_server_exceptions=False)
    r = post(c, OK, path=path, headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "API key" in r.json()["error"]["message"]
    assert c.get("/v1/models", headers=headers).status_code == 401
    assert c.get("/v1/osd/stats", headers=headers).status_code == 401
    assert c.get("/health").status_code == 200  # probes need no key
    assert c.get("/metrics").status_code == 200  # unless serve.metrics_auth


def test_every_configured_key_works(client):
    for key in KEYS:
        r = post(client, OK, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"]


@pytest.mark.parametrize(
    "ctype", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_only_json_bodies(client, ctype):
    headers = {"Content-Type": ctype} if ctype else {}
    r = client.post("/v1/completions", content=json.dumps(OK), headers=headers)
    if ctype is None:  # httpx sends no Content-Type for raw content
        r = client.post("/v1/completions", content=json.dumps(OK).encode())
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    ok = post(client, OK, headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_body_size_limit_before_reading(client):
    r = post(client, b"{}", headers={"Content-Length": str(10 * 2**20)})
    assert r.status_code == 413 and "10,485,760" in r.json()["error"]["message"]
    r = post(client, b"{}", headers={"Content-Length": "ten"})
    assert r.status_code == 400


def test_a_body_shorter_than_its_length_times_out():
    """An ASGI receive that never completes the body: 408 after body_timeout_s."""
    guard = HttpGuard(max_body_bytes=1000, body_timeout_s=0.3)
    from starlette.requests import Request

    async def receive():
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": b'{"pro', "more_body": True}
        await asyncio.sleep(3600)  # the rest never comes

    sent: list = []
    headers = [(b"content-type", b"application/json"), (b"content-length", b"100")]
    req = Request({"type": "http", "method": "POST", "headers": headers}, receive)
    t = time.monotonic()
    with pytest.raises(ApiError) as info:
        asyncio.run(guard.read_json(req))
    assert info.value.status == 408 and time.monotonic() - t < 2


def test_chunked_body_is_capped_while_read():
    from starlette.requests import Request

    chunks = [b"[" + b"1," * 400] * 10

    async def receive():
        return {"type": "http.request", "body": chunks.pop(), "more_body": bool(chunks)}

    headers = [(b"content-type", b"application/json")]
    req = Request({"type": "http", "method": "POST", "headers": headers}, receive)
    with pytest.raises(ApiError) as info:
        asyncio.run(HttpGuard(max_body_bytes=2000).read_json(req))
    assert info.value.status == 413 and len(chunks) >= 7  # stopped early


def test_health_answers_while_a_large_prompt_is_tokenised(client, replica):
    """Tokenising runs on a worker thread: /health is not queued behind it."""
    big = "word " * 300
    gate, release = threading.Event(), threading.Event()
    tok = replica.tokenizer

    class Slow:
        def __call__(self, *a, **kw):
            gate.set()
            release.wait(5)
            return tok(*a, **kw)

        def __getattr__(self, name):
            return getattr(tok, name)

    replica.tokenizer = Slow()
    try:
        t = threading.Thread(target=post, args=(client, {**OK, "prompt": big}))
        t.start()
        assert gate.wait(5)
        start = time.monotonic()
        assert client.get("/health").status_code == 200
        assert time.monotonic() - start < 1.0
        release.set()
        t.join(10)
    finally:
        release.set()
        replica.tokenizer = tok


def test_check_json_walks_without_recursion():
    check_json([[[["ok"]]]], max_depth=4)
    with pytest.raises(ApiError):
        check_json([[[[["deep"]]]]], max_depth=4)


def test_quota_drops_are_counted_in_metrics(client, replica):
    before = replica.sink.written
    for i in range(12):  # key0 floods, key1 sends one in four
        key = KEYS[1] if i % 4 == 0 else KEYS[0]
        assert post(client, OK, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    deadline = time.monotonic() + 5
    while replica.sink.written + sum(replica.quota.dropped.values()) < before + 12:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert replica.quota.dropped["key0"] > 0 and replica.quota.dropped["key1"] == 0
    text = client.get("/metrics").text
    assert "osd:distill_records_quota_dropped_total{" in text and 'key="key0"' in text
    assert "osd:http_rejected_total{" in text
