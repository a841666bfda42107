"""The serving loop of one replica: continuous batching, one decoder, hot-swaps between steps.

A :class:`ServingLoop` owns a :class:`~osd.specdec.engine.SpeculativeDecoder` and one thread.
Each turn of the loop (**continuous batching**, as vLLM / Orca schedule):

1. **adopt** drafter weights offered with :meth:`ServingLoop.offer_weights`, if any;
2. **retire** cancelled sequences and **admit** waiting requests while fewer than
   ``max_batch`` are active (prefill each one);
3. **step** every active sequence by one speculative step in **one**
   ``decoder.step_batch`` call (one target forward for the whole batch);
4. per sequence: decode the text, apply the stop strings, stream a :class:`Delta`, and
   retire the finished ones (``decoder.release`` frees the sequence's KV slot) — so a
   waiting request takes the slot at the next turn, not when the whole batch is done.

A step is never interrupted: weights change only between two steps, and no sequence is
dropped or restarted by a swap (the draft's KV cache of a sequence in flight was built by
the old weights: acceptance may dip for a few steps, the output does not change —
verification keeps it lossless). Sequences are independent (the state is per sequence,
DESIGN §3), so a request's output does not depend on what it was batched with.

Terms:

- **admit**: a submitted request gets a slot (at most ``max_batch`` at once, and no more
  than the engine's own ``max_batch``) and its prefill; the rest wait in the inbox, first
  come first served.
- **retire**: a sequence leaves the batch — finished, stopped by a stop string, cancelled
  or failed; ``decoder.release`` is called exactly once for every started sequence.
- **event**: what the loop tells the submitter, from the loop thread: a :class:`Delta`
  with new text, and at the end one with ``result`` (or ``error``) set.
- **stop strings**: the text is cut at the first occurrence of any of them (which is not
  returned, as in OpenAI's API). Text that might still become a stop string is held back,
  so the streamed deltas always add up to the final text.
- **swap pause**: the time the loop spends adopting a new version between two steps
  (loading the state dict); sequences wait that long, nothing else.

Worked example of the hold-back, stop ``["\\n\\n"]``: after step 1 the text is
``"4 + 4 = 8\\n"``; the trailing ``"\\n"`` could start ``"\\n\\n"`` so ``"4 + 4 = 8"`` is
sent. Step 2 adds ``"\\nQ"``: the stop string is found, the final text is
``"4 + 4 = 8"`` and the finish reason ``"stop"``.

If ``step_batch`` raises (an engine bug), every sequence of that batch fails with a
``RuntimeError`` delivered to its submitter, and the loop keeps serving the others.

The loop is not Ray-specific: the Serve replica (``osd.actors.server``) feeds it from HTTP
handlers, ``osd bench --serving`` from client threads; tests drive it directly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from osd.distill.collect import RecordCollector
from osd.distill.record import DistillRecord
from osd.drafters.base import DecodeState
from osd.serving.detok import IncrementalText
from osd.specdec import threads
from osd.specdec.engine import DecodeStats, SpeculativeDecoder
from osd.specdec.sampling import SamplingParams

__all__ = ["Delta", "RequestResult", "ServeRequest", "ServingLoop", "SwapEvent", "visible_text"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeRequest:
    """One validated request (token ids already checked against the context)."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    domain: str | None = None  # the client's domain tag: labels the record, routes a mixture


@dataclass
class RequestResult:
    """A finished request: text, tokens, acceptance statistics and drafter versions."""

    request_id: str
    text: str
    token_ids: list[int]  # generated tokens (all emitted ones, also past a stop string)
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    prompt_tokens: int
    stats: DecodeStats
    version_start: int  # drafter version when the request was admitted
    version_end: int  # ... and when it finished (differs if a swap happened in flight)
    queue_s: float  # submitted → admitted
    latency_s: float  # submitted → finished
    adapter: str | None = None  # the adapter of a mixture drafter that drafted it

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Delta:
    """An event for the submitter: new text; the last one carries ``result`` or ``error``."""

    text: str = ""
    result: RequestResult | None = None
    error: BaseException | None = None

    @property
    def final(self) -> bool:
        return self.result is not None or self.error is not None


