"""The capacity model of docs/capacity.md and a discrete-event simulation that checks it.

Two parts of the online loop decide whether it scales to thousands of replicas:

- **ingest** — N replicas each finish ``r`` logged requests/s; each record is one XADD to
  one of S Redis shards (stream per shard; a replica writes to shard ``i mod S``); T trainers
  (T/S per shard, one consumer group) read batches of up to B records, step, ack. Per shard
  the offered rate is λ_s = N·r/S, the shard's ceiling is 1/c (c: Redis CPU seconds per
  record written, read and acked), the trainers' is (T/S)·μ (μ: records/s of one trainer).
  Predicted: consumed X_s = min(λ_s, 1/c, (T/S)·μ); when trainers are the bound the
  stream stays full (MAXLEN) and XADD trims what no trainer read: the **trimmed** fraction
  is 1 − X_s/λ_s and a consumed record is ``maxlen/λ_s`` seconds old. c = c_write + c_read
  (XADD; XREADGROUP + XACK per record, batched).
- **broadcast** — after the gate (t_gate) promotes a version of S_w bytes, every replica
  learns of it at its next poll (every ``poll_s``, random phase), fetches it from the
  registry (one link of B_w bytes/s: fetches queue), validates and loads it (t_load) and
  adopts it at its next step boundary (t_step). Predicted lag to the last replica:
  t_gate + max(poll_s, N·S_w/B_w) + S_w/B_w + t_load + t_step.

The shards are symmetric, so :func:`simulate_shard` simulates one shard (its N/S
replicas — their merged Poisson arrivals — and its T/S trainers) exactly; the others are
copies. Pure Python (heapq), seeded.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import asdict, dataclass

__all__ = [
    "BroadcastCase",
    "IngestCase",
    "predict_broadcast",
    "predict_ingest",
    "simulate_broadcast",
    "simulate_shard",
]


@dataclass(frozen=True)
class IngestCase:
    """One shard's worth of the ingest path (rates per second, times in seconds)."""

    name: str
    replicas: int  # N (all shards)
    shards: int  # S
    trainers: int  # T (all shards), a multiple of S
    rate: float  # r: logged records per replica per second
    write_s: float  # Redis CPU per XADD of one record
    read_s: float  # Redis CPU per record read and acked (XREADGROUP + XACK, batched)
    step_s: float  # one trainer step on a full batch
    batch: int = 8  # B records per step
    maxlen: int = 10_000  # stream bound (XADD MAXLEN ~)
    idle_s: float = 0.05  # a trainer that found the stream empty sleeps this long
    sink_queue: int = 1024  # records a replica's sink holds while Redis is slow, then drops

    @property
    def trainer_rate(self) -> float:  # μ: records/s of one busy trainer
        return self.batch / self.step_s


def predict_ingest(case: IngestCase) -> dict[str, float | str | None]:
    """The closed-form model above, per shard and in total."""
    lam = case.replicas * case.rate / case.shards  # λ_s
    trainers = case.trainers / case.shards * case.trainer_rate
    redis = 1 / (case.write_s + case.read_s)  # every record written is read and acked
    x = min(lam, redis, trainers)
    bound = "offered load" if x == lam else "trainers" if trainers <= redis else "redis"
    if bound == "redis":  # Redis full: what the sinks cannot write is dropped there
        util, trimmed, age = 1.0, 0.0, None
    else:
        util = lam * case.write_s + x * case.read_s
        trimmed = 1 - x / lam
        age = case.maxlen / lam if bound == "trainers" else None
    return {
        "offered_per_s": lam * case.shards,
        "consumed_per_s": x * case.shards,
        "trimmed": trimmed,
        "unwritten": 1 - x / lam if bound == "redis" else 0.0,
        "bound": bound,
        "redis_util": util,
        "age_s": age,
    }


