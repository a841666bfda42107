"""Bounded soak (issue 13 point 6): a real ``osd serve`` with its trainer under a replay for
``--minutes``, the RSS of every process it runs sampled over time.

    python experiments/soak.py --json soak.json --plot soak.png [--minutes 30]

Starts ``osd serve`` (zoo target, embedded Redis, one replica, one trainer, the registry)
and replays a drifting schedule against it in a loop (``--concurrency`` requests in
flight, greedy, ``--max-tokens`` each) until the time is up. Every ``--every`` seconds the
resident set size of each process under ``osd serve`` (Ray's GCS and raylet, the Serve
proxy and controller, the replica, trainer and registry actors, redis-server …; psutil
when installed, else ``/proc``) is recorded, named by its role.

Stated bounds, checked per process and for the total, comparing the median of the samples
in the first ``--warmup`` fraction after warm-up (default: the first 20 % of the run is
warm-up; the baseline is the next 20 %) with the median of the last 20 %:

- growth ≤ 25 % + 64 MiB per process (a process may settle, not climb);
- growth ≤ 15 % + 128 MiB for all of them together.

Also reported: failed requests (goal 0), the trainer's published versions, and each
process's least-squares slope (MiB per minute) over the post-warm-up samples. Exits 1 when
a bound is exceeded or a request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

MB = 2**20
PROC_BOUND = (0.25, 64 * MB)  # (relative, absolute) allowed growth per process
TOTAL_BOUND = (0.15, 128 * MB)

ROLES = [  # substring of the command line -> role
    ("redis-server", "redis-server"),
    ("gcs_server", "ray gcs"),
    ("raylet", "ray raylet"),
    ("dashboard", "ray dashboard"),
    ("log_monitor", "ray log monitor"),
    ("monitor.py", "ray monitor"),
    ("ServeReplica", "serve replica"),
    ("ServeController", "serve controller"),
    ("ProxyActor", "serve proxy"),
    ("TrainerActor", "trainer"),
    ("RegistryActor", "registry"),
    ("osd.cli.main", "osd serve (driver)"),
    ("default_worker", "ray worker (idle)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children_proc(pid: int) -> list[int]:
    """All descendants of ``pid`` from /proc (when psutil is missing)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def sample(root: int) -> dict[str, dict[str, Any]]:
    """pid -> {role, rss} for ``root`` and its descendants."""
    try:
        import psutil

        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
        raw = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                raw.append((p.pid, " ".join(p.cmdline()) or p.name(), p.memory_info().rss))
    except ImportError:
        raw = []
        for pid in [root, *_children_proc(root)]:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{pid}/statm") as f:
                    rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                raw.append((pid, cmd, rss))
            except OSError:
                pass
    out = {}
    for pid, cmd, rss in raw:
        role = next((r for key, r in ROLES if key in cmd), cmd.split(" ")[0][-40:])
        out[str(pid)] = {"role": role, "rss": rss}
    return out


def _slope(ts: list[float], ys: list[float]) -> float:
    if len(ts) < 2:
        return 0.0
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return 0.0 if den == 0 else sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den


def analyse(samples: list[dict[str, Any]], warmup: float) -> dict[str, Any]:
    """Per-process and total growth between the baseline and the last 20 % (see above)."""
    n = len(samples)
    lo, hi = int(n * warmup), int(n * min(warmup + 0.2, 0.8))
    base, last = samples[lo : max(hi, lo + 1)], samples[int(n * 0.8) :]
    procs: dict[str, dict[str, Any]] = {}
    for pid in {p for s in samples for p in s["procs"]}:
        role = next(s["procs"][pid]["role"] for s in samples if pid in s["procs"])
        b = [s["procs"][pid]["rss"] for s in base if pid in s["procs"]]
        e = [s["procs"][pid]["rss"] for s in last if pid in s["procs"]]
        post = [(s["t"], s["procs"][pid]["rss"]) for s in samples[lo:] if pid in s["procs"]]
        if not b or not e:  # started or ended mid-run (a restarted worker): not judged
            procs[pid] = {"role": role, "judged": False}
            continue
        b0, e0 = statistics.median(b), statistics.median(e)
        bound = b0 * (1 + PROC_BOUND[0]) + PROC_BOUND[1]
        procs[pid] = {
            "role": role,
            "judged": True,
            "baseline_mib": b0 / MB,
            "end_mib": e0 / MB,
            "growth_mib": (e0 - b0) / MB,
            "bound_mib": bound / MB,
            "slope_mib_per_min": _slope([t / 60 for t, _ in post], [r / MB for _, r in post]),
            "ok": e0 <= bound,
        }
    tot = [sum(p["rss"] for p in s["procs"].values()) for s in samples]
    tb, te = statistics.median(tot[lo : max(hi, lo + 1)]), statistics.median(tot[int(n * 0.8) :])
    tbound = tb * (1 + TOTAL_BOUND[0]) + TOTAL_BOUND[1]
    total = {"baseline_mib": tb / MB, "end_mib": te / MB, "bound_mib": tbound / MB}
    total["ok"] = te <= tbound
    return {"processes": procs, "total": total}


