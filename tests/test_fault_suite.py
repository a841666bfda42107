"""Fault suite, the Redis parts (issue 13, point 6): a real redis-server killed three times
mid-replay and a hung one (SIGSTOP), under a real record sink, trainer and serving loop.
The emptied-store / restarted-registry case is in tests/test_registry_faults.py."""

import os
import signal
import threading
import time

import numpy as np
import pytest
import redis
import torch
from osd.actors.record_sink import RecordSink
from transformers import LlamaConfig, LlamaForCausalLM

from osd.buffer import EmbeddedRedis, RedisStreamBuffer
from osd.buffer.base import Outage
from osd.distill.collect import RecordCollector
from osd.distill.config import DistillConfig
from osd.distill.record import LogConfig, build_record
from osd.distill.student import CausalLMStudent
from osd.distill.trainer import OnlineDistiller
from osd.drafters.draft_model import DraftModelDrafter
from osd.models import load_model, load_tokenizer
from osd.serving import ServeRequest, ServingLoop
from osd.specdec.engine import SpeculativeDecoder

pytestmark = pytest.mark.integration

D = "draft"
V = 32


def wait_for(cond, timeout_s=20.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out: {what() if callable(what) else what}"
        time.sleep(0.02)


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


class Spy(RedisStreamBuffer):
    """The trainer's buffer, remembering what was delivered and what was acked."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.acked: set[str] = set()
        self.after_ack: list[str] = []  # delivered again after their ack: must stay empty

    def read(self, drafter_id, count, block_ms=0):
        out = super().read(drafter_id, count, block_ms)
        self.after_ack += [e.id for e in out if e.id in self.acked]
        return out

    def ack(self, drafter_id, ids):
        n = super().ack(drafter_id, ids)
        self.acked |= set(ids)
        return n


def consumed(buf: RedisStreamBuffer) -> bool:
    """Every entry of the stream delivered to the trainers' group and acked (server side)."""
    key = buf.key(D)
    info = buf.client.xinfo_stream(key)
    groups = {g["name"]: g for g in buf.client.xinfo_groups(key)}
    group = groups.get(buf.group.encode()) or groups.get(buf.group)
    return (
        bool(group)
        and group["pending"] == 0
        and (group["last-delivered-id"] == info["last-generated-id"])
    )


def trainer_thread(dist: OnlineDistiller, stop: threading.Event) -> threading.Thread:
    """What TrainerActor._loop does: train, and wait out a Redis outage (one log line)."""
    outage = Outage("test trainer: Redis", __import__("logging").getLogger("test"))

    def loop():
        while not stop.is_set():
            try:
                dist.run(until=stop.is_set, idle_sleep_s=0.02)
            except redis.RedisError as err:
                outage.failed(err)
                time.sleep(0.1)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_redis_killed_three_times_mid_replay_loses_no_acked_record():
    target = tiny_llama(0)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (96, 12), generator=gen)
    with torch.no_grad():
        logits = target(tokens).logits
    pos = np.arange(4, 12)
    records = [
        build_record(f"r{i}", tokens[i], 4, pos, logits[i, pos - 1], k=8, drafter_id=D, version=0)
        for i in range(96)
    ]
    with EmbeddedRedis(max_backoff_s=0.2) as srv:
        sink = RecordSink(RedisStreamBuffer(srv.url, socket_timeout=1.0), D, holdout_every=10**6)
        buf = Spy(srv.url, consumer="t0", socket_timeout=1.0)
        dist = OnlineDistiller(CausalLMStudent(tiny_llama(2)), buf, D, DistillConfig(lr=1e-2))
        stop = threading.Event()
        thread = trainer_thread(dist, stop)
        try:
            for round_ in range(4):
                for rec in records[24 * round_ : 24 * (round_ + 1)]:
                    sink.submit(rec)
                steps = dist.steps
                wait_for(lambda s=steps: dist.steps > s + 1, what="training to resume")
                if round_ < 3:
                    pid = srv.pid
                    os.kill(pid, signal.SIGKILL)
                    wait_for(lambda p=pid: srv.pid != p and not srv.outage.down, what="restart")
                    assert srv.restarts == round_ + 1
            wait_for(lambda: sink.written == 96 and consumed(buf),
                     what=lambda: f"all trained on: written {sink.written}, pending "
                     f"{buf.pending_count(D)}, acked {len(buf.acked)}, len {buf.length(D)}, "
                     f"steps {dist.steps}")  # fmt: skip
        finally:
            stop.set()
            thread.join(10)
            sink.close()
        assert sink.dropped == 0  # none lost on the way in (a write whose reply was lost
        stream = [buf.key(D)]  # may have landed twice: at-least-once)
        got = {e.data for e in RedisStreamBuffer(srv.url, consumer="audit", group="audit")
               .read(D, 200)}  # fmt: skip
        assert buf.length(D) >= 96 and len(got) == 96 and stream
        assert buf.after_ack == []  # an acked record is never served again (AOF kept acks)
        assert dist.steps >= 11  # ~96 / 8 batches: learning went on after each kill


@pytest.fixture(scope="module")
def zoo_loop():
    target, draft = load_model("zoo:target", "cpu"), load_model("zoo:draft", "cpu")
    tok = load_tokenizer("zoo:target")
    dec = SpeculativeDecoder(target, DraftModelDrafter(draft, k=4), tok)
    records: list = []
    loop = ServingLoop(dec, collector=RecordCollector(LogConfig(mode="all")),
                       on_record=lambda r: records[-1](r) if records else None).start()  # fmt: skip
    yield loop, tok, records
    loop.stop(timeout_s=10)


def serve_batch(loop: ServingLoop, tok, n: int, tag: str) -> float:
    """Submit ``n`` requests, wait for all; the slowest latency in seconds."""
    done, errors, latencies = threading.Event(), [], []
    ids = tok("The quick brown fox", add_special_tokens=False).input_ids

    def on_event(delta):
        if delta.error is not None:
            errors.append(delta.error)
        if delta.final:
            latencies.append(delta.result.latency_s if delta.result else float("inf"))
            if len(latencies) == n:
                done.set()

    for i in range(n):
        loop.submit(ServeRequest(f"{tag}-{i}", ids, 16), on_event)
    assert done.wait(60) and not errors
    return max(latencies)


def test_hung_redis_leaves_serving_unaffected_and_records_arrive_after(zoo_loop):
    loop, tok, hook = zoo_loop
    with EmbeddedRedis() as srv:
        sink = RecordSink(RedisStreamBuffer(srv.url, socket_timeout=0.5), D, holdout_every=10**6)
        hook.append(sink.submit)
        baseline = serve_batch(loop, tok, 4, "before")
        wait_for(lambda: sink.written == 4, what="records before the hang")
        os.kill(srv.pid, signal.SIGSTOP)
        try:
            hung = serve_batch(loop, tok, 8, "hung")
            assert hung < 5 * baseline + 2.0  # the sink never blocks the loop
            time.sleep(1.0)
            assert sink.written == 4 and sink.outage.down and srv.restarts == 0
        finally:
            os.kill(srv.pid, signal.SIGCONT)
        wait_for(lambda: sink.written >= 12, what="queued records delivered after SIGCONT")
        hook.clear()
        sink.close()
        assert sink.dropped == 0 and not sink.outage.down
        buf = RedisStreamBuffer(srv.url)
        ids = {e.data for e in buf.read(D, 100)}
        assert buf.length(D) >= 12 and len(ids) >= 12  # a timed-out write may land twice
