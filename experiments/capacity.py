"""Capacity constants of the online loop, measured here, and the model that extrapolates them.

    python experiments/capacity.py --json capacity.json --plot docs/capacity.png

Measures on this machine, each with the project's own code (docs/capacity.md):

1. **records** — real distill records: the zoo target + draft serve eval requests of
   every domain (engine + ``RecordCollector``, log mode ``all``, k = 16: the cluster's
   defaults); bytes per record and per logged position.
2. **Redis** — those records through ``RedisStreamBuffer`` against the embedded
   redis-server (``appendfsync everysec`` and ``always``): XADD rate of one client, the
   trainers' read + ack rate (batches of 8), and Redis's own CPU per record (``INFO``
   ``used_cpu_*``): the shard's ceiling, which is what extrapolates (Redis runs a command
   on one thread; the Python client, not the server, limits the client-side figures).
3. **trainer** — ``OnlineDistiller`` steps on those records (full fine-tune of the draft,
   8 records a step, one CPU thread): records/s, logged positions/s, tokens/s, and the
   FLOP rate that implies (6 · params · tokens), from which a GPU's figure is predicted.
4. **weights** — per version of the draft (full and LoRA r = 8) and of the Medusa / EAGLE
   heads: safetensors bytes; serialise + sha256 (trainer), gate (registry: validate, store,
   evaluate 32 held-out records), and checksum + deserialise + validate + load (replica).
5. **model vs simulation** — the closed-form capacity model (``capacity_sim.py``) against a
   discrete-event simulation, both fed the constants above: ingest throughput, trimmed
   records and record age for N replicas, S shards and T trainers; broadcast lag of one
   version to N replicas.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from capacity_sim import (
    BroadcastCase,
    IngestCase,
    case_dict,
    predict_broadcast,
    predict_ingest,
    simulate_broadcast,
    simulate_shard,
)

log = logging.getLogger("capacity")
SCHEDULE = "stationary:math=1,sql=1,code=1,prose=1,instruct=1"
LINK_BYTES_PER_S = 1.25e9  # 10 GbE: the registry's egress (assumed, not measured here)
GPU_FLOPS = 400e12  # H100 bf16 dense peak used for the GPU prediction (assumed)
GPU_MFU = 0.3  # fraction of it a small-model training step reaches (assumed)
REAL_RECORD_TOKENS = 700  # prompt + output tokens of a production request (assumed)
# a LoRA r=8 adapter on q/k/v/o/gate/up/down of Llama-3.2-1B's shapes (16 layers, hidden
# 2048, kv 512, MLP 8192): 8 · (in + out) per projection = 352,256 params a layer, fp32
LORA_1B_BYTES = 16 * 352_256 * 4
POLL_UTIL = 0.5  # the registry actor's poll load, as a fraction of one core


# This machine's two cores are shared with other jobs (load averages of 10-20), so compute
# constants are CPU seconds of this process (one torch thread: what the work costs on one
# uncontended core), not wall time; Redis's cost is its own CPU time.
cpu_clock = time.process_time


def timed(fn, repeat: int = 5) -> float:
    """Median CPU seconds of ``fn()`` over ``repeat`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        t = cpu_clock()
        fn()
        times.append(cpu_clock() - t)
    return statistics.median(times)


# ---------------------------------------------------------------------------- 1. records
def make_records(n: int, max_new: int, data_dir=None):
    """Serve ``n`` eval requests with the zoo models; their records (encoded) and rates."""
    from osd.distill.collect import RecordCollector
    from osd.distill.record import LogConfig, encode
    from osd.drafters import build_drafter
    from osd.models import load_model, load_tokenizer
    from osd.specdec.engine import DecodeStats, SpeculativeDecoder
    from osd.workloads.schedule import parse_schedule

    target, draft = load_model("zoo:target", "cpu"), load_model("zoo:draft", "cpu")
    tok = load_tokenizer("zoo:target")
    dec = SpeculativeDecoder(target, build_drafter("draft_model", target, draft, k=4), tok)
    collector = RecordCollector(LogConfig(mode="all", k=16))
    dec.add_observer(collector)
    records, blobs, tokens, steps = [], [], 0, 0
    t0, c0 = time.perf_counter(), cpu_clock()
    for req in parse_schedule(SCHEDULE, n, seed=0).build(data_dir=data_dir):
        ids = tok(req.query.prompt, add_special_tokens=False).input_ids[-128:]
        state, stats = dec.start(ids, max_new), DecodeStats()
        while not state.finished:
            dec.step(state, stats)
            steps += 1
        tokens += len(state.tokens) - state.prompt_len
        rec = collector.finish(state, f"req-{req.index}", "draft", 0, domain=req.domain)
        records.append(rec)
        blobs.append(encode(rec))
    seconds, wall = cpu_clock() - c0, time.perf_counter() - t0
    sizes = [len(b) for b in blobs]
    positions = sum(r.num_positions for r in records)
    out = {
        "requests": n,
        "max_new_tokens": max_new,
        "bytes_per_record_mean": statistics.mean(sizes),
        "bytes_per_record_max": max(sizes),
        "bytes_per_position": sum(sizes) / positions,
        "positions_per_record": positions / n,
        "tokens_per_record": statistics.mean(r.num_tokens for r in records),
        "replica_single_stream_req_per_s": n / seconds,
        "replica_single_stream_tokens_per_s": tokens / seconds,
        "decode_step_s": seconds / steps,  # one speculative step, batch 1, prefill included
        "wall_s": wall,
    }
    return records, blobs, out, (target, draft)


# ------------------------------------------------------------------------------ 2. Redis
def redis_cpu(client) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measure_redis(blobs: list[bytes], n: int = 3000, batch: int = 8, repeat: int = 2) -> dict:
    """Per appendfsync mode, the run (of ``repeat``) in which Redis used the least CPU per
    record: the others shared the machine's two cores with more of someone else's work."""
    out: dict[str, dict] = {}
    for fsync in ("everysec", "always"):
        runs = [redis_run(blobs, fsync, n, batch) for _ in range(repeat)]
        out[fsync] = min(runs, key=lambda r: r["redis_cpu_us_per_xadd"])
    return out


def redis_run(blobs: list[bytes], fsync: str, n: int, batch: int) -> dict:
    from osd.buffer import EmbeddedRedis, RedisStreamBuffer

    with EmbeddedRedis(appendfsync=fsync) as srv:
        buf = RedisStreamBuffer(srv.url, consumer="t0", maxlen=n + 1000)
        client = buf.client
        cpu0, t0 = redis_cpu(client), time.perf_counter()
        for i in range(n):
            buf.put("draft", blobs[i % len(blobs)])
        write_s, cpu1 = time.perf_counter() - t0, redis_cpu(client)
        stream_mem = client.memory_usage(buf.key("draft")) or 0
        t1, got = time.perf_counter(), 0
        while got < n:
            entries = buf.read("draft", batch)
            buf.ack("draft", [e.id for e in entries])
            got += len(entries)
        read_s, cpu2 = time.perf_counter() - t1, redis_cpu(client)
        stats = client.info("commandstats")
        usec = {
            cmd: stats[f"cmdstat_{cmd}"]["usec_per_call"]
            for cmd in ("xadd", "xreadgroup", "xack")
            if f"cmdstat_{cmd}" in stats
        }
    o = {
        "appendfsync": fsync,
        "records": n,
        "client_xadd_per_s": n / write_s,
        "client_read_ack_per_s": n / read_s,
        "redis_cpu_us_per_xadd": 1e6 * (cpu1 - cpu0) / n,
        "redis_cpu_us_per_read_ack": 1e6 * (cpu2 - cpu1) / n,
        "commandstats_usec_per_call": usec,
        "stream_bytes_per_entry": stream_mem / n,
    }
    o["shard_ceiling_records_per_s"] = 1e6 / (
        o["redis_cpu_us_per_xadd"] + o["redis_cpu_us_per_read_ack"]
    )
    return o


# ---------------------------------------------------------------------------- 3. trainer
def measure_trainer(records, draft, steps: int = 30, batch: int = 8) -> dict:
    from osd.buffer import MemoryBuffer
    from osd.distill.config import DistillConfig
    from osd.distill.record import encode
    from osd.distill.trainer import OnlineDistiller
    from osd.drafters import build_drafter, build_student

    drafter = build_drafter("draft_model", None, copy.deepcopy(draft), lenient=True, k=4)
    student = build_student("draft_model", drafter)
    buf = MemoryBuffer(consumer="t0")
    for i in range((steps + 3) * batch):
        buf.put("draft", encode(records[i % len(records)]))
    cfg = DistillConfig(batch_records=batch, publish_every_steps=10**9, publish_every_s=None)
    trainer = OnlineDistiller(student, buf, "draft", cfg)
    for _ in range(3):  # warm-up
        trainer.step()
    recs0, pos0 = trainer.records_seen, trainer.positions_seen
    t0, c0 = time.perf_counter(), cpu_clock()
    for _ in range(steps):
        trainer.step()
    seconds, wall = cpu_clock() - c0, time.perf_counter() - t0
    n_rec = trainer.records_seen - recs0
    tokens = n_rec * statistics.mean(r.num_tokens for r in records)  # student forward tokens
    params = sum(p.numel() for p in student.module.parameters())
    flops = 6 * params * tokens / seconds
    tok_s = tokens / seconds
    return {
        "threads": torch.get_num_threads(),
        "wall_s": wall,
        "cpu_s": seconds,
        "batch_records": batch,
        "step_s": seconds / steps,
        "records_per_s": n_rec / seconds,
        "positions_per_s": (trainer.positions_seen - pos0) / seconds,
        "tokens_per_s": tok_s,
        "draft_params": params,
        "achieved_flops": flops,
        "gpu_tokens_per_s_zoo_draft": GPU_MFU * GPU_FLOPS / (6 * params),  # compute bound only
        "gpu_tokens_per_s_1b_draft": GPU_MFU * GPU_FLOPS / (6 * 1e9),
    }


# ---------------------------------------------------------------------------- 4. weights
def measure_weights(records, target, draft) -> dict:
    from osd.distill.config import DistillConfig
    from osd.drafters import build_drafter, build_student
    from osd.registry import (
        Promoter,
        PromotionGate,
        Registry,
        check_weights,
        checksum,
        spec_of,
        weights_from_bytes,
        weights_to_bytes,
    )

    out = {}
    kinds = {
        "draft (full)": ("draft_model", None, draft, False),
        "draft (LoRA r=8)": ("draft_model", None, draft, True),
        "medusa heads": ("medusa", target, None, False),
        "eagle head": ("eagle", target, None, False),
    }
    holdout = records[:32]
    for name, (drafter_name, tgt, dft, lora) in kinds.items():
        serving = build_drafter(
            drafter_name, tgt, None if dft is None else copy.deepcopy(dft), lenient=True, k=4
        )
        student = build_student(drafter_name, serving)
        base = build_student(
            drafter_name,
            build_drafter(
                drafter_name, tgt, None if dft is None else copy.deepcopy(dft), lenient=True, k=4
            ),
        )
        if lora:
            student.add_lora(DistillConfig(lora=True).lora_spec(0))
        snap = student.export()
        data = weights_to_bytes(snap.weights)
        reference = spec_of(serving.state_dict())
        full = weights_to_bytes(serving.state_dict())

        def adopt(full=full, reference=reference, serving=serving):
            checksum(full)
            w = weights_from_bytes(full)
            check_weights(w, reference, "capacity")
            serving.load_state_dict(w, 1)

        promoter = Promoter(Registry(), "draft", base, PromotionGate(margin=0.5))
        gate_times = []
        for _ in range(3):
            t = cpu_clock()
            promoter.submit(data, snap.kind, {"trainer": "capacity"}, holdout, snap.lora)
            gate_times.append(cpu_clock() - t)
        out[name] = {
            "version_bytes": len(data),
            "served_bytes": len(full),  # what a replica fetches (a LoRA version merged)
            "serialise_sha256_s": timed(lambda data=snap.weights: checksum(weights_to_bytes(data))),
            "gate_s": statistics.median(gate_times),
            "adopt_s": timed(adopt),
        }
    return out


# ------------------------------------------------------------------ 4b. registry polls
def measure_poll(seconds: float = 10.0, callers: int = 4) -> dict:
    """The real registry actor (local Ray, the embedded Redis as its store) answering the
    replicas' version poll: polls/s it served from ``callers`` concurrent pollers, and its
    CPU seconds per poll (what bounds N / poll_s on one registry)."""
    import secrets

    import ray
    from osd.actors.config import ClusterConfig, runtime_env
    from osd.actors.registry_actor import RegistryActor

    from osd.buffer import EmbeddedRedis

    with EmbeddedRedis(password=secrets.token_urlsafe(8)) as srv:
        ray.init(num_cpus=4, include_dashboard=False, runtime_env=runtime_env(),
                 logging_level="warning", log_to_driver=False)  # fmt: skip
        try:
            cfg = ClusterConfig.from_dict({"buffer": {"url": srv.url}, "trainer": {"count": 0}})
            reg = ray.remote(RegistryActor).options(max_concurrency=8).remote(cfg.to_dict())
            ref = ray.get(reg.poll.remote("draft", None))
            ref = {k: ref[k] for k in ("epoch", "version", "checksum")}

            @ray.remote(num_cpus=0)
            def poller(n_s: float) -> int:
                n, end = 0, time.monotonic() + n_s
                while time.monotonic() < end:
                    ray.get(reg.poll.remote("draft", ref))
                    n += 1
                return n

            def actor_cpu() -> float:
                return ray.get(reg.__ray_call__.remote(lambda self: time.process_time()))

            cpu0 = actor_cpu()
            polls = sum(ray.get([poller.remote(seconds) for _ in range(callers)]))
            cpu = actor_cpu() - cpu0
        finally:
            ray.shutdown()
    return {
        "callers": callers,
        "polls_per_s_served": polls / seconds,
        "actor_cpu_s_per_poll": cpu / polls,
        "polls_per_cpu_s": polls / cpu,
    }


# ---------------------------------------------------------------- 5. model vs simulation
def scenarios(redis: dict, trainer: dict, weights: dict, poll: dict | None, step_s: float) -> dict:
    """The cases the model and the simulation are compared on. CPU trainers: the zoo draft
    as measured; GPU trainers: a 1B-parameter draft on records of REAL_RECORD_TOKENS
    tokens at the predicted GPU token rate (an extrapolation)."""
    ev = redis["everysec"]
    c = (1e-6 * ev["redis_cpu_us_per_xadd"], 1e-6 * ev["redis_cpu_us_per_read_ack"])
    cpu = trainer["step_s"]
    gpu = trainer["batch_records"] * REAL_RECORD_TOKENS / trainer["gpu_tokens_per_s_1b_draft"]
    cases = [  # name, replicas N, shards S, trainers T, records/s per replica r, step
        ("64 replicas, 1 shard, 8 CPU trainers", 64, 1, 8, 2.0, cpu),
        ("1024 replicas, 1 shard, 8 CPU trainers", 1024, 1, 8, 2.0, cpu),
        ("1024 replicas, 1 shard, 64 GPU trainers", 1024, 1, 64, 2.0, gpu),
        ("4096 replicas, 1 shard, 64 GPU trainers, log rate 0.1", 4096, 1, 64, 0.2, gpu),
        ("4096 replicas, 4 shards, 320 GPU trainers", 4096, 4, 320, 2.0, gpu),
        ("16384 replicas, 1 shard, 1280 GPU trainers", 16384, 1, 1280, 2.0, gpu),
        ("16384 replicas, 4 shards, 1280 GPU trainers", 16384, 4, 1280, 2.0, gpu),
    ]
    ingest = [IngestCase(n, N, S, T, r, *c, step) for n, N, S, T, r, step in cases]
    rows = []
    for case in ingest:
        heavy = case.replicas * case.rate / case.shards > 1e4  # events/s: keep it short
        sim = simulate_shard(case, seconds=12 if heavy else None)
        rows.append({"case": case_dict(case), "predicted": predict_ingest(case), "simulated": sim})
    w = weights["draft (full)"]
    lora = weights["draft (LoRA r=8)"]
    sizes = {
        "zoo draft, full": (w["served_bytes"], w["gate_s"], w["adopt_s"]),
        "zoo draft, LoRA as adapter": (lora["version_bytes"], lora["gate_s"], lora["adopt_s"]),
        # extrapolated: the zoo draft's adoption rate (bytes/s) applied to 2 GB; the gate
        # as measured (its cost scales with the draft's forward, not measured at 1B)
        "1B draft bf16 (2 GB)": (2e9, w["gate_s"], 2e9 * w["adopt_s"] / w["served_bytes"]),
        "1B draft, LoRA r=8 adapter (22.5 MB)": (
            LORA_1B_BYTES,
            w["gate_s"],
            2e9 * w["adopt_s"] / w["served_bytes"],
        ),
    }
    # replicas poll one registry actor: keep its load at POLL_UTIL of what one core serves
    per_s = (poll or {}).get("polls_per_cpu_s")
    bcast = []
    for label, (size, gate_s, load_s) in sizes.items():
        for n in (16, 256, 1024, 4096):
            poll_s = max(0.2, n / (POLL_UTIL * per_s)) if per_s else 0.2
            case = BroadcastCase(
                f"{label}, {n} replicas", n, size, LINK_BYTES_PER_S, gate_s, load_s, step_s, poll_s
            )
            bcast.append(
                {
                    "case": case_dict(case),
                    "predicted": predict_broadcast(case),
                    "simulated": simulate_broadcast(case),
                }
            )
    return {"ingest": rows, "broadcast": bcast}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = result["model_vs_simulation"]["ingest"]
    labels = [r["case"]["name"].replace(", ", "\n") for r in rows]
    xs = range(len(rows))
    a.bar(
        [x - 0.2 for x in xs], [r["predicted"]["consumed_per_s"] for r in rows], 0.4, label="model"
    )
    a.bar(
        [x + 0.2 for x in xs],
        [r["simulated"]["consumed_per_s"] for r in rows],
        0.4,
        label="simulation",
    )
    a.plot(xs, [r["predicted"]["offered_per_s"] for r in rows], "k_", ms=20, label="offered")
    a.set(
        yscale="log", ylabel="records/s consumed by trainers", title="ingest: model vs simulation"
    )
    a.set_xticks(list(xs), labels, fontsize=6)
    a.legend(fontsize=8)
    for label in dict.fromkeys(
        r["case"]["name"].rsplit(",", 1)[0] for r in result["model_vs_simulation"]["broadcast"]
    ):
        rs = [
            r
            for r in result["model_vs_simulation"]["broadcast"]
            if r["case"]["name"].startswith(label + ",")
        ]
        ns = [r["case"]["replicas"] for r in rs]
        line = b.plot(ns, [r["predicted"]["lag_last_s"] for r in rs], "-", label=f"{label}: model")[
            0
        ]
        b.plot(
            ns,
            [r["simulated"]["lag_last_s"] for r in rs],
            "o",
            color=line.get_color(),
            label=f"{label}: simulation",
        )
    b.set(
        xscale="log",
        yscale="log",
        xlabel="replicas",
        ylabel="s until the last replica serves it",
        title="broadcast lag of one version (10 GbE registry link)",
    )
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="capacity.json")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--requests", type=int, default=40, help="real requests to make records")
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--no-ray", action="store_true", help="skip the registry-poll measurement")
    ap.add_argument("--reuse", default=None, help="measurements of an earlier --json: rerun "
                    "only the model and the simulation")  # fmt: skip
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = json.loads(Path(args.reuse).read_text()) if args.reuse else measure(args)
    step_s = result["records"]["decode_step_s"]
    mvs = scenarios(
        result["redis"], result["trainer"], result["weights"], result.get("registry_poll"), step_s
    )
    result["model_vs_simulation"] = mvs
    for r in mvs["ingest"]:
        p, sim = r["predicted"], r["simulated"]
        print(f"{r['case']['name']}: consumed model {p['consumed_per_s']:.0f}/s sim "
              f"{sim['consumed_per_s']:.0f}/s; trimmed {p['trimmed']:.2f}/{sim['trimmed']:.2f} "
              f"({p['bound']})")  # fmt: skip
    for r in mvs["broadcast"]:
        print(f"{r['case']['name']} (poll every {r['case']['poll_s']:.1f} s): lag model "
              f"{r['predicted']['lag_last_s']:.2f} s, sim {r['simulated']['lag_last_s']:.2f} s")  # fmt: skip
    result["seconds"] = result.get("seconds", 0.0) + time.perf_counter() - t0
    Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    print(f"wrote {args.json} in {result['seconds']:.0f} s")


def measure(args) -> dict:
    """Steps 1-4 of the module docstring; prints each figure as it lands."""
    records, blobs, rec_stats, (target, draft) = make_records(args.requests, args.max_new)
    print(f"records: {rec_stats['bytes_per_record_mean']:.0f} B each, "
          f"{rec_stats['bytes_per_position']:.1f} B per logged position")  # fmt: skip
    redis = measure_redis(blobs)
    for fsync, r in redis.items():
        print(f"redis ({fsync}): client XADD {r['client_xadd_per_s']:.0f}/s, read+ack "
              f"{r['client_read_ack_per_s']:.0f}/s; server CPU {r['redis_cpu_us_per_xadd']:.1f} + "
              f"{r['redis_cpu_us_per_read_ack']:.1f} us/record -> shard ceiling "
              f"{r['shard_ceiling_records_per_s']:.0f} records/s")  # fmt: skip
    trainer = measure_trainer(records, draft)
    print(f"trainer (1 thread, per CPU second): {trainer['records_per_s']:.1f} records/s, "
          f"{trainer['tokens_per_s']:.0f} tokens/s, {trainer['achieved_flops'] / 1e9:.2f} "
          "GFLOP/s")  # fmt: skip
    weights = measure_weights(records, target, draft)
    for name, w in weights.items():
        print(f"{name}: {w['version_bytes'] / 1e6:.2f} MB a version, gate {w['gate_s']:.2f} s, "
              f"adopt {1e3 * w['adopt_s']:.1f} ms")  # fmt: skip
    poll = None if args.no_ray else measure_poll()
    if poll:
        print(f"registry poll: {poll['polls_per_s_served']:.0f}/s served, "
              f"{1e6 * poll['actor_cpu_s_per_poll']:.0f} us actor CPU each")  # fmt: skip
    return {
        "records": rec_stats,
        "redis": redis,
        "trainer": trainer,
        "weights": weights,
        "registry_poll": poll,
        "assumptions": {
            "link_bytes_per_s": LINK_BYTES_PER_S,
            "gpu_flops": GPU_FLOPS,
            "gpu_mfu": GPU_MFU,
            "real_record_tokens": REAL_RECORD_TOKENS,
        },
        "cpu_count": os.cpu_count(),
    }


if __name__ == "__main__":
    main()
