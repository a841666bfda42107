"""The buffer protocol: what replicas and trainers use, with the helpers both backends share.

No Redis here: the trainer imports this module only.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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


class Outage:
    """One log line when something starts failing and one when it works again — not one per
    retry. ``failed`` / ``ok`` are called on every attempt; thread-safe.

    >>> o = Outage("redis", logging.getLogger("doc"))
    >>> o.failed(ConnectionError("down")), o.failed(ConnectionError("down")), o.down
    (True, False, True)
    >>> o.ok(), o.down, o.count
    (True, False, 1)
    """

    def __init__(self, what: str, logger: logging.Logger) -> None:
        self.what = what
        self.log = logger
        self.count = 0  # outages seen
        self.failures = 0  # failed attempts during the current outage
        self.since: float | None = None  # monotonic start of the current outage
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, err: BaseException) -> bool:
        """Count a failed attempt; True (and a warning logged) iff an outage starts here."""
        with self._lock:
            self.failures += 1
            if self.since is not None:
                return False
            self.since = time.monotonic()
            self.count += 1
        self.log.warning(
            "%s unavailable (%s: %s); retrying quietly", self.what, type(err).__name__, err
        )
        return True

    def ok(self) -> bool:
        """Note a success; True (and one info line) iff it ends an outage."""
        if self.since is None:
            return False
        with self._lock:
            since, failures, self.since, self.failures = self.since, self.failures, None, 0
        if since is None:
            return False
        self.log.warning(
            "%s back after %.1f s (%d failed attempts)",
            self.what,
            time.monotonic() - since,
            failures,
        )
        return True


# ---------------------------------------------------------------------------------- Redis
