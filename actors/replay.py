"""The replay driver: send an ``osd.workloads`` schedule to ``/v1/completions`` over HTTP.

Requests leave at the schedule's arrival times (``time_s``; a closed loop sends the next
as soon as a slot frees) with at most ``concurrency`` in flight; a request whose arrival
time has come waits for a slot (that wait is part of its latency, as for a real client).
Each answer is kept as a :class:`ReplayRecord`: latency, tokens, the drafter version
and the request's α as the server reported them (``osd`` block of the response).

>>> reqs = parse_schedule("drift:instruct@50,math", n=300).build()     # doctest: +SKIP
>>> records = replay(reqs, ReplayConfig(url="http://127.0.0.1:8000"))  # doctest: +SKIP
>>> summarize(records)["alpha_by_domain"]                              # doctest: +SKIP

α over a set of requests is pooled: Σ accepted ÷ Σ proposed (DESIGN §7), not a mean of
per-request ratios, over the requests that succeeded; per window it is
:func:`osd.metrics.alpha_windows`, as in ``osd online``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from osd import metrics
from osd.workloads.schedule import ScheduledRequest

__all__ = [
    "ReplayConfig",
    "ReplayRecord",
    "plot_replay",
    "pooled_alpha",
    "replay",
    "replay_async",
    "summarize",
    "version_swaps",
    "windows",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayConfig:
    url: str = "http://127.0.0.1:8000"
    model: str = "osd"
    max_tokens: int = 32
    temperature: float = 0.0
    concurrency: int = 2
    timeout_s: float = 120.0
    send_domain: bool = True  # tag each request with its domain (stored with its record)
    keep_text: bool = False
    api_key: str | None = None  # sent as 'Authorization: Bearer KEY' (osd serve --api-key)

    def __post_init__(self) -> None:
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, got {self.concurrency!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")


@dataclass
class ReplayRecord:
    """One request of a replay, as the client saw it."""

    index: int
    domain: str
    scheduled_s: float | None  # arrival time in the schedule (None: closed loop)
    sent_s: float  # since the replay started
    latency_s: float  # sent → full answer
    status: int  # HTTP status; 0 when no answer (connection error, timeout)
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    alpha: float | None = None
    proposed: int = 0
    accepted: int = 0
    version: int | None = None
    version_start: int | None = None
    finish_reason: str | None = None
    text: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def done_s(self) -> float:
        return self.sent_s + self.latency_s


def _body(req: ScheduledRequest, cfg: ReplayConfig) -> dict[str, Any]:
    body = {
        "model": cfg.model,
        "prompt": req.query.prompt,
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
    }
    if cfg.send_domain:
        body["domain"] = req.domain
    return body


async def _send(
    client: httpx.AsyncClient, req: ScheduledRequest, cfg: ReplayConfig, t0: float
) -> ReplayRecord:
    sent = time.perf_counter()
    rec = ReplayRecord(req.index, req.domain, req.time_s, sent - t0, 0.0, 0)
    try:
        r = await client.post(f"{cfg.url}/v1/completions", json=_body(req, cfg))
        rec.status = r.status_code
        doc = r.json()
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        rec.error = f"{type(err).__name__}: {err}"
        doc = {}
    rec.latency_s = time.perf_counter() - sent
    if rec.status != 200:
        rec.error = rec.error or (doc.get("error") or {}).get("message", f"HTTP {rec.status}")
        return rec
    usage, osd = doc.get("usage", {}), doc.get("osd", {})
    choice = (doc.get("choices") or [{}])[0]
    rec.prompt_tokens = int(usage.get("prompt_tokens", 0))
    rec.completion_tokens = int(usage.get("completion_tokens", 0))
    rec.alpha = osd.get("alpha")
    rec.proposed = int(osd.get("proposed", 0))
    rec.accepted = int(osd.get("accepted", 0))
    rec.version = osd.get("drafter_version")
    rec.version_start = osd.get("drafter_version_start")
    rec.finish_reason = choice.get("finish_reason")
    if cfg.keep_text:
        rec.text = choice.get("text")
    return rec


async def replay_async(
    requests: Sequence[ScheduledRequest],
    cfg: ReplayConfig,
    on_result: Callable[[ReplayRecord], None] | None = None,
) -> list[ReplayRecord]:
    """Replay ``requests`` in index order; returns one record per request, in index order."""
    sem = asyncio.Semaphore(cfg.concurrency)
    out: list[ReplayRecord | None] = [None] * len(requests)
    limits = httpx.Limits(max_connections=cfg.concurrency + 2)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    async with httpx.AsyncClient(timeout=cfg.timeout_s, limits=limits, headers=headers) as client:
        t0 = time.perf_counter()

        async def one(i: int, req: ScheduledRequest) -> None:
            try:
                rec = await _send(client, req, cfg, t0)
            finally:
                sem.release()
            out[i] = rec
            if on_result is not None:
                on_result(rec)

        tasks = []
        for i, req in enumerate(requests):
            if req.time_s is not None:
                delay = t0 + req.time_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            await sem.acquire()
            tasks.append(asyncio.create_task(one(i, req)))
        await asyncio.gather(*tasks)
    return [r for r in out if r is not None]


def replay(
    requests: Sequence[ScheduledRequest],
    cfg: ReplayConfig,
    on_result: Callable[[ReplayRecord], None] | None = None,
) -> list[ReplayRecord]:
    """:func:`replay_async` from synchronous code."""
    return asyncio.run(replay_async(requests, cfg, on_result))


# ---- summaries ---------------------------------------------------------------------------


def _counts(record: ReplayRecord) -> tuple[int, int]:
    """(accepted, proposed) of a successful request; a failed one counts for nothing."""
    return (record.accepted, record.proposed) if record.ok else (0, 0)


def pooled_alpha(records: Sequence[ReplayRecord]) -> float | None:
    """Σ accepted ÷ Σ proposed over the successful records (None when nothing was drafted)."""
    return metrics.pooled_alpha(records, _counts)


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def windows(records: Sequence[ReplayRecord], size: int = 25) -> list[dict[str, Any]]:
    """Pooled α, latency and the last version per window of ``size`` requests (index order)."""
    out = []
    for w in metrics.alpha_windows(records, size, _counts):
        ok = [r for r in w.rows if r.ok]
        out.append(
            {
                "start": w.start,
                "domain": w.domain,
                "alpha": w.alpha,
                "latency_p50_s": _pct([r.latency_s for r in ok], 50),
                "version": max((r.version for r in ok if r.version is not None), default=None),
                "failed": len(w.rows) - len(ok),
            }
        )
    return out


def version_swaps(records: Sequence[ReplayRecord]) -> list[dict[str, Any]]:
    """When each new drafter version first showed up in an answer (by completion time)."""
    seen, out = set(), []
    for r in sorted((r for r in records if r.ok and r.version is not None), key=lambda r: r.done_s):
        if r.version not in seen:
            seen.add(r.version)
            out.append({"version": r.version, "time_s": r.done_s, "index": r.index})
    return out


def summarize(records: Sequence[ReplayRecord]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    span = max((r.done_s for r in records), default=0.0) - min(
        (r.sent_s for r in records), default=0.0
    )
    tokens = sum(r.completion_tokens for r in ok)
    by_domain = {}
    for d in dict.fromkeys(r.domain for r in records):
        rs = [r for r in records if r.domain == d]
        by_domain[d] = {"requests": len(rs), "alpha": pooled_alpha(rs)}
    lat = [r.latency_s for r in ok]
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:10],
        "wall_s": span,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / span if span > 0 else 0.0,
        "latency_p50_s": _pct(lat, 50),
        "latency_p99_s": _pct(lat, 99),
        "alpha": pooled_alpha(records),
        "alpha_by_domain": {d: v["alpha"] for d, v in by_domain.items()},
        "requests_by_domain": {d: v["requests"] for d, v in by_domain.items()},
        "versions_seen": sorted({r.version for r in ok if r.version is not None}),
    }


def to_json(records: Sequence[ReplayRecord], window: int = 25) -> dict[str, Any]:
    return {
        "summary": summarize(records),
        "windows": windows(records, window),
        "swaps": version_swaps(records),
        "requests": [asdict(r) for r in records],
    }


def plot_replay(
    records: Sequence[ReplayRecord], path: str | Path, window: int = 25, title: str = ""
) -> None:
    """α (per request and pooled per window) and latency over time; swaps and domain
    switches marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.ok and r.alpha is not None]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    domains = list(dict.fromkeys(r.domain for r in records))
    colors = {d: plt.cm.tab10(i) for i, d in enumerate(domains)}
    for d in domains:
        rs = [r for r in ok if r.domain == d]
        ax1.scatter([r.done_s for r in rs], [r.alpha for r in rs], s=6, alpha=0.35, color=colors[d])
        ax2.scatter([r.done_s for r in rs], [r.latency_s for r in rs], s=6, color=colors[d])
    xs, ys = [], []
    for w in metrics.alpha_windows(records, window, _counts):
        done = [r.done_s for r in w.rows if r.ok]
        if done and w.alpha is not None:
            xs.append(sum(done) / len(done))
            ys.append(w.alpha)
    ax1.plot(xs, ys, "k-o", ms=3, lw=1.5, label=f"α pooled per {window} requests")
    for s in version_swaps(records)[1:]:
        for ax in (ax1, ax2):
            ax.axvline(s["time_s"], color="tab:purple", lw=0.8, alpha=0.5)
        ax1.text(s["time_s"], 1.01, f"v{s['version']}", fontsize=7, color="tab:purple")
    prev = None
    for r in records:
        if r.domain != prev:
            ax1.axvline(r.sent_s, color="grey", ls="--", lw=0.8)
            ax1.text(r.sent_s, 0.02, f" {r.domain}", fontsize=9, color="grey")
            prev = r.domain
    ax1.set(ylabel="acceptance rate α", ylim=(0, 1.08), title=title or "replay")
    ax1.legend(loc="lower right", fontsize=8)
    ax2.set(xlabel="time (s); purple = drafter version first served", ylabel="latency (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