@dataclass(frozen=True)
class SwapEvent:
    """One adoption of new drafter weights."""

    version: int
    previous: int
    pause_s: float  # decode loop blocked while loading the weights
    waited_s: float  # offered → adopted (the step in progress finished first)
    in_flight: int  # sequences active at the swap (none was dropped)
    part: str = "drafter"  # what was swapped: the drafter, or one of its parts (``stop``, …)


def visible_text(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """What may be shown of ``text``: cut at the first stop string (``True``), else with
    any suffix that could still grow into a stop string or a multi-byte character held
    back (``False``).

    >>> visible_text("a = 8\\n", ("\\n\\n",))
    ('a = 8', False)
    >>> visible_text("a = 8\\n\\nQ", ("\\n\\n",))
    ('a = 8', True)
    >>> visible_text("ab\\ufffd", ())
    ('ab', False)
    """
    cut = [i for i in (text.find(s) for s in stop) if i >= 0]
    if cut:
        return text[: min(cut)], True
    keep = len(text)
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = min(keep, len(text) - n)
                break
    while keep and text[keep - 1] == "\ufffd":  # an incomplete UTF-8 sequence so far
        keep -= 1
    return text[:keep], False


@dataclass
class _Seq:
    request: ServeRequest
    on_event: Callable[[Delta], None]
    submitted: float
    admitted: float = 0.0
    state: DecodeState | None = None
    stats: DecodeStats = field(default_factory=DecodeStats)
    sent: str = ""  # text already delivered
    version_start: int = 0
    text: IncrementalText | None = None  # its text as the tokens grow (a window a step)


class ServingLoop:
    """Continuous-batching speculative decoding on one thread; see the module doc.

    ``max_batch`` bounds the sequences stepped together (clamped to the engine's own
    ``decoder.max_batch`` where it declares one). ``collector`` (optional) is added to
    the decoder's step observers; ``on_record`` receives each finished request's distill
    record *after* the request's final event was delivered, so logging never delays a
    response. ``on_swap`` receives each :class:`SwapEvent`.
    """

    def __init__(
        self,
        decoder: SpeculativeDecoder,
        *,
        drafter_id: str = "draft",
        collector: RecordCollector | None = None,
        on_record: Callable[[DistillRecord], None] | None = None,
        on_swap: Callable[[SwapEvent], None] | None = None,
        max_batch: int = 32,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if decoder.tokenizer is None:
            raise ValueError("the serving loop needs a decoder with a tokenizer (it returns text)")
        engine_max = getattr(decoder, "max_batch", None)
        if engine_max is not None and max_batch > engine_max:
            log.info("max_batch %d > the engine's %d: using %d", max_batch, engine_max, engine_max)
            max_batch = int(engine_max)
        self.decoder = decoder
        self.drafter_id = drafter_id
        self.collector = collector
        if collector is not None:
            decoder.add_observer(collector)
        self.on_record = on_record
        self.on_swap = on_swap
        self.max_batch = max_batch
        # the loop's thread is the process's compute thread (osd.specdec.threads): it gets
        # the intra-op threads of the thread that made the loop
        self.threads = torch.get_num_threads()
        self._cond = threading.Condition()
        self._inbox: deque[_Seq] = deque()
        self._active: list[_Seq] = []
        self._cancelled: set[str] = set()
        # per part (the drafter, its decision model): the weights offered, not adopted yet
        self._offer: dict[str, tuple[dict[str, torch.Tensor], int, float]] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.swaps: list[SwapEvent] = []
        self.finished = 0
        self.failed = 0
        self.steps = 0  # step_batch calls
        self.stepped = 0  # sequence steps over all of them (mean batch = stepped / steps)

    # -- control ---------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.decoder.drafter.version

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def load(self) -> tuple[int, int]:
        """(active, waiting) sequences."""
        with self._cond:
            return len(self._active), len(self._inbox)

    @property
    def mean_batch(self) -> float:
        """Sequences per ``step_batch`` call so far."""
        return self.stepped / self.steps if self.steps else 0.0

    def start(self) -> ServingLoop:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="osd-serving-loop", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the sequences in flight and the queued ones, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def submit(self, request: ServeRequest, on_event: Callable[[Delta], None]) -> None:
        """Queue ``request``; ``on_event`` is called from the loop thread (keep it quick)."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the serving loop is stopping; retry on another replica")
            self._inbox.append(_Seq(request, on_event, time.perf_counter()))
            self._cond.notify_all()

    def cancel(self, request_id: str) -> None:
        """Drop a request (client gone); no record is logged for it."""
        with self._cond:
            queued = len(self._inbox)
            self._inbox = deque(s for s in self._inbox if s.request.request_id != request_id)
            if len(self._inbox) == queued:  # admitted already (or about to be)
                self._cancelled.add(request_id)
            self._cond.notify_all()

    def offer_weights(
        self, state_dict: dict[str, torch.Tensor], version: int, part: str = "drafter"
    ) -> None:
        """Hand over new weights of ``part`` (the drafter, or one of its versioned
        :meth:`~osd.drafters.base.Drafter.parts`: ``"stop"``, ``"adapter:<domain>"``);
        adopted before the next step (a newer offer of the same part that arrives first
        replaces this one)."""
        self._module(part)  # raises for a part this drafter does not have
        with self._cond:
            self._offer[part] = (state_dict, version, time.perf_counter())
            self._cond.notify_all()

    @property
    def pending_version(self) -> int | None:
        offer = self._offer.get("drafter")
        return None if offer is None else offer[1]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The drafter's weights as served."""
        return self.decoder.drafter.state_dict()

    def part(self, name: str) -> _Part:
        """A view of one swappable part with the loop's own surface (``version``,
        ``pending_version``, ``offer_weights``, ``state_dict``), what a
        :class:`~osd.serving.follow.VersionFollower` follows."""
        self._module(name)
        return _Part(self, name)

    def _module(self, part: str):
        if part == "drafter":
            return self.decoder.drafter
        parts = self.decoder.drafter.parts()
        if part not in parts:
            raise ValueError(f"drafter {self.decoder.drafter.name!r} has no part {part!r}")
        return parts[part].module

    # -- the loop --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            # each time round: a library's first parallel op in this thread may have reset
            # its count to the one last set in another thread (osd/specdec/threads.py)
            threads.compute(self.threads)
            with self._cond:
                while not (self._inbox or self._active or self._offer or self._stopping):
                    self._cond.wait()
                if self._stopping and not self._inbox and not self._active:
                    break
                cancelled, self._cancelled = self._cancelled, set()
                gone = [s for s in self._active if s.request.request_id in cancelled]
                admit = []
                while self._inbox and len(self._active) - len(gone) + len(admit) < self.max_batch:
                    admit.append(self._inbox.popleft())
            for seq in gone:
                self._retire(seq, discard=True)
                log.info("dropped %s: cancelled", seq.request.request_id)
            self._adopt()  # between steps, never inside one
            self._admit([s for s in admit if s.request.request_id not in cancelled])
            if self._active:
                self._step_batch()
        log.info("serving loop stopped after %d requests", self.finished)

    def _adopt(self) -> None:
        with self._cond:
            offers, self._offer = self._offer, {}
        for part, (state_dict, version, offered) in offers.items():
            module = self._module(part)
            previous = module.version
            start = time.perf_counter()
            try:
                module.load_state_dict(state_dict, version)
            except Exception:  # bad weights must not take serving down: keep the old ones
                log.exception("could not adopt %s v%d; keeping v%d", part, version, previous)
                continue
            now = time.perf_counter()
            event = SwapEvent(
                version, previous, now - start, now - offered, len(self._active), part
            )
            self.swaps.append(event)
            log.info(
                "adopted %s v%d (was v%d) in %.1f ms", part, version, previous, 1e3 * event.pause_s
            )
            if self.on_swap is not None:
                self._call(self.on_swap, event)

    def _admit(self, seqs: list[_Seq]) -> None:
        """Start the new sequences with one batched prefill; if that fails (a request the
        engine refuses), start them one by one so only the bad one fails."""
        if not seqs:
            return
        now = time.perf_counter()
        for seq in seqs:
            seq.admitted = now
            seq.version_start = self.version
        reqs = [s.request for s in seqs]
        try:
            states = self.decoder.start_batch(
                [r.prompt_ids for r in reqs],
                [r.max_new_tokens for r in reqs],
                [r.sampling for r in reqs],
                [r.domain for r in reqs],
            )
        except Exception as err:
            if len(seqs) == 1:
                self._fail(seqs[0], err)
            else:
                for seq in seqs:
                    self._admit([seq])
            return
        for seq, state in zip(seqs, states, strict=True):
            seq.state = state
            self._active.append(seq)

    def _step_batch(self) -> None:
        """One ``step_batch`` over every active sequence, then each one's text and events."""
        batch = list(self._active)
        try:
            self.decoder.step_batch([s.state for s in batch], [s.stats for s in batch])
        except Exception as err:  # an engine bug: the whole batch fails, the loop lives on
            log.error("decode step of a batch of %d failed", len(batch), exc_info=err)
            failure = RuntimeError(f"decode step failed: {type(err).__name__}: {err}")
            for seq in batch:
                self._retire(seq, discard=True)
                self._fail(seq, failure, logged=True)
            return
        self.steps += 1
        self.stepped += len(batch)
        for seq in batch:
            self._after_step(seq)

    def _after_step(self, seq: _Seq) -> None:
        state = seq.state
        try:
            if seq.text is None:
                seq.text = IncrementalText(self.decoder.tokenizer)
            text = seq.text.update(state.tokens[state.prompt_len :])
            shown, stopped = visible_text(text, seq.request.stop)
        except Exception as err:
            self._retire(seq, discard=True)
            self._fail(seq, err)
            return
        if stopped:
            state.finished, state.finish_reason = True, "stop"
        elif state.finished:
            shown = text  # nothing can grow any more: deliver what was held back
        delta, seq.sent = shown[len(seq.sent) :], shown
        if not state.finished:
            if delta:
                self._call(seq.on_event, Delta(delta))
            return
        self._retire(seq)
        self._finish(seq, delta)

    def _retire(self, seq: _Seq, discard: bool = False) -> None:
        """Take ``seq`` out of the batch and free its slot (``discard``: its rows too)."""
        self._active.remove(seq)
        if self.collector is not None and discard:
            self.collector.discard(seq.state)
        try:
            self.decoder.release(seq.state)
        except Exception:
            log.exception("could not release the state of %s", seq.request.request_id)

    def _finish(self, seq: _Seq, delta: str) -> None:
        state, req = seq.state, seq.request
        now = time.perf_counter()
        result = RequestResult(
            request_id=req.request_id,
            text=seq.sent,
            token_ids=state.tokens[state.prompt_len :],
            finish_reason=state.finish_reason or "length",
            prompt_tokens=state.prompt_len,
            stats=seq.stats,
            version_start=seq.version_start,
            version_end=self.version,
            queue_s=seq.admitted - seq.submitted,
            latency_s=now - seq.submitted,
            adapter=state.route,
        )
        self.finished += 1
        self._call(seq.on_event, Delta(delta, result=result))  # the response first ...
        if self.collector is None:
            return
        try:  # ... then the record (verifier logits → top-k)
            record = self.collector.finish(
                state, req.request_id, self.drafter_id, seq.version_start, domain=req.domain
            )
        except Exception:
            log.exception("could not build the distill record of %s", req.request_id)
            return
        if record is not None and result.version_start == result.version_end:
            # one version served it all: its live acceptance (the registry's post-swap watch)
            record.meta.setdefault("proposed", int(result.stats.proposed))
            record.meta.setdefault("accepted", int(result.stats.accepted))
        if record is not None and self.on_record is not None:
            self._call(self.on_record, record)

    def _fail(self, seq: _Seq, err: BaseException, logged: bool = False) -> None:
        self.failed += 1
        if not logged and not isinstance(err, ValueError):
            log.error("request %s failed", seq.request.request_id, exc_info=err)
        self._call(seq.on_event, Delta(error=err))

    @staticmethod
    def _call(fn: Callable, arg: object) -> None:
        try:
            fn(arg)
        except Exception:  # a broken callback must not stop the loop
            log.exception("serving-loop callback %r failed", fn)


class _Part:
    """One swappable part of a :class:`ServingLoop`'s drafter (:meth:`ServingLoop.part`)."""

    def __init__(self, loop: ServingLoop, name: str) -> None:
        self.loop, self.name = loop, name

    @property
    def version(self) -> int:
        return self.loop._module(self.name).version

    @property
    def pending_version(self) -> int | None:
        offer = self.loop._offer.get(self.name)
        return None if offer is None else offer[1]

    def offer_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.loop.offer_weights(state_dict, version, self.name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.loop._module(self.name).state_dict()
