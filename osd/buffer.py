"""The sample buffer between serving replicas and trainers (DESIGN §4).

Terms (those of Redis Streams):

- **stream**: one per drafter id, key ``stream_prefix + drafter_id``; entries are opaque
  record bytes (see ``osd.distill.record``: msgpack, never pickle) under ids ``"<ms>-<seq>"``.
- **group**: a consumer group (``"trainers"``); each entry is delivered to one consumer of
  the group. A group created on first use starts at id ``0``: it sees every entry.
- **pending**: an entry delivered to a consumer and not yet acknowledged. It stays pending
  until :meth:`ack` — a trainer acks only after the optimiser step that consumed it, so a
  trainer that dies loses nothing: another consumer :meth:`reclaim` s what it held once it
  has been idle long enough. Delivery is **at-least-once**.
- **bounded**: ``put`` trims the stream to about ``maxlen`` entries (``MAXLEN ~``). Trimming
  drops the oldest entries even when pending; such entries are dropped from the pending
  list with a warning, never returned.

Read semantics (both backends): :meth:`read` first serves this consumer's *own* pending
entries, then new ones. A batch that was read and not acked (its update failed) is
therefore served again — ack a batch before reading the next.

Backends: :class:`RedisStreamBuffer` (production; ``REDIS_URL``, password/ACL, ``rediss://``)
and :class:`MemoryBuffer` (same interface and semantics, for unit tests).
:class:`EmbeddedRedis` starts a private ``redis-server`` on a Unix socket when no
``REDIS_URL`` is set; :func:`connect` picks one or the other (both live in
``osd.embedded_redis`` and are re-exported here). These two are the only modules of the
library that touch Redis.

Example::

    buf = MemoryBuffer(consumer="t0")
    buf.put("draft-a", b"rec1"); buf.put("draft-a", b"rec2")
    batch = buf.read("draft-a", count=8)        # [Entry(id='0-1', ...), Entry(id='0-2', ...)]
    ...optimiser step...
    buf.ack("draft-a", [e.id for e in batch])   # 2
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from osd.embedded_redis import EmbeddedRedis, connect, find_redis_server

__all__ = [
    "EmbeddedRedis",
    "Entry",
    "MemoryBuffer",
    "MemoryStreams",
    "RedisStreamBuffer",
    "SampleBuffer",
    "connect",
    "find_redis_server",
]

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "osd:records:"
DEFAULT_MAXLEN = 100_000
DEFAULT_GROUP = "trainers"
_FIELD = b"d"  # the one field of a stream entry: the record bytes


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry: its id and the opaque record bytes."""

    id: str
    data: bytes


class SampleBuffer(Protocol):
    """What replicas and trainers use; implemented by both backends."""

    consumer: str

    def put(self, drafter_id: str, data: bytes) -> str: ...
    def read(self, drafter_id: str, count: int, block_ms: int = 0) -> list[Entry]: ...
    def ack(self, drafter_id: str, ids: Sequence[str]) -> int: ...
    def reclaim(self, drafter_id: str, min_idle_ms: int, count: int) -> list[Entry]: ...
    def pending_count(self, drafter_id: str, consumer: str | None = None) -> int: ...
    def length(self, drafter_id: str) -> int: ...


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _check_args(drafter_id: str, count: int | None = None) -> None:
    if not isinstance(drafter_id, str) or not drafter_id:
        raise ValueError(f"drafter_id must be a non-empty string, got {drafter_id!r}")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"count must be an int >= 1, got {count!r}")


def _as_bytes(data: Any) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"buffer entries are bytes (an encoded record), got {type(data).__name__}")
    return bytes(data)


