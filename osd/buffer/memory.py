"""The in-memory buffer: the Redis backend's interface and semantics, for unit tests and
the one-process loop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from osd.buffer.base import (
    DEFAULT_GROUP,
    DEFAULT_MAXLEN,
    DEFAULT_PREFIX,
    Entry,
    _as_bytes,
    _check_args,
    _default_consumer,
)

log = logging.getLogger(__name__)


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

    def for_group(self, group: str) -> MemoryBuffer:
        """The same streams read by another consumer group (every group gets every entry:
        a decision-model trainer reads the drafter's records beside its trainer)."""
        return MemoryBuffer(
            self.streams, self.stream_prefix, self.maxlen, group, consumer=self.consumer
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
