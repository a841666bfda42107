"""Fuzz a real ``osd serve`` over HTTP (issue 13, goal: 0 × 5xx over ≥ 500 requests).

    python experiments/fuzz.py --json fuzz.json --plot fuzz.png [--requests 600] [--seed 0]

Starts ``osd serve`` (zoo target, embedded Redis, one replica, one trainer: the defaults)
with ``--api-key``, then sends ``--requests`` seeded random requests on raw sockets (so
that headers and framing can be wrong too), four at a time: random bytes, truncated and
malformed JSON, wrong types and extreme numbers in every field, unknown fields, huge
prompts, deep nesting, lone UTF-16 surrogates, bad or missing keys and media types,
bad ``Content-Length`` values, bodies shorter than their ``Content-Length``, wrong methods
and paths — and valid requests (streaming or not) among them. Counted: statuses by case,
5xx (the goal is 0) and connections closed without an answer.

Then the probes (``--probes`` of each kind): a 10 MB body, with its ``Content-Length`` or
chunked without one, is sent while ``/health`` is polled every 50 ms; reported: the large request's status and
time, and the slowest ``/health`` answer meanwhile (goal: < 1 s). The JSON holds every
request's case, status and time; the PNG the statuses by case and the probe's timeline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

KEY = "fuzz-key"
PROMPTS = ["2 + 2 =", "SELECT name FROM", "def add(a, b):", "Once upon a time", "Q: why?\nA:"]
ODD = [
    None, True, False, 0, -1, 1, 2**31, 2**64, -(2**63), 10**30, 1e308, -1e308, 1e-320,
    5e-324, 0.5, -0.0, "", "x", "\u0000", "\ud800", "é" * 3, [], [1], [[]], {}, {"a": 1},
    [None], ["a", 2], "1e400", "NaN",
]  # fmt: skip
FIELDS = [
    "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "n",
    "model", "domain", "user", "logit_bias", "logprobs", "echo", "best_of", "suffix",
    "presence_penalty", "frequency_penalty", "stream_options", "messages",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    length: str | None = "auto",
    timeout_s: float = 60.0,
    chunk_size: int = 0,
) -> tuple[int | None, float, str]:
    """One request on a raw socket: (status or None, seconds, the answer as text)."""
    hdr = {"Host": "127.0.0.1", "Connection": "close", **(headers or {})}
    if length == "auto":
        hdr["Content-Length"] = str(len(body))
    elif length is not None:
        hdr["Content-Length"] = length
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdr.items())
    t0 = time.monotonic()
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(head.encode("latin-1") + b"\r\n")
            try:
                if chunk_size:
                    for i in range(0, len(body), chunk_size):
                        s.sendall(body[i : i + chunk_size])
                else:
                    s.sendall(body)
            except OSError:  # the server answered and closed while we were still sending
                pass
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data += chunk
    except (TimeoutError, OSError) as err:
        return None, time.monotonic() - t0, f"{type(err).__name__}: {err}"
    dt = time.monotonic() - t0
    try:
        return int(data.split(b" ", 2)[1]), dt, data.decode("latin-1")
    except (IndexError, ValueError):
        return None, dt, data.decode("latin-1")


def _valid(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, 6)}
    if rng.random() < 0.5:
        body["temperature"] = rng.choice([0, 0.7, 1.0, 1e-38, 1e-6])
    if rng.random() < 0.3:
        body["stream"] = True
    if rng.random() < 0.2:
        body["stop"] = ["\n"]
    return body


def _deep(rng: random.Random) -> str:
    d = rng.choice([33, 200, 1000, 5000, 50_000])
    return "[" * d + "]" * d if rng.random() < 0.5 else '{"a":' * d + "1" + "}" * d


def make_case(rng: random.Random) -> dict[str, Any]:
    """One fuzzed request: its case name, method, path, body, headers, length."""
    auth = {"Authorization": f"Bearer {KEY}"}
    js = {"Content-Type": "application/json", **auth}
    path = "/v1/completions" if rng.random() < 0.8 else "/v1/chat/completions"
    case = rng.choice(
        [
            "valid", "valid", "random_bytes", "truncated_json", "wrong_type", "wrong_type",
            "unknown_field", "huge_prompt", "deep_nesting", "surrogate", "bad_auth",
            "media_type", "bad_length", "short_body", "method_path", "token_ids", "chat",
        ]
    )  # fmt: skip
    c: dict[str, Any] = {"case": case, "method": "POST", "path": path, "headers": js}
    if case == "valid":
        c["path"], c["body"] = "/v1/completions", json.dumps(_valid(rng))
    elif case == "random_bytes":
        c["body"] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 2000)))
    elif case == "truncated_json":
        s = json.dumps(_valid(rng))
        c["body"] = s[: rng.randint(0, len(s) - 1)]
    elif case == "wrong_type":
        body = _valid(rng)
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(FIELDS)] = rng.choice(ODD)
        c["body"] = json.dumps(body)
    elif case == "unknown_field":
        body = _valid(rng)
        body[rng.choice(["foo", "logit_bias", "tools", "__proto__", "\ud800", "x" * 300])] = 1
        c["body"] = json.dumps(body)
    elif case == "huge_prompt":
        n = rng.choice([10_000, 100_000, 900_000, 2_000_000])
        c["path"], c["body"] = "/v1/completions", json.dumps({"prompt": "ab " * (n // 3)})
    elif case == "deep_nesting":
        field = rng.choice(["prompt", "stop", "user", "messages"])
        c["body"] = f'{{"{field}": {_deep(rng)}}}'
    elif case == "surrogate":
        body = _valid(rng) if path == "/v1/completions" else {"messages": [{"role": "user"}]}
        lone = rng.choice(["\\ud800", "\\udfff", "\\ud83d", "x\\udc00y"])
        field = rng.choice(["prompt", "stop", "domain", "model", "user"])
        raw = json.dumps({k: v for k, v in body.items() if k != field})
        c["body"] = raw[:-1] + f', "{field}": "{lone}"}}'
        if path != "/v1/completions":
            c["body"] = f'{{"messages": [{{"role": "user", "content": "{lone}"}}]}}'
    elif case == "bad_auth":
        c["body"] = json.dumps(_valid(rng))
        bad = rng.choice([None, "Bearer nope", "Basic Zm9vOmJhcg==", "Bearer", "bearer  ", KEY])
        c["headers"] = {"Content-Type": "application/json"}
        if bad:
            c["headers"]["Authorization"] = bad
    elif case == "media_type":
        c["body"] = json.dumps(_valid(rng))
        ct = rng.choice(["text/plain", "application/x-www-form-urlencoded", "", "json", "*/*"])
        c["headers"] = {**auth, **({"Content-Type": ct} if ct else {})}
    elif case == "bad_length":
        c["body"] = json.dumps(_valid(rng))
        c["length"] = rng.choice(["-1", "abc", "1e3", "99999999999999999999", "0", " 5"])
    elif case == "short_body":  # Content-Length larger than what is sent: 408 after a while
        c["body"] = json.dumps(_valid(rng))
        c["length"] = str(len(c["body"]) + rng.randint(1, 500))
    elif case == "method_path":
        c["method"] = rng.choice(["GET", "PUT", "DELETE", "POST", "PATCH"])
        c["path"] = rng.choice(["/v1/completions", "/v2/x", "/v1/models", "/../etc", "/%ff"])
        c["body"] = json.dumps(_valid(rng)) if c["method"] != "GET" else ""
    elif case == "token_ids":
        ids = rng.choice([[-1], [10**12], [1.5], [True], list(range(3000)), [[1, 2], [3]], []])
        c["path"], c["body"] = "/v1/completions", json.dumps({"prompt": ids, "max_tokens": 2})
    elif case == "chat":
        msgs = rng.choice(
            [[], [{"role": "user", "content": "hi"}], [{"role": "tool"}], "x", [{"content": 1}]]
        )
        c["path"], c["body"] = "/v1/chat/completions", json.dumps({"messages": msgs})
    if isinstance(c.get("body"), str):
        c["body"] = c["body"].encode("utf-8", "surrogatepass")
    c.setdefault("length", "auto")
    return c


def probe_large(port: int, size: int, chunked: bool) -> dict[str, Any]:
    """Send ``size`` bytes to /v1/completions while /health is polled: the answers' times."""
    body = b'{"prompt": "' + b"a" * (size - 14) + b'"}'
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    if chunked:  # no Content-Length: the replica must cap while it reads
        headers["Transfer-Encoding"] = "chunked"
        step = 1 << 16
        body = (
            b"".join(
                b"%x\r\n" % len(body[i : i + step]) + body[i : i + step] + b"\r\n"
                for i in range(0, len(body), step)
            )
            + b"0\r\n\r\n"
        )
    health: list[tuple[float, float, int | None]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def poll() -> None:
        while not stop.is_set():
            status, dt, _ = http(port, "GET", "/health", length=None, timeout_s=30)
            health.append((time.monotonic() - t0, dt, status))
            time.sleep(0.05)

    th = threading.Thread(target=poll)
    th.start()
    time.sleep(0.3)
    status, dt, head = http(
        port, "POST", "/v1/completions", body, headers, None if chunked else "auto", 60, 1 << 16
    )
    time.sleep(0.5)
    stop.set()
    th.join()
    during = [h for h in health if h[0] >= 0.3 and h[0] <= 0.3 + dt + 0.1]
    return {
        "bytes": size,
        "chunked": chunked,
        "status": status,
        "seconds": dt,
        "answer": head.split("\r\n\r\n", 1)[-1][:200],
        "health_max_s": max((h[1] for h in health), default=None),
        "health_max_s_during": max((h[1] for h in during), default=None),
        "health_polls": len(health),
        "health_not_200": sum(h[2] != 200 for h in health),
        "health": health,
    }


def plot(doc: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    cases = sorted(doc["by_case"])
    kinds = ["2xx", "4xx", "5xx", "none"]
    bottom = [0] * len(cases)
    for kind, color in zip(kinds, ["tab:green", "tab:orange", "tab:red", "tab:gray"], strict=True):
        vals = [doc["by_case"][c].get(kind, 0) for c in cases]
        a.bar(cases, vals, bottom=bottom, label=kind, color=color)
        bottom = [x + y for x, y in zip(bottom, vals, strict=True)]
    a.set_title(f"{doc['requests']} fuzzed requests: {doc['status_5xx']} × 5xx")
    a.tick_params(axis="x", rotation=60)
    a.legend()
    for p in doc["probes"]:
        xs, ys = [h[0] for h in p["health"]], [h[1] for h in p["health"]]
        label = f"{p['bytes'] / 2**20:.0f} MB {'chunked' if p['chunked'] else 'Content-Length'}"
        b.plot(xs, ys, marker=".", label=f"/health during {label} → {p['status']}")
        b.axvspan(0.3, 0.3 + p["seconds"], alpha=0.1)
    b.axhline(1.0, color="red", ls="--", lw=0.8, label="1 s goal")
    b.set_xlabel("s")
    b.set_ylabel("/health answer time (s)")
    b.set_yscale("log")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _bucket(status: int | None) -> str:
    return "none" if status is None else f"{status // 100}xx"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--probes", type=int, default=3, help="10 MB probes of each kind.")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--url-port", type=int, default=None, help="Fuzz a server already up.")
    args = ap.parse_args()

    proc = None
    port = args.url_port or free_port()
    if args.url_port is None:
        from osd.actors.cluster import wait_healthy

        cmd = [sys.executable, "-m", "osd.cli.main", "serve", "--port", str(port)]
        proc = subprocess.Popen([*cmd, "--api-key", KEY], start_new_session=True)
        t0 = time.monotonic()
        wait_healthy(f"http://127.0.0.1:{port}", timeout_s=600)
        print(f"osd serve up in {time.monotonic() - t0:.0f} s on port {port}", flush=True)
    try:
        rng = random.Random(args.seed)
        cases = [make_case(rng) for _ in range(args.requests)]

        def send(c: dict[str, Any]) -> dict[str, Any]:
            status, dt, head = http(
                port, c["method"], c["path"], c["body"], c["headers"], c["length"], 60
            )
            return {
                "case": c["case"],
                "method": c["method"],
                "path": c["path"],
                "bytes": len(c["body"]),
                "status": status,
                "seconds": round(dt, 4),
                "answer": None if status is None or status < 500 else head[:400],
            }

        t0 = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(send, cases))
        fuzz_s = time.monotonic() - t0
        probes = [
            probe_large(port, 10 * 2**20, chunked)
            for _ in range(args.probes)
            for chunked in (False, True)
        ]
        status, _, _ = http(port, "GET", "/health", length=None)
        _, _, metrics = http(
            port, "GET", "/metrics", length=None, headers={"Authorization": f"Bearer {KEY}"}
        )
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    by_case: dict[str, Counter] = defaultdict(Counter)
    codes = Counter()
    for r in results:
        by_case[r["case"]][_bucket(r["status"])] += 1
        codes[str(r["status"])] += 1
    doc = {
        "requests": len(results),
        "seed": args.seed,
        "fuzz_s": fuzz_s,
        "status_5xx": sum(r["status"] is not None and r["status"] >= 500 for r in results),
        "no_answer": sum(r["status"] is None for r in results),
        "status_counts": dict(sorted(codes.items())),
        "by_case": {k: dict(v) for k, v in sorted(by_case.items())},
        "health_after": status,
        "probes": probes,
        "health_max_s_during_10mb": max(p["health_max_s_during"] or 0 for p in probes),
        "large_request_status": [p["status"] for p in probes],
        "goal_zero_5xx": None,
        "goal_health_under_1s": None,
        "results": results,
        "server_5xx_answers": [r for r in results if r["answer"]][:20],
    }
    doc["goal_zero_5xx"] = doc["status_5xx"] == 0 and len(results) >= 500
    doc["goal_health_under_1s"] = doc["health_max_s_during_10mb"] < 1.0
    print(
        json.dumps({k: v for k, v in doc.items() if k not in ("results", "probes")}, indent=1),
        flush=True,
    )
    for p in probes:
        print(
            f"10 MB {'chunked' if p['chunked'] else 'Content-Length'}: {p['status']} in "
            f"{p['seconds']:.2f} s, /health slowest {p['health_max_s_during']} s during",
            flush=True,
        )
    print("metrics (rejections):", [ln for ln in metrics.splitlines() if "rejected" in ln][:8])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.plot:
        plot(doc, args.plot)
    return 0 if doc["goal_zero_5xx"] and doc["goal_health_under_1s"] else 1


if __name__ == "__main__":
    sys.exit(main())