def plot(doc: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5))
    samples = doc["samples"]
    for pid, p in sorted(doc["analysis"]["processes"].items(), key=lambda kv: kv[1]["role"]):
        xs = [s["t"] / 60 for s in samples if pid in s["procs"]]
        ys = [s["procs"][pid]["rss"] / MB for s in samples if pid in s["procs"]]
        if ys and max(ys) > 30:
            a.plot(xs, ys, label=f"{p['role']} ({pid})", lw=1)
    a.axvline(samples[int(len(samples) * doc["warmup"])]["t"] / 60, color="gray", ls=":")
    a.set_xlabel("minutes")
    a.set_ylabel("RSS (MiB)")
    a.set_title("RSS per process (> 30 MiB)")
    a.legend(fontsize=7)
    xs = [s["t"] / 60 for s in samples]
    b.plot(xs, [sum(p["rss"] for p in s["procs"].values()) / MB for s in samples], label="total")
    t = doc["analysis"]["total"]
    b.axhline(t["bound_mib"], color="red", ls="--", lw=0.8, label="bound")
    b2 = b.twinx()
    b2.plot(xs, [s["requests"] for s in samples], color="tab:green", label="requests done")
    b.set_xlabel("minutes")
    b.set_ylabel("total RSS (MiB)")
    b2.set_ylabel("requests")
    b.set_title(
        f"total: {t['baseline_mib']:.0f} → {t['end_mib']:.0f} MiB (bound {t['bound_mib']:.0f})"
    )
    b.legend(loc="upper left")
    b2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--every", type=float, default=10.0, help="Seconds between RSS samples.")
    ap.add_argument("--warmup", type=float, default=0.2, help="Fraction of the run not judged.")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()

    from osd.actors.cluster import wait_healthy
    from osd.actors.replay import ReplayConfig, replay_async

    from osd.workloads.schedule import parse_schedule

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "osd.cli.main", "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, start_new_session=True)
    samples: list[dict[str, Any]] = []
    done = {"requests": 0, "failed": 0, "versions": set()}
    try:
        t_up = time.monotonic()
        wait_healthy(url, timeout_s=600)
        print(f"osd serve up in {time.monotonic() - t_up:.0f} s", flush=True)
        end = time.monotonic() + 60 * args.minutes
        t0 = time.monotonic()

        def sampler() -> None:
            while time.monotonic() < end:
                samples.append(
                    {
                        "t": time.monotonic() - t0,
                        "requests": done["requests"],
                        "procs": sample(proc.pid),
                    }
                )
                time.sleep(args.every)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        rcfg = ReplayConfig(url=url, max_tokens=args.max_tokens, concurrency=args.concurrency)
        rnd = 0

        def on_result(rec) -> None:
            done["requests"] += 1
            done["failed"] += not rec.ok
            if rec.version is not None:
                done["versions"].add(rec.version)

        while time.monotonic() < end:  # rounds of 40 requests, each round a new seed
            reqs = parse_schedule("drift:instruct@10,math@15,sql", 40, seed=rnd).build()
            asyncio.run(replay_async(reqs, rcfg, on_result))
            rnd += 1
            m = (time.monotonic() - t0) / 60
            print(f"{m:5.1f} min: {done['requests']} requests, {done['failed']} failed", flush=True)
        th.join()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    analysis = analyse(samples, args.warmup)
    bad = [p for p in analysis["processes"].values() if p["judged"] and not p["ok"]]
    doc = {
        "minutes": args.minutes,
        "requests": done["requests"],
        "failed": done["failed"],
        "versions_served": sorted(done["versions"]),
        "warmup": args.warmup,
        "bounds": {
            "per_process": f"end <= baseline x {1 + PROC_BOUND[0]:g} + {PROC_BOUND[1] // MB} MiB",
            "total": f"end <= baseline x {1 + TOTAL_BOUND[0]:g} + {TOTAL_BOUND[1] // MB} MiB",
        },
        "rss_source": "psutil" if _has_psutil() else "/proc",
        "analysis": analysis,
        "over_bound": bad,
        "ok": not bad and analysis["total"]["ok"] and done["failed"] == 0,
        "samples": samples,
    }
    for pid, p in sorted(analysis["processes"].items(), key=lambda kv: kv[1]["role"]):
        if p["judged"]:
            print(
                f"{p['role']:>22} {pid:>7}: {p['baseline_mib']:7.1f} → {p['end_mib']:7.1f} MiB "
                f"(bound {p['bound_mib']:.0f}, slope {p['slope_mib_per_min']:+.2f} MiB/min)"
                f"{'' if p['ok'] else '  OVER'}"
            )
    t = analysis["total"]
    print(f"total: {t['baseline_mib']:.0f} → {t['end_mib']:.0f} MiB (bound {t['bound_mib']:.0f})")
    print(f"requests {done['requests']}, failed {done['failed']}, ok: {doc['ok']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.plot:
        plot(doc, args.plot)
    return 0 if doc["ok"] else 1


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
