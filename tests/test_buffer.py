"""Tests for osd.buffer: both backends share one suite; the Redis one runs a real server."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from osd.buffer import EmbeddedRedis, Entry, MemoryBuffer, RedisStreamBuffer, connect

DRAFTER = "draft-a"


@dataclass
class Setup:
    """A buffer factory and a way to let idle time pass for it."""

    make: Callable[..., MemoryBuffer | RedisStreamBuffer]  # (consumer=..., maxlen=...)
    advance: Callable[[float], None]  # seconds


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as srv:
        yield srv


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
def setup(request) -> Iterator[Setup]:
    if request.param == "memory":
        now = [0.0]
        first = MemoryBuffer(consumer="seed", clock=lambda: now[0])

        def make_memory(consumer: str, maxlen: int = 1000) -> MemoryBuffer:
            buf = first.for_consumer(consumer)
            buf.maxlen = maxlen
            return buf

        yield Setup(make_memory, lambda s: now.__setitem__(0, now[0] + s))
        return
    srv: EmbeddedRedis = request.getfixturevalue("server")
    client = srv.client()
    client.flushall()
    prefix = f"test:{request.node.name}:"

    def make_redis(consumer: str, maxlen: int = 1000) -> RedisStreamBuffer:
        return RedisStreamBuffer(client, prefix, maxlen=maxlen, consumer=consumer)

    yield Setup(make_redis, time.sleep)
    client.close()


def ids(entries) -> list[str]:
    return [e.id for e in entries]


def test_put_read_ack(setup):
    buf = setup.make("A")
    assert buf.length(DRAFTER) == 0 and buf.read(DRAFTER, 10) == []
    put = [buf.put(DRAFTER, b"rec%d" % i) for i in range(3)]
    got = buf.read(DRAFTER, 10)
    assert ids(got) == put and [e.data for e in got] == [b"rec0", b"rec1", b"rec2"]
    assert buf.pending_count(DRAFTER) == 3 and buf.pending_count(DRAFTER, "A") == 3
    assert buf.ack(DRAFTER, put[:2]) == 2
    assert buf.ack(DRAFTER, []) == 0
    assert buf.pending_count(DRAFTER) == 1
    assert buf.length(DRAFTER) == 3  # acking does not delete: MAXLEN bounds the stream
    assert buf.read("other-drafter", 10) == []  # one stream per drafter id


def test_read_serves_own_pending_first_then_new(setup):
    buf = setup.make("A")
    put = [buf.put(DRAFTER, b"%d" % i) for i in range(6)]
    first = buf.read(DRAFTER, 2)
    assert ids(first) == put[:2]
    again = buf.read(DRAFTER, 3)  # not acked: served again (retry), then one new
    assert ids(again) == put[:3]
    buf.ack(DRAFTER, ids(again))
    assert ids(buf.read(DRAFTER, 10)) == put[3:]
    other = setup.make("B")
    assert other.read(DRAFTER, 10) == []  # B never sees A's pending entries via read


def test_read_blocks_for_new_entries_only_when_asked(setup):
    buf = setup.make("A")
    t0 = time.monotonic()
    assert buf.read(DRAFTER, 5, block_ms=0) == []
    assert buf.read(DRAFTER, 5, block_ms=50) == []
    assert 0.04 < time.monotonic() - t0 < 2.0


def test_at_least_once_when_a_consumer_dies_mid_batch(setup):
    a, b = setup.make("A"), setup.make("B")
    put = [a.put(DRAFTER, b"r%d" % i) for i in range(8)]
    held = a.read(DRAFTER, 5)  # A takes a batch and dies before its optimiser step
    assert ids(held) == put[:5]
    assert b.reclaim(DRAFTER, min_idle_ms=60_000, count=10) == []  # not idle long enough
    setup.advance(0.15)
    claimed = b.reclaim(DRAFTER, min_idle_ms=100, count=10)
    assert ids(claimed) == ids(held) and [e.data for e in claimed] == [e.data for e in held]
    assert b.pending_count(DRAFTER, "B") == 5 and b.pending_count(DRAFTER, "A") == 0
    assert b.ack(DRAFTER, ids(claimed)) == 5
    rest = b.read(DRAFTER, 10)
    assert ids(rest) == put[5:]
    b.ack(DRAFTER, ids(rest))
    # nothing lost, nothing twice: every id delivered and acked exactly once after acks
    assert sorted(ids(claimed) + ids(rest)) == sorted(put)
    assert a.read(DRAFTER, 10) == [] and b.read(DRAFTER, 10) == []
    assert a.pending_count(DRAFTER) == 0
    setup.advance(0.15)
    assert b.reclaim(DRAFTER, min_idle_ms=100, count=10) == []


def test_reclaim_respects_count(setup):
    a, b = setup.make("A"), setup.make("B")
    put = [a.put(DRAFTER, b"r%d" % i) for i in range(7)]
    a.read(DRAFTER, 7)
    setup.advance(0.15)
    first = b.reclaim(DRAFTER, min_idle_ms=100, count=4)
    second = b.reclaim(DRAFTER, min_idle_ms=100, count=4)  # B's own are fresh now
    setup.advance(0.15)
    third = b.reclaim(DRAFTER, min_idle_ms=100, count=10)
    assert ids(first) == put[:4] and ids(second) == put[4:] and ids(third) == put


def test_maxlen_bounds_the_stream(setup):
    buf = setup.make("A", maxlen=1000)
    for i in range(5000):
        buf.put(DRAFTER, b"%d" % i)
    n = buf.length(DRAFTER)
    if isinstance(buf, MemoryBuffer):
        assert n == 1000
    else:  # MAXLEN ~ trims whole radix-tree nodes (100 entries by default)
        assert 1000 <= n <= 1000 + 200
    newest = buf.read(DRAFTER, n)
    assert newest[-1].data == b"4999"


def test_entries_trimmed_while_pending_are_dropped_not_served(setup):
    a, b = setup.make("A", maxlen=100), setup.make("B", maxlen=100)
    put = [a.put(DRAFTER, b"old%d" % i) for i in range(5)]
    assert ids(a.read(DRAFTER, 5)) == put
    for _ in range(1000):  # trims the held entries away
        a.put(DRAFTER, b"new")
    setup.advance(0.15)
    assert b.reclaim(DRAFTER, min_idle_ms=100, count=5) == []
    assert b.pending_count(DRAFTER) == 0


def test_put_rejects_non_bytes(setup):
    buf = setup.make("A")
    with pytest.raises(TypeError, match="bytes"):
        buf.put(DRAFTER, "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="drafter_id"):
        buf.put("", b"x")


def test_memory_clock_drives_idle_time():
    now = [100.0]
    a = MemoryBuffer(consumer="A", clock=lambda: now[0])
    a.put(DRAFTER, b"x")
    a.read(DRAFTER, 1)
    now[0] += 0.999
    assert a.for_consumer("B").reclaim(DRAFTER, 1000, 1) == []
    now[0] += 0.001
    assert len(a.for_consumer("B").reclaim(DRAFTER, 1000, 1)) == 1


# ------------------------------------------------------------------------ embedded Redis


@pytest.mark.integration
def test_embedded_redis_starts_serves_and_leaves_nothing():
    srv = EmbeddedRedis().start()
    pid, tmp = srv.pid, srv.dir
    assert srv.url.startswith("unix://") and tmp.is_dir()
    buf = RedisStreamBuffer(srv.url, consumer="A")
    buf.put(DRAFTER, b"x")
    assert [e.data for e in buf.read(DRAFTER, 1)] == [b"x"]
    buf.client.close()
    srv.stop()
    srv.stop()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not tmp.exists()


@pytest.mark.integration
def test_embedded_redis_password():
    with EmbeddedRedis(password='s3 "cr\\et') as srv:
        path = str(srv.socket_path)
        no_retry = Retry(NoBackoff(), 0)  # auth errors are connection errors: no backoff
        with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
            redis.Redis(unix_socket_path=path, retry=no_retry).ping()
        with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
            redis.Redis(unix_socket_path=path, password="wrong", retry=no_retry).ping()
        assert srv.client().ping()
        assert "password=" in srv.url
        buf = RedisStreamBuffer(srv.url, consumer="A")  # password from the URL
        buf.put(DRAFTER, b"x")
        assert buf.length(DRAFTER) == 1
        bare = f"unix://{path}"
        assert RedisStreamBuffer(bare, password='s3 "cr\\et').length(DRAFTER) == 1


@pytest.mark.integration
def test_connect_uses_redis_url_or_starts_embedded(monkeypatch, server):
    monkeypatch.setenv("REDIS_URL", server.url)
    client, owned = connect()
    assert owned is None and client.ping()
    monkeypatch.delenv("REDIS_URL")
    client, owned = connect()
    try:
        assert owned is not None and client.ping() and owned.url != server.url
    finally:
        owned.stop()


@pytest.mark.integration
def test_buffer_recreates_a_lost_group(server):
    client = server.client()
    buf = RedisStreamBuffer(client, "test:lost:", consumer="A")
    buf.put(DRAFTER, b"a")
    assert len(buf.read(DRAFTER, 5)) == 1
    client.delete(buf.key(DRAFTER))  # as after a Redis restart without persistence
    buf.put(DRAFTER, b"b")
    assert [e.data for e in buf.read(DRAFTER, 5)] == [b"b"]


class _FakeRedis7:
    """Just enough of a client to return Redis 7's 3-element XAUTOCLAIM reply."""

    def __init__(self) -> None:
        self.acked: list[str] = []

    def get_connection_kwargs(self) -> dict:
        return {}

    def xgroup_create(self, *args, **kwargs) -> None:
        return None

    def xautoclaim(self, key, group, consumer, min_idle, start, count):
        assert start == "0-0"
        return [b"0-0", [(b"1-0", {b"d": b"x"})], [b"0-5"]]  # cursor, entries, deleted ids

    def xack(self, key, group, *ids) -> int:
        self.acked += ids
        return len(ids)


def test_reclaim_reads_the_redis7_reply_shape():
    buf = RedisStreamBuffer(_FakeRedis7(), consumer="B")
    assert buf.reclaim(DRAFTER, min_idle_ms=0, count=5) == [Entry("1-0", b"x")]
    assert buf.client.acked == []  # Redis 7 already dropped deleted ids from the PEL
