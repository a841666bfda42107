"""Is online learning cost-neutral? Serving throughput and p99 latency against the trainer's
compute budget, trainer on and off, at two load levels.

One local OSD topology (``osd serve``'s: a Serve replica, a trainer actor, the registry,
an embedded Redis; ``--config`` for another), then, at each load level (closed-loop
clients), phases of the same requests with the trainer

- ``off``   — paused;
- ``B/s``   — running at most B optimiser steps a second (``distill.max_steps_per_s``),
              for each ``--budgets`` value;
- ``yield``  — no rate cap, and it waits, up to 2 s a step, while the node's other
              processes (the replicas) use more than half its CPUs (``distill.yield_cpu:
              0.5``; :mod:`osd.distill.budget`);
- ``nice 0`` — unthrottled, at the replicas' own priority (``trainer.nice: 0``);
- ``default`` — the default budget: unthrottled (``max_steps_per_s: null``, ``yield_cpu:
              null``) at the lowest priority (``trainer.nice: 19``), so the OS gives the
              trainer only the cycles the replicas leave,

interleaved over ``--rounds`` rounds, each starting one phase later than the one before,
so that drift in the machine's load hits every phase alike. Publishing is off throughout
(the served weights stay fixed, so only the trainer's compute differs). Before the phases the buffer is filled with a backlog of
records, so a running trainer always has work.

    python experiments/cost.py --json cost.json --plot cost.png
    python experiments/cost.py --loads 2,8 --budgets 1,4 --rounds 2 --requests 16 --json c.json --plot c.png

Writes ``{"rows": [{"concurrency", "trainer", "tokens_per_s", "p99_s", "trainer_steps",
"ratio_vs_off", "ratio_per_round", "ratio_median"}, …], "phases": […], "config": {…}}``
(rows averaged over rounds; ``ratio_per_round`` against the same round's trainer-off phase)
and a bar chart of tokens/s and p99 per load level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

SPARE = 0.5  # distill.yield_cpu for a trainer that shares its node with replicas


async def _phases(cluster, reqs, loads, budgets, rounds, max_tokens, only=None) -> list[dict]:
    from osd.actors.replay import ReplayConfig, replay_async, summarize

    trainers = cluster.trainers
    nice = cluster.cfg.trainer.nice  # the default priority
    await asyncio.gather(*(t.set_publishing.remote(False) for t in trainers))
    out = []
    try:
        for conc in loads:
            rcfg = ReplayConfig(
                url=cluster.url,
                model=cluster.cfg.model_name,
                max_tokens=max_tokens,
                concurrency=conc,
                api_key=next(iter(cluster.cfg.serve.keys), None),
            )
            # (label, steps/s cap, yield_cpu, nice); the caps run at the default priority
            phases = [("off", None, None, nice)]
            phases += [(lb, b, None, nice) for lb, b in budgets]
            phases += [("yield", None, SPARE, 0), ("nice 0", None, None, 0)]
            phases += [("default", None, None, nice)]
            phases = [ph for ph in phases if only is None or ph[0] in only]
            # each round starts one phase later: drift in the machine's speed falls on
            # every phase alike
            for r in range(rounds):
                order = phases[r % len(phases) :] + phases[: r % len(phases)]
                for label, budget, share, prio in order:
                    if label == "off":
                        await asyncio.gather(*(t.pause.remote() for t in trainers))
                    else:
                        await asyncio.gather(*(t.set_nice.remote(prio) for t in trainers))
                        await asyncio.gather(*(t.set_budget.remote(budget) for t in trainers))
                        await asyncio.gather(*(t.set_yield.remote(share) for t in trainers))
                        await asyncio.gather(*(t.resume.remote() for t in trainers))
                    before = await asyncio.gather(*(t.stats.remote() for t in trainers))
                    s = summarize(await replay_async(reqs, rcfg))
                    after = await asyncio.gather(*(t.stats.remote() for t in trainers))
                    pairs = list(zip(after, before, strict=True))
                    steps = sum(a["steps"] - b["steps"] for a, b in pairs)
                    yielded = sum(a["yielded_s"] - b["yielded_s"] for a, b in pairs)
                    row = {
                        "concurrency": conc,
                        "round": r,
                        "trainer": label,
                        "tokens_per_s": s["tokens_per_s"],
                        "p99_s": s["latency_p99_s"],
                        "failed": s["failed"],
                        "trainer_steps": steps,
                        "trainer_steps_per_s": steps / s["wall_s"] if s["wall_s"] else 0.0,
                        "trainer_yielded_s": yielded,  # waited for spare compute
                    }
                    out.append(row)
                    print(
                        f"  c={conc} round {r} trainer {label:>7}: {row['tokens_per_s']:6.1f} tok/s, "
                        f"p99 {row['p99_s']:.2f} s, {steps} steps",
                        flush=True,
                    )
    finally:
        await asyncio.gather(*(t.set_budget.remote(None) for t in trainers))
        await asyncio.gather(*(t.set_yield.remote(None) for t in trainers))
        await asyncio.gather(*(t.set_nice.remote(nice) for t in trainers))
        await asyncio.gather(*(t.resume.remote() for t in trainers))
        await asyncio.gather(*(t.set_publishing.remote(True) for t in trainers))
    return out


def _rows(phases: list[dict]) -> list[dict]:
    """Mean over rounds per (load, trainer), with the ratio to the trainer-off phases."""
    rows = []
    for conc in dict.fromkeys(p["concurrency"] for p in phases):
        at = [p for p in phases if p["concurrency"] == conc]
        off = None
        for label in dict.fromkeys(p["trainer"] for p in at):
            ps = [p for p in at if p["trainer"] == label]
            tps = sum(p["tokens_per_s"] for p in ps) / len(ps)
            off = tps if label == "off" else off
            per_round = [  # against the trainer-off phase of the same round
                p["tokens_per_s"] / o["tokens_per_s"]
                for p in ps
                for o in at
                if o["trainer"] == "off" and o["round"] == p["round"] and o["tokens_per_s"]
            ]
            rows.append(
                {
                    "concurrency": conc,
                    "trainer": label,
                    "tokens_per_s": tps,
                    "tokens_per_s_rounds": [p["tokens_per_s"] for p in ps],
                    "p99_s": max(p["p99_s"] or 0.0 for p in ps),
                    "trainer_steps": sum(p["trainer_steps"] for p in ps),
                    "trainer_steps_per_s": sum(p["trainer_steps_per_s"] for p in ps) / len(ps),
                    "failed": sum(p["failed"] for p in ps),
                    "ratio_vs_off": tps / off if off else None,
                    "ratio_per_round": per_round,
                    "ratio_median": statistics.median(per_round) if per_round else None,
                }
            )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = list(dict.fromkeys(r["concurrency"] for r in rows))
    labels = list(dict.fromkeys(r["trainer"] for r in rows))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(loads))]
        by = {r["concurrency"]: r for r in rows if r["trainer"] == label}
        mean = [by[c]["tokens_per_s"] for c in loads]
        spread = [  # the rounds' lowest and highest, around the mean
            [m - min(by[c]["tokens_per_s_rounds"]) for m, c in zip(mean, loads, strict=True)],
            [max(by[c]["tokens_per_s_rounds"]) - m for m, c in zip(mean, loads, strict=True)],
        ]
        a1.bar(xs, mean, width, yerr=spread, capsize=2, label=f"trainer {label}")
        a2.bar(xs, [by[c]["p99_s"] for c in loads], width, label=f"trainer {label}")
    for ax, what in ((a1, "tokens/s"), (a2, "p99 latency (s)")):
        ax.set_xticks(range(len(loads)), [f"{c} clients" for c in loads])
        ax.set_ylabel(what)
    a1.legend(fontsize=8)
    a1.set_title("serving throughput vs the trainer's budget (bars: rounds' range)", fontsize=10)
    a2.set_title("tail latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=None, help="topology YAML (osd serve's)")
    ap.add_argument("--loads", default="2,8", help="closed-loop clients per level")
    ap.add_argument("--budgets", default="2", help="trainer steps/s caps between off and max")
    ap.add_argument(
        "--phases",
        default=None,
        help="only these settings, comma-separated (off is always run; e.g. 'off,2/s,default')",
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=16, help="requests per phase")
    ap.add_argument("--backlog", type=int, default=48, help="requests served first (records)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--domain", default="sql")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--plot", type=Path, required=True)
    args = ap.parse_args()
    from osd.actors.cluster import launch
    from osd.actors.config import load_config
    from osd.actors.replay import ReplayConfig, replay

    from osd.workloads.schedule import parse_schedule

    loads = [int(x) for x in args.loads.split(",")]
    budgets = [(f"{float(b):g}/s", float(b)) for b in args.budgets.split(",") if b]
    only = None
    if args.phases:
        only = {"off", *(x.strip() for x in args.phases.split(","))}
        known = {"off", "yield", "nice 0", "default", *(lb for lb, _ in budgets)}
        if only - known:
            ap.error(f"--phases: unknown {sorted(only - known)}; known: {sorted(known)}")
    cfg = load_config(args.config)
    if cfg.trainer.count < 1:
        ap.error("the topology has no trainer (trainer.count: 0); nothing to measure")
    sched = parse_schedule(args.domain, args.backlog + args.requests, seed=0)
    reqs = sched.build(data_dir=args.data_dir)
    backlog, phase_reqs = reqs[: args.backlog], reqs[args.backlog :]
    t0 = time.perf_counter()
    cluster = launch(cfg)
    try:
        print(f"up in {time.perf_counter() - t0:.0f} s; serving a backlog of {len(backlog)} …")
        for t in cluster.trainers:
            t.pause.remote()
        key = next(iter(cfg.serve.keys), None)
        replay(
            backlog,
            ReplayConfig(
                url=cluster.url,
                model=cfg.model_name,
                concurrency=4,
                max_tokens=args.max_tokens,
                api_key=key,
            ),
        )
        phases = asyncio.run(
            _phases(cluster, phase_reqs, loads, budgets, args.rounds, args.max_tokens, only)
        )
    finally:
        cluster.shutdown()
    rows = _rows(phases)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    doc = {"rows": rows, "phases": phases, "config": config}
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    plot(rows, args.plot)
    for r in rows:
        ratio = "–" if r["ratio_vs_off"] is None else f"{r['ratio_vs_off']:.3f}×"
        med = "–" if r["ratio_median"] is None else f"{r['ratio_median']:.3f}×"
        print(
            f"c={r['concurrency']:>3} trainer {r['trainer']:>7}: {r['tokens_per_s']:6.1f} tok/s "
            f"({ratio} of off; median of the rounds' ratios {med}), p99 {r['p99_s']:.2f} s, "
            f"{r['trainer_steps_per_s']:.2f} steps/s"
        )
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
