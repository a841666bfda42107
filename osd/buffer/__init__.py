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
``osd.buffer.embedded`` and are re-exported here). These two (``redis_stream``, ``embedded``) are the
only modules of the library that touch Redis; they load only when used, so a trainer that
imports the protocol (``osd.buffer.base``) does not import redis.

Example::

    buf = MemoryBuffer(consumer="t0")
    buf.put("draft-a", b"rec1"); buf.put("draft-a", b"rec2")
    batch = buf.read("draft-a", count=8)        # [Entry(id='0-1', ...), Entry(id='0-2', ...)]
    ...optimiser step...
    buf.ack("draft-a", [e.id for e in batch])   # 2
"""

from __future__ import annotations

import importlib
from typing import Any

from osd.buffer.base import Entry, SampleBuffer
from osd.buffer.memory import MemoryBuffer, MemoryStreams

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

_LAZY = {
    "RedisStreamBuffer": "osd.buffer.redis_stream",
    "EmbeddedRedis": "osd.buffer.embedded",
    "connect": "osd.buffer.embedded",
    "find_redis_server": "osd.buffer.embedded",
}


def __getattr__(name: str) -> Any:  # the Redis backends import redis only when used
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'osd.buffer' has no attribute {name!r}")
