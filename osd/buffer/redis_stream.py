"""The production buffer: Redis Streams with a consumer group (see ``osd.buffer``)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from osd.buffer.base import (
    _FIELD,
    DEFAULT_GROUP,
    DEFAULT_MAXLEN,
    DEFAULT_PREFIX,
    Entry,
    _as_bytes,
    _check_args,
    _default_consumer,
)

__all__ = ["CLIENT_TIMEOUTS", "RedisStreamBuffer", "redis_client"]

log = logging.getLogger(__name__)

# Every client the project creates has these (a hung Redis must not hang its callers); no
# read blocks server-side (XREADGROUP without BLOCK), so a reply never legitimately takes
# seconds. Overridable per client.
CLIENT_TIMEOUTS: dict[str, Any] = {
    "socket_timeout": 5.0,
    "socket_connect_timeout": 2.0,
    "health_check_interval": 30,
}


def redis_client(url: str, **kwargs: Any) -> redis.Redis:
    """``redis.Redis.from_url(url)`` with :data:`CLIENT_TIMEOUTS` unless given otherwise."""
    return redis.Redis.from_url(url, **{**CLIENT_TIMEOUTS, **kwargs})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisStreamBuffer:
    """The sample buffer on Redis Streams (one stream per drafter id, one consumer group).

    ``url_or_client``: a ``redis://``, ``rediss://`` or ``unix://`` URL (password in the URL
    or as ``password=``; extra keyword arguments go to ``redis.Redis.from_url``, e.g. TLS
    options; socket timeouts default to :data:`CLIENT_TIMEOUTS`), or an existing
    ``redis.Redis`` created with ``decode_responses=False``.
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
            self.client = redis_client(url_or_client, **client_kwargs)
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

    def for_group(self, group: str) -> RedisStreamBuffer:
        """The same streams read by another consumer group (every group gets every entry:
        a decision-model trainer reads the drafter's records beside its trainer)."""
        return RedisStreamBuffer(
            self.client, self.stream_prefix, self.maxlen, group, consumer=self.consumer
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
