"""``osd demo``: the whole system on one machine, end to end, with a live table.

1. **up**: local Ray, a private Redis, the registry, trainer(s) and the Serve app
   (zoo models);
2. **drift replay**: a schedule whose domain drifts (default 50 instruct requests, 100
   math, 200 sql — the zoo's draft knows instruct, not math or sql) through HTTP; replicas log records, the trainer distils, the registry gates and
   promotes, replicas hot-swap — a live ``rich`` table shows requests, α per window,
   versions, records and trainer steps;
3. **throughput**: the same requests with the trainer paused and running (publishing
   off in both, so the served weights are identical and only the trainer's compute
   differs), alternated ``rounds`` times; the ratio of tokens/s is reported;
4. **results**: JSON (``--json``) and a PNG of α and latency over time.

``alpha_gain`` is the drifted domain's (the last phase's) pooled α over its last
``first_last`` requests minus over its first ``first_last`` (fewer when the domain has
fewer than ``2 × first_last`` requests; the count used is in ``alpha_gain_basis``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from osd.actors.cluster import Cluster, launch
from osd.actors.config import ClusterConfig
from osd.actors.replay import (
    ReplayConfig,
    ReplayRecord,
    plot_replay,
    pooled_alpha,
    replay_async,
    summarize,
    version_swaps,
    windows,
)
from rich.console import Console
from rich.live import Live
from rich.table import Table

from osd.workloads.schedule import parse_schedule

__all__ = ["DemoConfig", "alpha_gain", "run_demo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    schedule: str = "drift:instruct@50,math@150,sql"
    n: int = 350
    max_tokens: int = 32
    concurrency: int = 2
    seed: int = 0
    window: int = 25
    first_last: int = 100  # alpha_gain: last N minus first N requests of the drifted domain
    throughput_requests: int = 16  # per phase
    throughput_rounds: int = 2  # (paused, running) pairs
    warmup: int = 2


def alpha_gain(
    records: list[ReplayRecord], first_last: int = 100, domain: str | None = None
) -> dict[str, Any]:
    """Pooled α of ``domain``'s (default: the last request's) last ``m`` requests minus its
    first ``m``, ``m = min(first_last, count // 2)``."""
    if not records:
        return {"domain": None, "gain": None, "requests": 0, "m": 0}
    domain = domain or records[-1].domain
    rs = [r for r in records if r.domain == domain]
    m = min(first_last, len(rs) // 2)
    first, last = pooled_alpha(rs[:m]), pooled_alpha(rs[-m:]) if m else None
    gain = None if first is None or last is None else last - first
    return {
        "domain": domain,
        "requests": len(rs),
        "m": m,
        "alpha_first": first,
        "alpha_last": last,
        "gain": gain,
    }


def _p99(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.99 * len(s) + 0.999999) - 1)]


class _Board:
    """The live table: what the replay saw plus what the trainer and registry report."""

    def __init__(self, n: int, window: int) -> None:
        self.n, self.window = n, window
        self.records: list[ReplayRecord] = []
        self.trainer: dict[str, Any] = {}
        self.live_version = 0
        self.published = 0
        self.promoted = 0
        self.buffer_len = 0
        self.t0 = time.perf_counter()
        self.phase = "drift replay"

    def table(self) -> Table:
        done = sorted(self.records, key=lambda r: r.index)
        recent = done[-self.window :]
        cur = done[-1].domain if done else "–"
        dom = [r for r in done if r.domain == cur]
        a_first = pooled_alpha(dom[: self.window])
        a_now = pooled_alpha(dom[-self.window :])
        failed = sum(not r.ok for r in done)
        versions = [r.version for r in recent if r.version is not None]
        t = Table(title=f"osd demo · {self.phase} · {time.perf_counter() - self.t0:.0f} s")
        t.add_column("what")
        t.add_column("value", justify="right")
        fmt = lambda a: "–" if a is None else f"{a:.3f}"  # noqa: E731
        t.add_row("requests", f"{len(done)}/{self.n} ({failed} failed)")
        t.add_row("domain now", cur)
        t.add_row(f"α, first {self.window} of {cur}", fmt(a_first))
        t.add_row(f"α, last {self.window} of {cur}", fmt(a_now))
        t.add_row(f"α, last {self.window} requests", fmt(pooled_alpha(recent)))
        t.add_row("drafter version served", str(max(versions)) if versions else "–")
        t.add_row(
            "registry live / published / promoted",
            f"v{self.live_version} / {self.published} / {self.promoted}",
        )
        t.add_row("records in buffer stream", str(self.buffer_len))
        t.add_row(
            "trainer steps / records trained",
            f"{self.trainer.get('steps', 0)} / {self.trainer.get('records_seen', 0)}",
        )
        lat = [r.latency_s for r in recent if r.ok]
        t.add_row("latency p50, last window", f"{sorted(lat)[len(lat) // 2]:.2f} s" if lat else "–")
        return t


