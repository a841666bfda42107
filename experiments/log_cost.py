"""What the log costs and what it buys (issue 15, point 1): log mode, k and sampling rate
against bytes per request, records/s and α gain.

    python experiments/log_cost.py --json log_cost.json --plot docs/log_cost.png

1. **cost** — the zoo target + draft serve eval requests of every domain once, with one
   ``RecordCollector`` per (mode, k) on the same engine (the same steps, so the configs
   differ only in what they log): bytes per record, logged positions, the collector's CPU
   per request on the replica (top-k extraction + record building + msgpack encoding);
   then each config's records through ``RedisStreamBuffer`` on the embedded redis-server
   (``appendfsync everysec``): Redis CPU per record written, read and acked, hence
   **records/s and MB/s one shard takes**. A sampling rate r multiplies the bytes per
   request and the records/s offered by r (records are chosen by request id).
2. **gain** — ``osd online`` (the one-process loop, ``osd.online.run_online``) on a drift
   stream per variant: α of the online draft minus the frozen draft on the drifted domain's
   last requests, trainer steps and versions promoted.

CPU seconds of this process (one torch thread), not wall time: the machine is shared.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

MODES = ("all", "rejected")
KS = (4, 16, 64)
RATES = (1.0, 0.5, 0.25)
SCHEDULE = "stationary:math=1,sql=1,code=1,prose=1,instruct=1"
cpu_clock = time.process_time


class TimedCollector:
    """A ``RecordCollector`` whose CPU time (steps + finish) is counted."""

    def __init__(self, mode: str, k: int) -> None:
        from osd.distill.collect import RecordCollector
        from osd.distill.record import LogConfig

        self.inner = RecordCollector(LogConfig(mode=mode, k=k))
        self.cpu_s = 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def on_step(self, state, step, ledger=None) -> None:
        t = cpu_clock()
        self.inner.on_step(state, step, ledger)
        self.cpu_s += cpu_clock() - t

    def finish(self, *args, **kwargs):
        from osd.distill.record import encode

        t = cpu_clock()
        rec = self.inner.finish(*args, **kwargs)
        data = None if rec is None else encode(rec)
        self.cpu_s += cpu_clock() - t
        return rec, data


def measure_cost(n: int, max_new: int, target, draft, tok) -> list[dict]:
    from osd.drafters import build_drafter
    from osd.specdec.engine import DecodeStats, SpeculativeDecoder
    from osd.workloads.schedule import parse_schedule

    dec = SpeculativeDecoder(target, build_drafter("draft_model", target, draft, k=4), tok)
    collectors = {(m, k): TimedCollector(m, k) for m in MODES for k in KS}
    for c in collectors.values():
        dec.add_observer(c)
    blobs: dict[tuple[str, int], list[bytes]] = {key: [] for key in collectors}
    positions: dict[tuple[str, int], int] = dict.fromkeys(collectors, 0)
    generated = steps = 0
    for req in parse_schedule(SCHEDULE, n, seed=1).build():
        ids = tok(req.query.prompt, add_special_tokens=False).input_ids[-128:]
        state, stats = dec.start(ids, max_new), DecodeStats()
        while not state.finished:
            dec.step(state, stats)
            steps += 1
        generated += len(state.tokens) - state.prompt_len
        for key, c in collectors.items():
            rec, data = c.finish(state, f"req-{req.index}", "draft", 0, domain=req.domain)
            if rec is not None:
                blobs[key].append(data)
                positions[key] += rec.num_positions
    rows = []
    for (mode, k), c in collectors.items():
        sizes = [len(b) for b in blobs[(mode, k)]]
        redis = redis_cost(blobs[(mode, k)])
        row = {
            "mode": mode,
            "k": k,
            "records": len(sizes),
            "bytes_per_request": sum(sizes) / n,
            "positions_per_request": positions[(mode, k)] / n,
            "bytes_per_position": sum(sizes) / max(positions[(mode, k)], 1),
            "collector_cpu_ms_per_request": 1e3 * c.cpu_s / n,
            **redis,
        }
        row["shard_mb_per_s"] = row["shard_records_per_s"] * row["bytes_per_request"] / 1e6
        rows.append(row)
    for row in rows:
        row["generated_per_request"] = generated / n
        row["steps_per_request"] = steps / n
    return rows


def redis_cost(blobs: list[bytes], repeat: int = 2) -> dict:
    """The least-disturbed of ``repeat`` runs of :func:`redis_run`."""
    return min((redis_run(blobs) for _ in range(repeat)), key=lambda r: r["redis_us_per_record"])


def redis_run(blobs: list[bytes], n: int = 2500, batch: int = 8) -> dict:
    """Redis CPU per record written, read and acked (embedded server, everysec)."""
    from osd.buffer import EmbeddedRedis, RedisStreamBuffer

    def cpu(client) -> float:
        info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    with EmbeddedRedis(appendfsync="everysec") as srv:
        buf = RedisStreamBuffer(srv.url, consumer="t0", maxlen=n + 100)
        c0 = cpu(buf.client)
        for i in range(n):
            buf.put("draft", blobs[i % len(blobs)])
        c1, got = cpu(buf.client), 0
        while got < n:
            entries = buf.read("draft", batch)
            buf.ack("draft", [e.id for e in entries])
            got += len(entries)
        c2 = cpu(buf.client)
    per = (c2 - c0) / n
    return {
        "redis_us_per_record": 1e6 * per,
        "redis_us_per_xadd": 1e6 * (c1 - c0) / n,
        "shard_records_per_s": 1 / per,
    }


def variants(quick: bool) -> list[tuple[str, int, float]]:
    if quick:
        return [("all", 16, 1.0), ("rejected", 16, 1.0)]
    return [
        ("all", 16, 1.0),
        ("rejected", 16, 1.0),
        ("all", 4, 1.0),
        ("all", 64, 1.0),
        ("rejected", 4, 1.0),
        ("rejected", 64, 1.0),
        ("all", 16, 0.5),
        ("all", 16, 0.25),
    ]


def measure_gain(args, target, draft, tok) -> list[dict]:
    from osd.buffer import MemoryBuffer
    from osd.online import REPLAY_DISTILL, OnlineConfig, run_online

    distill = replace(REPLAY_DISTILL, lr=args.lr, publish_every_steps=8)
    rows = []
    for mode, k, rate in variants(args.quick):
        cfg = OnlineConfig(
            schedule=f"switch:instruct>math@{args.switch}",
            n=args.n,
            max_new_tokens=args.max_new,
            distill=distill,
            log_mode=mode,
            topk=k,
            log_rate=rate,
        )
        t, c = time.perf_counter(), cpu_clock()
        res = run_online(target, copy.deepcopy(draft), tok, MemoryBuffer(consumer="t0"), cfg)
        math_rows = [r for r in res.requests if r.domain == "math"][-args.last :]
        on = sum(r.accepted_online for r in math_rows) / max(
            sum(r.proposed_online for r in math_rows), 1
        )
        fr = sum(r.accepted_frozen for r in math_rows) / max(
            sum(r.proposed_frozen for r in math_rows), 1
        )
        row = {
            "mode": mode,
            "k": k,
            "rate": rate,
            "alpha_online": on,
            "alpha_frozen": fr,
            "alpha_gain": on - fr,
            "trainer_steps": res.trainer_steps,
            "versions_published": len(res.versions),
            "versions_promoted": sum(v["promoted"] for v in res.versions),
            "bytes_per_position": res.bytes_per_position,
            "cpu_s": cpu_clock() - c,
            "wall_s": time.perf_counter() - t,
        }
        rows.append(row)
        print(
            f"{mode:8s} k={k:<3d} rate {rate:.2f}: gain {row['alpha_gain']:+.3f} "
            f"(online {on:.3f}, frozen {fr:.3f}), {row['trainer_steps']} steps, "
            f"{row['versions_promoted']}/{row['versions_published']} promoted, "
            f"{row['wall_s']:.0f} s"
        )
    return rows


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    cost = result["cost"]
    for mode, off in (("all", -0.2), ("rejected", 0.2)):
        rows = [r for r in cost if r["mode"] == mode]
        xs = [i + off for i in range(len(rows))]
        axes[0].bar(xs, [r["bytes_per_request"] for r in rows], 0.4, label=mode)
        axes[1].bar(xs, [r["shard_records_per_s"] for r in rows], 0.4, label=mode)
    for ax, ylabel in zip(
        axes[:2], ("bytes per request (rate 1)", "records/s one Redis shard takes"), strict=True
    ):
        ax.set_xticks(range(len(KS)), [f"k = {k}" for k in KS])
        ax.set(ylabel=ylabel)
        ax.legend()
    axes[0].set(yscale="log", title="log size")
    axes[1].set(title="Redis shard ceiling (CPU per record)")
    gain = result.get("gain") or []
    if gain:
        labels = [f"{r['mode']}\nk={r['k']}\nrate {r['rate']:g}" for r in gain]
        axes[2].bar(range(len(gain)), [r["alpha_gain"] for r in gain], color="tab:green")
        axes[2].set_xticks(range(len(gain)), labels, fontsize=7)
        axes[2].set(ylabel="α online − frozen (drifted domain)", title="what the log buys")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="log_cost.json")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--requests", type=int, default=40, help="requests for the cost part")
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--n", type=int, default=120, help="requests per online run")
    ap.add_argument("--switch", type=int, default=30, help="instruct, then math from here")
    ap.add_argument("--last", type=int, default=40, help="math requests α is measured on")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--quick", action="store_true", help="two online variants, not eight")
    ap.add_argument("--no-gain", action="store_true", help="the cost part only")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    from osd.models import load_model, load_tokenizer

    target, draft = load_model("zoo:target", "cpu"), load_model("zoo:draft", "cpu")
    tok = load_tokenizer("zoo:target")
    t0 = time.perf_counter()
    cost = measure_cost(args.requests, args.max_new, target, copy.deepcopy(draft), tok)
    for r in cost:
        print(
            f"{r['mode']:8s} k={r['k']:<3d}: {r['bytes_per_request']:7.0f} B/request "
            f"({r['positions_per_request']:.1f} positions), collector "
            f"{r['collector_cpu_ms_per_request']:.1f} ms/request, shard "
            f"{r['shard_records_per_s']:.0f} records/s = {r['shard_mb_per_s']:.1f} MB/s"
        )
    base = next(r for r in cost if r["mode"] == "all" and r["k"] == 16)
    sampling = [
        {"rate": rate, "bytes_per_request": rate * base["bytes_per_request"]} for rate in RATES
    ]
    gain = None if args.no_gain else measure_gain(args, target, draft, tok)
    result = {
        "cost": cost,
        "sampling": sampling,
        "gain": gain,
        "config": vars(args),
        "seconds": time.perf_counter() - t0,
    }
    Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    median_ms = statistics.median(r["collector_cpu_ms_per_request"] for r in cost)
    print(f"wrote {args.json} in {result['seconds']:.0f} s (collector median {median_ms:.1f} ms)")


if __name__ == "__main__":
    main()