# ---------------------------------------------------------------------------------- Redis


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisStreamBuffer:
    """The sample buffer on Redis Streams (one stream per drafter id, one consumer group).

    ``url_or_client``: a ``redis://``, ``rediss://`` or ``unix://`` URL (password in the URL
    or as ``password=``; extra keyword arguments go to ``redis.Redis.from_url``, e.g. TLS
    options), or an existing ``redis.Redis`` created with ``decode_responses=False``.
    """

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        stream_prefix: str = DEFAULT_PREFIX,
        maxlen: int = DEFAULT_MAXLEN,
        group: str = DEFAULT_GROUP,
        consumer: str | None = None,
        *,
        password: str | None = None,
        **client_kwargs: Any,
    ) -> None:
        if isinstance(url_or_client, str):
            if password is not None:
                client_kwargs["password"] = password
            self.client = redis.Redis.from_url(url_or_client, **client_kwargs)
        else:
            self.client = url_or_client
        if getattr(self.client, "get_connection_kwargs", dict)().get("decode_responses"):
            raise ValueError("the Redis client must use decode_responses=False (entries are bytes)")
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self.stream_prefix = stream_prefix
        self.maxlen = maxlen
        self.group = group
        self.consumer = consumer or _default_consumer()
        self._ready: set[str] = set()  # keys whose group exists

    def for_consumer(self, consumer: str) -> RedisStreamBuffer:
        """The same buffer (client, stream, group) seen by another consumer."""
        return RedisStreamBuffer(
            self.client, self.stream_prefix, self.maxlen, self.group, consumer=consumer
        )

    def key(self, drafter_id: str) -> str:
        return self.stream_prefix + drafter_id

    def put(self, drafter_id: str, data: bytes) -> str:
        """Append one record (``XADD key MAXLEN ~ maxlen * d <bytes>``); returns its id."""
        _check_args(drafter_id)
        entry_id = self.client.xadd(
            self.key(drafter_id), {_FIELD: _as_bytes(data)}, maxlen=self.maxlen, approximate=True
        )
        return _text(entry_id)

    def _ensure_group(self, key: str) -> None:
        if key in self._ready:
            return
        try:
            self.client.xgroup_create(key, self.group, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise
        self._ready.add(key)

    def _xreadgroup(self, key: str, start: str, count: int, block: int | None) -> list:
        """XREADGROUP from ``start`` ('0': own pending, '>': new); re-creates a lost group."""
        for attempt in range(2):
            self._ensure_group(key)
            try:
                reply = self.client.xreadgroup(
                    self.group, self.consumer, {key: start}, count=count, block=block
                )
                break
            except redis.ResponseError as err:
                if "NOGROUP" not in str(err) or attempt:
                    raise
                log.warning("consumer group %r on %r vanished (Redis restarted?)", self.group, key)
                self._ready.discard(key)
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3: {key: [entries]}
            return next(iter(reply.values()), [[]])[0]
        return reply[0][1]  # RESP2: [[key, entries]]

    def _entries(self, key: str, raw: Iterable[tuple[Any, Any]]) -> list[Entry]:
        """Convert (id, fields) pairs; ack and skip entries trimmed away while pending."""
        out, gone = [], []
        for entry_id, fields in raw:
            if entry_id is None:  # Redis 6.2 XAUTOCLAIM: a deleted entry, id unknown
                continue
            if not fields or _FIELD not in fields:
                gone.append(_text(entry_id))
                continue
            out.append(Entry(_text(entry_id), bytes(fields[_FIELD])))
        if gone:
            log.warning(
                "%d pending entries of %r were trimmed before use; dropping", len(gone), key
            )
            self.client.xack(key, self.group, *gone)
        return out

    def read(self, drafter_id: str, count: int, block_ms: int = 0) -> list[Entry]:
        """Up to ``count`` entries: this consumer's pending ones first, then new ones.

        ``block_ms > 0`` waits up to that long for new entries when there are none;
        ``0`` returns at once.
        """
        _check_args(drafter_id, count)
        key = self.key(drafter_id)
        out = self._entries(key, self._xreadgroup(key, "0", count, None))
        if len(out) < count:
            block = block_ms if block_ms > 0 and not out else None
            out += self._entries(key, self._xreadgroup(key, ">", count - len(out), block))
        return out

    def ack(self, drafter_id: str, ids: Sequence[str]) -> int:
        """Acknowledge entries (after the update that used them); returns how many were."""
        _check_args(drafter_id)
        if not ids:
            return 0
        return int(self.client.xack(self.key(drafter_id), self.group, *ids))

    def reclaim(self, drafter_id: str, min_idle_ms: int, count: int) -> list[Entry]:
        """Take over up to ``count`` entries pending (any consumer) for >= ``min_idle_ms``.

        ``XAUTOCLAIM``; redis-py returns ``[cursor, entries]`` on Redis 6.2 and
        ``[cursor, entries, deleted_ids]`` on 7.x. Entries trimmed from the stream are
        dropped from the pending list either way.
        """
        _check_args(drafter_id, count)
        key = self.key(drafter_id)
        self._ensure_group(key)
        out: list[Entry] = []
        cursor, lost_62 = "0-0", 0
        while len(out) < count:
            try:
                reply = self.client.xautoclaim(
                    key, self.group, self.consumer, min_idle_ms, cursor, count=count - len(out)
                )
            except redis.ResponseError as err:
                if "NOGROUP" in str(err):
                    self._ready.discard(key)
                    return out
                raise
            cursor, raw = _text(reply[0]), reply[1]
            lost_62 += sum(1 for entry_id, _ in raw if entry_id is None)
            if len(reply) > 2 and reply[2]:
                log.warning("%d pending entries of %r were trimmed before use", len(reply[2]), key)
            out += self._entries(key, raw)
            if cursor == "0-0":
                break
        if lost_62:  # Redis 6.2 claimed deleted entries to us without ids: find and drop them
            pending = self.pending_count(drafter_id, self.consumer)
            self._entries(key, self._xreadgroup(key, "0", max(pending, 1), None))
        return out

    def pending_count(self, drafter_id: str, consumer: str | None = None) -> int:
        """Entries delivered and not acked: in the whole group, or for one consumer."""
        _check_args(drafter_id)
        try:
            summary = self.client.xpending(self.key(drafter_id), self.group)
        except redis.ResponseError as err:
            if "NOGROUP" in str(err):
                return 0
            raise
        if consumer is None:
            return int(summary["pending"])
        for row in summary.get("consumers") or []:
            if _text(row["name"]) == consumer:
                return int(row["pending"])
        return 0

    def length(self, drafter_id: str) -> int:
        """Entries now in the stream (``XLEN``; 0 for a stream never written)."""
        _check_args(drafter_id)
        return int(self.client.xlen(self.key(drafter_id)))


# --------------------------------------------------------------------------------- memory


def _parse_id(entry_id: str) -> tuple[int, int]:
    try:
        ms, seq = entry_id.split("-")
        return int(ms), int(seq)
    except ValueError as err:
        raise ValueError(f"not a stream entry id: {entry_id!r}") from err


@dataclass
class _Pending:
    consumer: str
    delivered_at: float  # clock() seconds
    deliveries: int = 1


@dataclass
class _Stream:
    entries: dict[tuple[int, int], bytes] = field(default_factory=dict)  # insertion = id order
    last_id: tuple[int, int] = (0, 0)
    groups: dict[str, _Group] = field(default_factory=dict)


@dataclass
class _Group:
    last_delivered: tuple[int, int] = (0, 0)
    pending: dict[tuple[int, int], _Pending] = field(default_factory=dict)


class MemoryStreams:
    """The in-memory "server" that :class:`MemoryBuffer` views share.

    ``clock`` (seconds, monotonic) drives idle times; inject a fake one in tests.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.streams: dict[str, _Stream] = {}
        self.cond = threading.Condition()

    def next_id(self, stream: _Stream) -> tuple[int, int]:
        ms = int(time.time() * 1000)
        last_ms, last_seq = stream.last_id
        stream.last_id = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        return stream.last_id


def _fmt(entry_id: tuple[int, int]) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


class MemoryBuffer:
    """The sample buffer in memory, with the semantics of :class:`RedisStreamBuffer`.

    Consumer groups, per-consumer pending lists, idle times from an injectable clock,
    exact ``maxlen`` trimming. Views made with :meth:`for_consumer` share one
    :class:`MemoryStreams`, like several clients of one Redis.

    >>> t = [0.0]
    >>> a = MemoryBuffer(consumer="a", clock=lambda: t[0])
    >>> _ = a.put("d", b"x")
    >>> [e.data for e in a.read("d", 10)]
    [b'x']
    >>> b = a.for_consumer("b")
    >>> b.reclaim("d", min_idle_ms=1000, count=10)
    []
    >>> t[0] += 2.0
    >>> [e.data for e in b.reclaim("d", min_idle_ms=1000, count=10)]
    [b'x']
    """

    def __init__(
        self,
        streams: MemoryStreams | None = None,
        stream_prefix: str = DEFAULT_PREFIX,
        maxlen: int = DEFAULT_MAXLEN,
        group: str = DEFAULT_GROUP,
        consumer: str | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self.streams = streams if streams is not None else MemoryStreams(clock)
        self.stream_prefix = stream_prefix
        self.maxlen = maxlen
        self.group = group
        self.consumer = consumer or _default_consumer()

    def for_consumer(self, consumer: str) -> MemoryBuffer:
        """The same buffer (streams, group) seen by another consumer."""
        return MemoryBuffer(
            self.streams, self.stream_prefix, self.maxlen, self.group, consumer=consumer
        )

    def key(self, drafter_id: str) -> str:
        return self.stream_prefix + drafter_id

    def _group(self, drafter_id: str) -> tuple[_Stream, _Group]:
        stream = self.streams.streams.setdefault(self.key(drafter_id), _Stream())
        return stream, stream.groups.setdefault(self.group, _Group())

    def put(self, drafter_id: str, data: bytes) -> str:
        _check_args(drafter_id)
        data = _as_bytes(data)
        with self.streams.cond:
            stream = self.streams.streams.setdefault(self.key(drafter_id), _Stream())
            entry_id = self.streams.next_id(stream)
            stream.entries[entry_id] = data
            while len(stream.entries) > self.maxlen:  # exact MAXLEN
                del stream.entries[next(iter(stream.entries))]
            self.streams.cond.notify_all()
        return _fmt(entry_id)

    def _serve(self, stream: _Stream, group: _Group, ids: list[tuple[int, int]]) -> list[Entry]:
        """Deliver ``ids`` to this consumer; drop the pending ones that were trimmed away."""
        now, out, gone = self.streams.clock(), [], 0
        for entry_id in ids:
            data = stream.entries.get(entry_id)
            if data is None:
                group.pending.pop(entry_id, None)
                gone += 1
                continue
            p = group.pending.get(entry_id)
            if p is None:
                group.pending[entry_id] = _Pending(self.consumer, now)
            else:
                p.consumer, p.delivered_at, p.deliveries = self.consumer, now, p.deliveries + 1
            out.append(Entry(_fmt(entry_id), data))
        if gone:
            log.warning("%d pending entries were trimmed before use; dropping", gone)
        return out

    def read(self, drafter_id: str, count: int, block_ms: int = 0) -> list[Entry]:
        _check_args(drafter_id, count)
        deadline = time.monotonic() + block_ms / 1000
        with self.streams.cond:
            stream, group = self._group(drafter_id)
            mine = sorted(i for i, p in group.pending.items() if p.consumer == self.consumer)
            out = self._serve(stream, group, mine[:count])
            while len(out) < count:
                new = [i for i in stream.entries if i > group.last_delivered][: count - len(out)]
                if new:
                    group.last_delivered = new[-1]
                    return out + self._serve(stream, group, new)
                remaining = deadline - time.monotonic()
                if out or remaining <= 0:
                    break
                self.streams.cond.wait(remaining)
            return out

    def ack(self, drafter_id: str, ids: Sequence[str]) -> int:
        _check_args(drafter_id)
        with self.streams.cond:
            _, group = self._group(drafter_id)
            return sum(group.pending.pop(_parse_id(i), None) is not None for i in ids)

    def reclaim(self, drafter_id: str, min_idle_ms: int, count: int) -> list[Entry]:
        _check_args(drafter_id, count)
        with self.streams.cond:
            stream, group = self._group(drafter_id)
            now, out = self.streams.clock(), []
            for entry_id in sorted(group.pending):
                if len(out) >= count:
                    break
                if (now - group.pending[entry_id].delivered_at) * 1000 >= min_idle_ms:
                    out += self._serve(stream, group, [entry_id])
            return out

    def pending_count(self, drafter_id: str, consumer: str | None = None) -> int:
        _check_args(drafter_id)
        with self.streams.cond:
            _, group = self._group(drafter_id)
            return sum(consumer is None or p.consumer == consumer for p in group.pending.values())

    def length(self, drafter_id: str) -> int:
        _check_args(drafter_id)
        with self.streams.cond:
            stream = self.streams.streams.get(self.key(drafter_id))
            return 0 if stream is None else len(stream.entries)