async def _watch(cluster: Cluster, board: _Board, live: Live, stop: asyncio.Event) -> None:
    """Refresh trainer and registry figures once a second."""
    from osd.buffer import RedisStreamBuffer

    buffer = RedisStreamBuffer(cluster.cfg.redis_url)
    while not stop.is_set():
        try:
            stats = await asyncio.gather(*(t.stats.remote() for t in cluster.trainers))
            board.trainer = {
                "steps": sum(s["steps"] for s in stats),
                "records_seen": sum(s["records_seen"] for s in stats),
            }
            board.published = sum(s["publishes"] for s in stats)
            board.promoted = sum(s["promoted"] for s in stats)
            board.live_version = await cluster.registry.live_version.remote(cluster.cfg.drafter_id)
            board.buffer_len = buffer.length(cluster.cfg.drafter_id)
        except Exception as err:  # a restarting actor: show stale figures
            log.debug("watch: %s", err)
        live.update(board.table())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


async def _drift(cluster: Cluster, reqs, rcfg: ReplayConfig, board: _Board, console: Console):
    stop = asyncio.Event()
    with Live(board.table(), console=console, refresh_per_second=4) as live:

        def on_result(rec: ReplayRecord) -> None:
            board.records.append(rec)
            live.update(board.table())

        watcher = asyncio.create_task(_watch(cluster, board, live, stop))
        try:
            records = await replay_async(reqs, rcfg, on_result)
        finally:
            stop.set()
            await watcher
    return records


async def _throughput(cluster: Cluster, reqs, rcfg: ReplayConfig, rounds: int) -> dict[str, Any]:
    """Tokens/s with the trainers paused vs running; publishing off throughout."""
    await asyncio.gather(*(t.set_publishing.remote(False) for t in cluster.trainers))
    await asyncio.sleep(2 * cluster.cfg.registry.poll_s + 0.5)  # let a last swap land
    phases: list[dict[str, Any]] = []
    try:
        for _ in range(rounds):
            for running in (False, True):
                calls = [(t.resume if running else t.pause).remote() for t in cluster.trainers]
                await asyncio.gather(*calls)
                before = await asyncio.gather(*(t.stats.remote() for t in cluster.trainers))
                s = summarize(await replay_async(reqs, rcfg))
                after = await asyncio.gather(*(t.stats.remote() for t in cluster.trainers))
                steps = sum(a["steps"] - b["steps"] for a, b in zip(after, before, strict=True))
                phases.append(
                    {
                        "trainer": "running" if running else "paused",
                        "tokens_per_s": s["tokens_per_s"],
                        "failed": s["failed"],
                        "alpha": s["alpha"],
                        "trainer_steps": steps,
                    }
                )
    finally:
        await asyncio.gather(*(t.resume.remote() for t in cluster.trainers))
        await asyncio.gather(*(t.set_publishing.remote(True) for t in cluster.trainers))
    on = [p["tokens_per_s"] for p in phases if p["trainer"] == "running"]
    off = [p["tokens_per_s"] for p in phases if p["trainer"] == "paused"]
    ratio = (sum(on) / len(on)) / (sum(off) / len(off)) if on and off and sum(off) else None
    return {"ratio": ratio, "phases": phases, "requests_per_phase": len(reqs)}


