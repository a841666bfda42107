"""From a replica to the Redis stream buffer, off the response path.

A :class:`RecordSink` takes finished requests' distill records from the serving loop
(:meth:`RecordSink.submit` never blocks: a bounded queue, oldest-first writes on one
thread) and appends them, msgpack-encoded (``osd.distill.record.encode``, never pickle),
to the drafter's training stream — or, every ``holdout_every``-th record, to the
held-out stream ``<drafter_id>.holdout`` the registry's promotion gate evaluates on
(records the trainers never see).

Redis down: a write is retried with backoff for up to ``retry_s``; then the record is
dropped and counted (serving never waits on the buffer). A full queue drops the newest.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from osd.buffer import SampleBuffer
from osd.distill.record import DistillRecord, encode

__all__ = ["RecordSink", "holdout_stream"]

log = logging.getLogger(__name__)


def holdout_stream(drafter_id: str) -> str:
    """The stream of held-out records of ``drafter_id`` (read by the gate only)."""
    return f"{drafter_id}.holdout"


class RecordSink:
    """Background writer of records to the buffer; see the module docstring."""

    def __init__(
        self,
        buffer: SampleBuffer,
        drafter_id: str,
        holdout_every: int = 8,
        on_write: Callable[[str, bool], None] | None = None,
        capacity: int = 1024,
        retry_s: float = 5.0,
    ) -> None:
        self.buffer = buffer
        self.drafter_id = drafter_id
        self.holdout_every = holdout_every
        self.on_write = on_write
        self.retry_s = retry_s
        self._queue: queue.Queue[DistillRecord | None] = queue.Queue(maxsize=capacity)
        self._count = 0
        self.written = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="osd-record-sink", daemon=True)
        self._thread.start()

    def submit(self, record: DistillRecord) -> None:
        """Queue ``record`` for writing; returns at once."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._dropped("the sink queue is full (Redis too slow or down)")

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def _stream_of_next(self) -> str:
        self._count += 1
        if self._count % self.holdout_every == 0:
            return holdout_stream(self.drafter_id)
        return self.drafter_id

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            stream = self._stream_of_next()
            try:
                data = encode(record)
            except Exception:
                log.exception("could not encode record %s", record.request_id)
                self._dropped("encoding failed")
                continue
            self._write(stream, data)

    def _write(self, stream: str, data: bytes) -> None:
        deadline, delay = time.monotonic() + self.retry_s, 0.05
        while True:
            try:
                self.buffer.put(stream, data)
            except Exception as err:
                if time.monotonic() + delay > deadline:
                    log.warning("buffer write to %r failed, record dropped: %s", stream, err)
                    self._dropped(str(err))
                    return
                time.sleep(delay)
                delay = min(2 * delay, 1.0)
                continue
            self.written += 1
            if self.on_write is not None:
                self.on_write(stream, True)
            return

    def _dropped(self, why: str) -> None:
        self.dropped += 1
        log.debug("record dropped: %s", why)
        if self.on_write is not None:
            self.on_write("", False)
