"""The buffer protocol: what replicas and trainers use, with the helpers both backends share.

No Redis here: the trainer imports this module only.
"""

from __future__ import annotations

import logging
import os
import socket
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


# ---------------------------------------------------------------------------------- Redis
