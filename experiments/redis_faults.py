"""Redis and registry-store faults under a live replay (issue 13): a measurement.

    python experiments/redis_faults.py --json redis_faults.json [--requests 120] [--kills 3]

Phase 1 — the cluster (local Ray, the private supervised redis-server, one replica, one
trainer) serves a drift replay while the redis-server is SIGKILLed ``--kills`` times, spread
over the replay. Reported: failed requests, records the replica's sink dropped, the
trainers' consumer group once drained (pending, entries never delivered), the trainer's
steps at each kill and how long until it stepped again.

Phase 2 — the registry's store is emptied under the running registry (FLUSHALL), then the
registry actor is killed and restarted by Ray on an emptied store. Reported: the weights'
checksum the replica serves before and after each, the registry's epochs, requests in
between.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import threading
import time
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(cond, timeout_s: float) -> float | None:
    """Seconds until ``cond()`` held (exceptions count as not yet), None on timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            if cond():
                return time.monotonic() - t0
        except Exception:
            pass
        time.sleep(0.1)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import ray
    from osd.actors.cluster import launch
    from osd.actors.config import ClusterConfig
    from osd.actors.replay import ReplayConfig, replay

    from osd.buffer.redis_stream import redis_client
    from osd.workloads.schedule import parse_schedule

    cfg = ClusterConfig.from_dict(
        {
            "serve": {"port": free_port(), "num_cpus": 1},
            "buffer": {"holdout_every": 4},
            "registry": {"poll_s": 0.1, "gate_margin": 0.02, "maintain_s": 0.5},
            "trainer": {"distill": {"lr": 1e-3, "batch_records": 4, "publish_every_steps": 4}},
        }
    )
    t0 = time.perf_counter()
    cluster = launch(cfg, num_cpus=4)
    out: dict[str, Any] = {"launch_s": time.perf_counter() - t0, "requests": args.requests}
    server = cluster.redis_server
    client = redis_client(cluster.cfg.redis_url)

    def stats() -> dict[str, Any]:
        return httpx.get(f"{cluster.url}/v1/osd/stats", timeout=10).json()

    def steps() -> int:
        return cluster.trainer_stats()[0]["steps"]

    try:
        # ---- phase 1: SIGKILL the redis-server during the replay
        reqs = parse_schedule("switch:instruct>math@40", args.requests, seed=1).build()
        done: list[Any] = []
        rcfg = ReplayConfig(url=cluster.url, max_tokens=24, concurrency=2)
        th = threading.Thread(target=lambda: done.extend(replay(reqs, rcfg, done.append)))
        th.start()
        kills = []
        for k in range(args.kills):
            at = (k + 1) * args.requests // (args.kills + 1)
            while len(done) < at and th.is_alive():
                time.sleep(0.05)
            before = steps()
            pid = server.pid
            os.kill(pid, signal.SIGKILL)
            back = wait(lambda p=pid: server.pid != p and client.ping(), 30)
            resumed = wait(lambda b=before: steps() > b, 60)
            kills.append({"after_requests": len(done), "steps_at_kill": before,
                          "redis_back_s": back, "training_resumed_s": resumed})  # fmt: skip
            print(f"kill {k + 1}: Redis back in {back} s, training resumed in {resumed} s")
        th.join()
        records = done[: args.requests]
        key = "osd:records:draft"

        def drained() -> bool:
            g = {x["name"]: x for x in client.xinfo_groups(key)}[b"trainers"]
            info = client.xinfo_stream(key)
            return g["pending"] == 0 and g["last-delivered-id"] == info["last-generated-id"]

        drain_s = wait(drained, 120)
        group = {x["name"]: x for x in client.xinfo_groups(key)}[b"trainers"]
        s = stats()
        out["phase1"] = {
            "failed_requests": sum(not r.ok for r in records),
            "answered": len(records),
            "records_written": s["records_written"],
            "records_dropped": s["records_dropped"],
            "stream_length": client.xlen(key),
            "group_pending": group["pending"],
            "group_drained_s": drain_s,
            "redis_restarts": server.restarts,
            "trainer": cluster.trainer_stats()[0],
            "kills": kills,
        }

        # ---- phase 2: the registry's store emptied, then a registry restarted on it
        def serving() -> dict[str, Any]:
            return stats()["serving"]

        ray.get(cluster.trainers[0].set_publishing.remote(False))  # live stays put: only
        time.sleep(3.0)  # the faults may change what is served (a publish may be in flight)
        before = serving()
        client.flushall()
        moved = wait(lambda: serving()["epoch"] != before["epoch"], 60)
        after_flush = serving()
        ok = [httpx.post(f"{cluster.url}/v1/completions", timeout=60,
                         json={"prompt": "SELECT", "max_tokens": 4}).status_code
              for _ in range(3)]  # fmt: skip
        ray.kill(cluster.registry, no_restart=False)
        client.flushall()
        restarted = wait(lambda: serving()["epoch"] not in (before["epoch"],
                                                             after_flush["epoch"]), 120)  # fmt: skip
        after_restart = serving()
        report = cluster.report()
        out["phase2"] = {
            "served_before": before,
            "served_after_flush": after_flush,
            "epoch_changed_after_s": moved,
            "served_after_registry_restart_on_empty_store": after_restart,
            "epoch_changed_after_restart_s": restarted,
            "weights_unchanged": before["checksum"]
            == after_flush["checksum"]
            == after_restart["checksum"],
            "requests_between": ok,
            "registry_live": report["live_version"],
            "registry_epoch": report["epoch"],
            "swaps": stats()["swaps"][-4:],
        }
    finally:
        cluster.shutdown()
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
