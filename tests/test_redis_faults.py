"""The embedded Redis persists and is supervised; clients time out; the record sink delivers
what it queued while Redis was away (issue 13, points 2 and 6). Seconds each."""

import logging
import os
import signal
import time

import pytest
import redis
import torch
from osd.actors.record_sink import RecordSink

from osd.buffer import EmbeddedRedis, MemoryBuffer, RedisStreamBuffer
from osd.buffer.redis_stream import CLIENT_TIMEOUTS
from osd.distill.record import build_record, decode

pytestmark = pytest.mark.integration

D = "draft"


def record(i: int):
    logits = torch.log_softmax(torch.randn(2, 32), -1)
    return build_record(f"r{i}", [1, 2, 3, 4], 2, [2, 3], logits, k=4, drafter_id=D, version=0)


def wait_for(cond, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def restarted(srv: EmbeddedRedis, old_pid: int) -> bool:
    return srv.pid not in (None, old_pid) and not srv.outage.down


def test_data_dir_keeps_streams_groups_and_pending_across_servers(tmp_path):
    with EmbeddedRedis(data_dir=tmp_path) as srv:
        buf = RedisStreamBuffer(srv.url, consumer="A")
        ids = [buf.put(D, f"r{i}".encode()) for i in range(5)]
        got = buf.read(D, 3)
        buf.ack(D, [got[0].id])  # r0 acked; r1, r2 pending; r3, r4 new
        assert srv.aof_path.is_file()
        with pytest.raises(RuntimeError, match="another embedded"):
            EmbeddedRedis(data_dir=tmp_path).start()  # one server per data dir
    with EmbeddedRedis(data_dir=tmp_path) as srv:  # a new server on the same dir
        buf = RedisStreamBuffer(srv.url, consumer="A")
        assert buf.length(D) == 5 and buf.pending_count(D, "A") == 2
        assert [e.id for e in buf.read(D, 10)] == ids[1:]  # own pending first, then new
    assert tmp_path.is_dir()  # a given data dir stays


def test_killed_server_comes_back_with_its_data_one_warning_per_outage(caplog):
    caplog.set_level(logging.INFO, logger="osd.buffer")
    with EmbeddedRedis(max_backoff_s=0.5) as srv:
        buf = RedisStreamBuffer(srv.url, consumer="A")
        for i in range(20):
            buf.put(D, f"r{i}".encode())
        acked = buf.read(D, 5)
        buf.ack(D, [e.id for e in acked])
        for n in range(3):  # killed three times
            pid = srv.pid
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda pid=pid: restarted(srv, pid))
            assert srv.restarts == n + 1
            assert buf.length(D) == 20 and buf.pending_count(D) == 0
        rest = buf.read(D, 100)
        assert [e.data for e in rest] == [f"r{i}".encode() for i in range(5, 20)]  # none redone
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 3  # one per outage, not one per attempt


def test_sink_delivers_what_it_queued_while_redis_was_dead():
    with EmbeddedRedis(supervise=False) as srv:  # stays down until revived
        buf = RedisStreamBuffer(srv.url, consumer="A")
        sink = RecordSink(buf, D, holdout_every=1000, max_backoff_s=0.1)
        sink.submit(record(0))
        wait_for(lambda: sink.written == 1)
        srv.proc.kill()
        srv.proc.wait()
        for i in range(1, 30):
            sink.submit(record(i))
        time.sleep(0.5)
        assert sink.written == 1 and sink.dropped == 0 and sink.outage.down
        srv.revive()  # back on the same socket and data dir
        wait_for(lambda: sink.written == 30)
        sink.close()
        assert sink.dropped == 0 and sink.outage.count == 1 and not sink.outage.down
        got = [decode(e.data).request_id for e in buf.read(D, 100)]
        assert got == [f"r{i}" for i in range(30)]  # all of them, in order


def test_sink_queue_is_bounded_and_counts_what_it_drops():
    class Down(MemoryBuffer):
        def put(self, drafter_id, data):
            raise redis.ConnectionError("down")

    sink = RecordSink(Down(), D, capacity=4, max_backoff_s=0.05)
    sink.submit(record(0))
    wait_for(lambda: sink.backlog == 0)  # the writer holds it (retrying): no start-up race
    for i in range(1, 10):
        sink.submit(record(i))  # 4 queued, the rest dropped
    time.sleep(0.1)
    assert sink.dropped == 5 and sink.backlog == 4
    sink.close(timeout_s=0.2)
    assert sink.dropped + sink.written == 10 and sink.written == 0


def test_hung_redis_times_out_then_recovers():
    assert CLIENT_TIMEOUTS["socket_timeout"] <= 5 and CLIENT_TIMEOUTS["socket_connect_timeout"]
    with EmbeddedRedis() as srv:
        fast = srv.client(socket_timeout=0.3)
        assert fast.ping()
        buf = RedisStreamBuffer(srv.url, consumer="A", socket_timeout=0.3)
        os.kill(srv.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises((redis.TimeoutError, redis.ConnectionError)):
                buf.put(D, b"x")
            assert time.monotonic() - start < 3.0  # bounded by the timeout (and its retries)
            time.sleep(0.3)
            assert srv.restarts == 0  # hung is not dead: not restarted
        finally:
            os.kill(srv.pid, signal.SIGCONT)
        wait_for(lambda: _answers(buf))
        assert buf.length(D) >= 1  # the write that timed out may have landed (at-least-once)


def _answers(buf: RedisStreamBuffer) -> bool:
    try:
        buf.put(D, b"y")
        return True
    except redis.RedisError:
        return False