def run_demo(
    cluster_cfg: ClusterConfig,
    demo: DemoConfig,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    console: Console | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the demo; returns (and writes) the results document."""
    console = console or Console()
    t0 = time.perf_counter()
    schedule = parse_schedule(demo.schedule, demo.n, demo.seed)
    reqs = schedule.build(data_dir=data_dir)
    drifted = reqs[-1].domain
    tp_reqs = [r for r in reqs if r.domain == drifted][-demo.throughput_requests :]
    tp_reqs = [type(r)(i, None, r.domain, r.query) for i, r in enumerate(tp_reqs)]
    console.print(f"[bold]osd demo[/bold]: {schedule.describe()}; starting Ray, Redis, actors …")
    cluster = launch(cluster_cfg)
    try:
        console.print(f"up in {time.perf_counter() - t0:.1f} s at {cluster.url}")
        rcfg = ReplayConfig(
            url=cluster.url,
            model=cluster_cfg.model_name,
            max_tokens=demo.max_tokens,
            concurrency=demo.concurrency,
            api_key=next(iter(cluster_cfg.serve.keys), None),
        )
        warm = ReplayConfig(**{**asdict(rcfg), "send_domain": False})
        asyncio.run(replay_async([reqs[0]] * demo.warmup, warm))
        board = _Board(len(reqs), demo.window)
        t_replay = time.perf_counter()
        records = asyncio.run(_drift(cluster, reqs, rcfg, board, console))
        replay_s = time.perf_counter() - t_replay
        console.print(f"drift replay done in {replay_s:.0f} s; measuring throughput …")
        tp = asyncio.run(_throughput(cluster, tp_reqs, rcfg, demo.throughput_rounds))
        report = cluster.report()
        trainers = cluster.trainer_stats()
    finally:
        cluster.shutdown()
    gain = alpha_gain(records, demo.first_last)
    pauses = [a["pause_ms"] for a in report["adoptions"]]
    summary = summarize(records)
    doc = {
        "requests": summary["requests"],
        "failed": summary["failed"],
        "alpha_gain": gain["gain"],
        "alpha_gain_basis": gain,
        "alpha_gain_by_domain": {
            d: alpha_gain(records, demo.first_last, d)
            for d in dict.fromkeys(r.domain for r in records)
        },
        "swap_pause_ms_p99": _p99(pauses),
        "swap_pause_ms": pauses,
        "versions": [
            {k: v.get(k) for k in ("version", "status", "evaluation", "provenance", "created")}
            for v in report["versions"]
        ],
        "gate_decisions": report["decisions"],
        "parts": report.get("parts", {}),  # versioned parts: decision model, adapters
        "throughput_ratio_with_trainer": tp["ratio"],
        "throughput": tp,
        "replay": summary,
        "windows": windows(records, demo.window),
        "swaps_seen_by_clients": version_swaps(records),
        "trainers": trainers,
        "replay_s": replay_s,
        "wall_s": time.perf_counter() - t0,
        "startup_s": cluster.timings,
        "config": {"demo": asdict(demo), "cluster": cluster_cfg.to_dict()},
    }
    doc["config"]["cluster"]["buffer"]["url"] = None  # never write the Redis password
    if json_path:
        Path(json_path).write_text(json.dumps(doc, indent=2) + "\n")
    if plot_path:
        plot_replay(records, plot_path, demo.window, title=f"osd demo · {schedule.describe()}")
    return doc