def simulate_shard(
    case: IngestCase, seconds: float | None = None, seed: int = 0
) -> dict[str, float]:
    """One shard: Poisson arrivals (its replicas merged) served FIFO by a single-threaded
    Redis, a bounded stream trimmed from the old end, and T/S trainers that read up to B,
    step, read again; a write that would wait longer than the replicas' sink queues can
    hold is dropped there (a sink has one write in flight: Redis queues at most one write
    per replica, so a trainer's read waits behind at most that many). The first third is warm-up; ``seconds=None`` makes the
    warm-up long enough to fill the stream when trainers fall behind (steady state)."""
    rng = random.Random(seed)
    lam = case.replicas * case.rate / case.shards
    if seconds is None:
        surplus = lam - case.trainers / case.shards * case.trainer_rate
        seconds = 3 * max(10.0, 2 * case.maxlen / surplus if surplus > 0 else 0.0)
    n_trainers = max(1, case.trainers // case.shards)
    writers = max(1, case.replicas // case.shards)  # each sink has one write in flight
    cap = writers * case.sink_queue  # records the sinks can hold while Redis is slow
    stream: deque[float] = deque()  # stored times of unread entries (oldest left)
    events: list[tuple[float, int, str, int]] = []  # (time, seq, kind, trainer)
    seq = 0

    def push(t: float, kind: str, who: int = -1) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, who))

    redis_free, busy, warm = 0.0, 0.0, seconds / 3  # when the Redis thread is next idle
    in_flight = backlog = 0
    offered = stored = trimmed = dropped = consumed = 0
    ages: list[float] = []

    def write(t: float, counted: bool) -> None:
        nonlocal redis_free, busy, in_flight
        in_flight += 1
        redis_free = max(t, redis_free) + case.write_s
        busy += case.write_s * counted
        push(redis_free, "stored")

    push(rng.expovariate(lam), "arrive")
    for i in range(n_trainers):
        push(rng.uniform(0, case.idle_s), "read", i)
    while events:
        t, _, kind, who = heapq.heappop(events)
        if t > seconds:
            break
        counted = t >= warm
        if kind == "arrive":
            push(t + rng.expovariate(lam), "arrive")
            offered += counted
            if in_flight < writers:
                write(t, counted)
            elif backlog < cap:
                backlog += 1
            else:
                dropped += counted
        elif kind == "stored":
            in_flight -= 1
            stream.append(t)
            stored += counted
            if len(stream) > case.maxlen:
                stream.popleft()
                trimmed += counted
            if backlog:
                backlog -= 1
                write(t, counted)
        else:  # a trainer reads (the reply waits for the writes queued before it)
            start = max(t, redis_free)
            got = [stream.popleft() for _ in range(min(case.batch, len(stream)))]
            if not got:
                push(start + case.idle_s, "read", who)
                continue
            redis_free = start + case.read_s * len(got)
            busy += case.read_s * len(got) * counted
            if counted:
                consumed += len(got)
                ages += [start - w for w in got]
            push(redis_free + case.step_s * len(got) / case.batch, "read", who)
    span = seconds - warm
    ages.sort()
    return {
        "offered_per_s": offered / span * case.shards,
        "consumed_per_s": consumed / span * case.shards,
        "trimmed": trimmed / max(offered, 1),
        # offered but not written: waiting in the replicas' sinks, or dropped there
        "unwritten": max(0.0, 1 - stored / max(offered, 1)),
        "redis_util": min(1.0, busy / span),
        "age_s": ages[len(ages) // 2] if ages else None,
    }


@dataclass(frozen=True)
class BroadcastCase:
    """One promoted version reaching every replica."""

    name: str
    replicas: int  # N
    weight_bytes: int  # S_w
    link_bytes_per_s: float  # B_w: the registry's egress
    gate_s: float  # t_gate: validate + store + gate evaluation
    load_s: float  # t_load: checksum + deserialise + validate + load_state_dict
    step_s: float  # t_step: one decode step (adoption waits for its end)
    poll_s: float = 0.2


def predict_broadcast(case: BroadcastCase) -> dict[str, float]:
    xfer = case.weight_bytes / case.link_bytes_per_s
    spread = max(case.poll_s, case.replicas * xfer)
    return {
        "lag_last_s": case.gate_s + spread + xfer + case.load_s + case.step_s,
        "registry_egress_bytes": case.replicas * case.weight_bytes,
    }


def simulate_broadcast(case: BroadcastCase, seed: int = 0) -> dict[str, float]:
    """Replicas poll at random phases; each fetch holds the registry's link for S_w/B_w
    (FIFO); then load and wait for the running decode step to end."""
    rng = random.Random(seed)
    xfer = case.weight_bytes / case.link_bytes_per_s
    promoted = case.gate_s  # the publish arrives at t = 0
    polls = sorted(  # each replica's first poll at or after the promotion
        promoted + (rng.uniform(0, case.poll_s)) for _ in range(case.replicas)
    )
    link_free, lags = 0.0, []
    for t in polls:
        start = max(t, link_free)
        link_free = start + xfer
        adopted = link_free + case.load_s + rng.uniform(0, case.step_s)
        lags.append(adopted)
    lags.sort()
    return {
        "lag_p50_s": lags[len(lags) // 2],
        "lag_last_s": lags[-1],
        "registry_egress_bytes": case.replicas * case.weight_bytes,
    }


def compare(predicted: dict, simulated: dict, key: str) -> float | None:
    """simulated / predicted for one figure (None when either is missing or zero)."""
    p, s = predicted.get(key), simulated.get(key)
    if p is None or s is None or p == 0 or (isinstance(p, float) and math.isnan(p)):
        return None
    return s / p


def case_dict(case) -> dict:
    return asdict(case)
