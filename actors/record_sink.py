"""From a replica to the Redis stream buffer, off the response path.

A :class:`RecordSink` takes finished requests' distill records from the serving loop
(:meth:`RecordSink.submit` never blocks: a bounded queue, oldest-first writes on one
thread) and appends them, msgpack-encoded (``osd.distill.record.encode``, never pickle),
to the drafter's training stream — or, for one record in ``holdout_every``, to the
held-out stream ``<drafter_id>.holdout`` the registry's promotion gate evaluates on
(records the trainers never see). Which records are held out is a separate, seeded split
(:func:`is_holdout`: a hash of the seed and the server-made request id), so neither
arrival order nor anything a client sends decides it.

Before the sink, :class:`KeyQuota` caps any one API key's share of the records used, so
that one client cannot dominate what the draft learns (or what the gate judges by).

Redis down (dead, restarting, hung): the writer keeps the record it holds and retries
with back-off (up to ``max_backoff_s`` apart) until Redis answers, logging one line per
outage; meanwhile new records wait in the bounded queue (``capacity``) and are delivered,
in order, once Redis is back. Serving never waits on the buffer: a full queue drops the
newest record, and :meth:`RecordSink.close` drops what it could not write by its deadline —
both counted (``dropped``, the ``on_write(…, False)`` callback). A write whose reply was
lost may be retried after it landed: delivery is at-least-once, as for the trainers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

from osd.buffer import SampleBuffer
from osd.buffer.base import Outage
from osd.distill.record import DistillRecord, encode
from osd.specdec import threads

__all__ = ["KeyQuota", "RecordSink", "holdout_stream", "is_holdout"]

log = logging.getLogger(__name__)


def holdout_stream(drafter_id: str) -> str:
    """The stream of held-out records of ``drafter_id`` (read by the gate only)."""
    return f"{drafter_id}.holdout"


def is_holdout(seed: int, request_id: str, every: int) -> bool:
    """Whether ``request_id``'s record is held out: one in ``every``, by a hash of the seed
    and the id (deterministic, independent of order and of the request's content).

    >>> [is_holdout(0, f"cmpl-{i}", 4) for i in range(8)]
    [False, False, True, False, False, False, True, False]
    """
    digest = hashlib.blake2b(f"{seed}:{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % every == 0


class KeyQuota:
    """No key's admitted records above ``max_share`` of all admitted, over the last
    ``window`` records offered, while another key is active in that window. A key that
    offers at most ``max_share`` of the records is never throttled, nor is a lone client
    (there is no one else to crowd out); a heavy key is sampled down to its share.

    >>> q = KeyQuota(max_share=0.5, window=8)
    >>> [q.admit("a") for _ in range(3)] + [q.admit("b"), q.admit("a"), q.admit("a")]
    [True, True, True, True, False, False]
    """

    def __init__(self, max_share: float = 0.5, window: int = 512) -> None:
        self.max_share = max_share
        self._recent: deque[tuple[str, bool]] = deque(maxlen=window)
        self._offered: Counter[str] = Counter()
        self._admitted: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self._lock = threading.Lock()

    def admit(self, key: str) -> bool:
        with self._lock:
            others = len(self._offered) - (key in self._offered) > 0
            offered, total = len(self._recent) + 1, sum(self._admitted.values()) + 1
            ok = self.max_share >= 1 or not others  # a lone client crowds out no one
            ok = ok or self._offered[key] + 1 <= self.max_share * offered  # not a heavy key
            ok = ok or self._admitted[key] + 1 <= self.max_share * total
            if len(self._recent) == self._recent.maxlen:
                old, was = self._recent[0]
                self._offered[old] -= 1
                self._admitted[old] -= was
                for c in (self._offered, self._admitted):
                    if c[old] <= 0:
                        del c[old]
            self._recent.append((key, ok))
            self._offered[key] += 1
            if ok:
                self._admitted[key] += 1
            else:
                self.dropped[key] += 1
            return ok


class RecordSink:
    """Background writer of records to the buffer; see the module docstring."""

    def __init__(
        self,
        buffer: SampleBuffer,
        drafter_id: str,
        holdout_every: int = 8,
        on_write: Callable[[str, bool], None] | None = None,
        capacity: int = 1024,
        max_backoff_s: float = 1.0,
        holdout_seed: int = 0,
    ) -> None:
        self.buffer = buffer
        self.drafter_id = drafter_id
        self.holdout_every = holdout_every
        self.holdout_seed = holdout_seed
        self.on_write = on_write
        self.max_backoff_s = max_backoff_s
        self._queue: queue.Queue[DistillRecord | None] = queue.Queue(maxsize=capacity)
        self.written = 0
        self.dropped = 0
        self.outage = Outage(f"record buffer ({drafter_id})", log)
        self._deadline: float | None = None  # set by close(): give up retrying after it
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="osd-record-sink", daemon=True)
        self._thread.start()

    def submit(self, record: DistillRecord) -> None:
        """Queue ``record`` for writing; returns at once."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._dropped("the sink queue is full (Redis too slow or down)")

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued within ``timeout_s`` (the rest is dropped, counted); stop."""
        self._deadline = time.monotonic() + timeout_s
        self._closing.set()
        with contextlib.suppress(queue.Full):  # else the writer drains it at the deadline
            self._queue.put(None, timeout=timeout_s)
        self._thread.join(timeout_s + 1.0)

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def _stream_of(self, record: DistillRecord) -> str:
        if is_holdout(self.holdout_seed, record.request_id, self.holdout_every):
            return holdout_stream(self.drafter_id)
        return self.drafter_id

    def _run(self) -> None:
        threads.side()  # encoding on one thread: the serving loop's team keeps the cores
        while True:
            try:
                record = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._closing.is_set() and self._past_deadline():
                    return
                continue
            if record is None:
                return
            if self._past_deadline():
                self._dropped("closing: not written by the deadline")
                continue
            stream = self._stream_of(record)
            try:
                data = encode(record)
            except Exception:
                log.exception("could not encode record %s", record.request_id)
                self._dropped("encoding failed")
                continue
            self._write(stream, data)

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() > self._deadline

    def _write(self, stream: str, data: bytes) -> None:
        delay = 0.05
        while True:
            try:
                self.buffer.put(stream, data)
            except Exception as err:
                self.outage.failed(err)
                if self._past_deadline():
                    self._dropped(f"closing with the buffer down: {err}")
                    return
                time.sleep(delay)
                delay = min(2 * delay, self.max_backoff_s)
                continue
            self.outage.ok()
            self.written += 1
            if self.on_write is not None:
                self.on_write(stream, True)
            return

    def _dropped(self, why: str) -> None:
        self.dropped += 1
        log.debug("record dropped: %s", why)
        if self.on_write is not None:
            self.on_write("", False)
