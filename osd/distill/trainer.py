"""The online trainer: pull logged records from the buffer, distil a student, publish (DESIGN §4).

Terms:

- **record**: one finished request (``osd.distill.record``): token ids, the logged
  positions ``t`` and the target's top-``k`` + tail mass at each.
- **student**: what the drafter trains (:mod:`osd.distill.student`): a module, its
  predictions at a record's logged positions, its objective. The trainer never assumes a
  causal LM: only the student's forward runs (the target's part is in the record).
- **step**: one optimiser update on up to ``batch_records`` records:
  ``objective.loss(student.predict(records), records)`` averaged over the positions, then
  ``objective.after_step`` (an objective's own network, e.g. a discriminator). A record is
  **acked only after the optimiser step that consumed it** (at-least-once): a trainer that
  dies mid-step leaves its records pending, and another trainer
  :meth:`~SampleBuffer.reclaim` s them once they have been idle ``reclaim_idle_ms``.
- **publish**: hand :meth:`Student.export` to the registry, every ``publish_every_steps``
  steps or ``publish_every_s`` seconds, whichever comes first.
- **rehearsal** (``replay > 0``): each step also trains on ``replay`` records drawn from a
  reservoir of earlier ones (uniform over everything trained on, ``replay_size`` kept;
  Vitter's algorithm R), so a domain the traffic leaves is not forgotten by the time it
  comes back. Rehearsed records were acked long ago; only the new ones are acked.

Full fine-tune trains every parameter of the student's module; ``lora=True`` wraps it with
PEFT LoRA adapters on top of registry version ``base_version`` and trains only those (the
caller's module is modified in place by PEFT). :meth:`Student.export` gives what a registry
stores (the full ``state_dict``, or the adapter with its :class:`~osd.distill.lora.LoraSpec`).
The distiller is not thread-safe: export between steps (the ``on_publish`` callback of
:meth:`OnlineDistiller.run` does).

This module imports neither Ray nor Redis: the buffer is injected (``osd.buffer.base``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from osd.buffer.base import Entry, SampleBuffer
from osd.distill.config import DistillConfig
from osd.distill.record import DistillRecord, RecordError, decode
from osd.distill.student import Student

__all__ = ["DistillConfig", "OnlineDistiller", "StepReport"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepReport:
    """What one :meth:`OnlineDistiller.step` did."""

    step: int  # optimiser steps so far (unchanged when the batch had no usable position)
    loss: float  # mean over the batch's positions, before the update; nan when none
    records: int  # valid records consumed (and acked)
    positions: int  # logged positions trained on
    skipped: int  # malformed entries acked and dropped
    seconds: float  # wall time of the step, budget sleep excluded
    waited_s: float = 0.0  # sleep spent respecting max_steps_per_s
    reclaimed: int = 0  # entries taken over from an idle (dead) consumer
    replayed: int = 0  # earlier records rehearsed in this step (config.replay)


class OnlineDistiller:
    """Distil one student from its drafter's record stream; see the module docstring.

    ``student``: built by name with :func:`osd.drafters.build_student` (its module is
    trained in place). ``base_version``: the registry version the student's weights come
    from (a LoRA adapter records it in its spec). ``clock`` / ``sleep``: injectable for
    tests (publish timer and compute budget). ``stream``: the buffer stream to read
    (default ``drafter_id``'s). ``busy``: a probe of the node's load (spare compute only:
    :class:`osd.distill.budget.NodeLoad`; used when ``config.yield_cpu`` is set).
    """

    def __init__(
        self,
        student: Student,
        buffer: SampleBuffer,
        drafter_id: str,
        config: DistillConfig | None = None,
        base_version: int = 0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        stream: str | None = None,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        if not isinstance(drafter_id, str) or not drafter_id:
            raise ValueError(f"drafter_id must be a non-empty string, got {drafter_id!r}")
        if not isinstance(student, Student):
            raise TypeError(
                f"OnlineDistiller trains a Student, got {type(student).__name__}; build one "
                "with osd.drafters.build_student(name, drafter)"
            )
        self.config = config = config or DistillConfig()
        self.student = student
        self.buffer = buffer
        self.drafter_id = drafter_id
        # the buffer stream it reads: the drafter's own, or (a decision model, which learns
        # from fields of the drafter's records) another's, read through its own group
        self.stream = stream or drafter_id
        # spare compute: "is the node busy with serving?" (osd.distill.budget.NodeLoad)
        self.busy = busy
        self.yielded_s = 0.0  # waited for spare compute, in total
        self.clock = clock
        self.sleep = sleep
        if config.lora:
            student.add_lora(config.lora_spec(base_version))
        else:
            student.module.requires_grad_(True)
        self.objective = student.objective(config)
        params = student.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            params, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.steps = 0
        self.records_seen = 0
        self.positions_seen = 0
        self.skipped = 0
        self.publishes = 0
        self._published_step = 0
        self._published_at = clock()
        self._last_update_at = -math.inf
        self._reservoir: list[DistillRecord] = []  # rehearsal (config.replay)
        self._offered = 0  # records offered to the reservoir so far
        self._rng = random.Random(0)
        log.info(
            "distiller for %r (%s): %s, loss %s, lr %g, %d trainable parameters",
            drafter_id,
            type(student).__name__,
            "LoRA" if config.lora else "full fine-tune",
            config.loss,
            config.learning_rate,
            sum(p.numel() for p in params),
        )

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> StepReport | None:
        """Pull up to ``batch_records`` records, take one optimiser step, then ack them.

        Returns ``None`` when the buffer had no valid record. Malformed entries are logged,
        acked and skipped. Exceptions from the forward/backward/optimiser propagate and
        leave the batch pending (it is redelivered, to this consumer or by reclaim).
        """
        waited = self._respect_budget()
        start = self.clock()
        entries, reclaimed = self._pull()
        if not entries:
            return None
        records, ids, skipped = self._decode(entries)
        if not records:
            return None
        rehearsed = self._rehearse()
        batch = records + rehearsed
        n_pos = sum(self.student.predictable(r, self.config.max_len) for r in batch)
        loss = float("nan")
        if n_pos:
            self._last_update_at = start
            loss = self._update(batch)
        self.buffer.ack(self.stream, ids)  # only after the optimiser step
        self._remember(records)
        self.records_seen += len(records)
        self.positions_seen += n_pos
        if n_pos == 0:
            log.debug("%d records with no position within max_len: acked", len(records))
        report = StepReport(
            step=self.steps,
            loss=loss,
            records=len(records),
            positions=n_pos,
            skipped=skipped,
            seconds=self.clock() - start,
            waited_s=waited,
            reclaimed=reclaimed,
            replayed=len(rehearsed),
        )
        log.debug("step %s", report)
        return report

    def _rehearse(self) -> list[DistillRecord]:
        """``config.replay`` records from the reservoir (fewer while it is smaller)."""
        n = min(self.config.replay, len(self._reservoir))
        return self._rng.sample(self._reservoir, n) if n else []

    def _remember(self, records: list[DistillRecord]) -> None:
        """Offer the step's new records to the reservoir (each kept with probability
        ``replay_size / offered``: a uniform sample of all of them)."""
        if not self.config.replay:
            return
        for record in records:
            self._offered += 1
            if len(self._reservoir) < self.config.replay_size:
                self._reservoir.append(record)
            else:
                j = self._rng.randrange(self._offered)
                if j < self.config.replay_size:
                    self._reservoir[j] = record

    def _respect_budget(self) -> float:
        """Sleep until ``1 / max_steps_per_s`` has passed since the last update began, then,
        with a ``busy`` probe and ``yield_cpu`` set, while the node is busy (at most
        ``yield_max_s``: spare compute first, progress under constant load)."""
        waited = 0.0
        if self.config.max_steps_per_s is not None:
            wait = self._last_update_at + 1.0 / self.config.max_steps_per_s - self.clock()
            if wait > 0:
                self.sleep(wait)
                waited += wait
        if self.busy is not None and self.config.yield_cpu is not None:
            start = self.clock()
            while self.clock() - start < self.config.yield_max_s and self.busy():
                self.sleep(0.05)
            self.yielded_s += self.clock() - start
            waited += self.clock() - start
        return waited

    def _pull(self) -> tuple[list[Entry], int]:
        """Entries of a dead consumer first (reclaim), then this consumer's own and new ones."""
        n = self.config.batch_records
        out = self.buffer.reclaim(self.stream, self.config.reclaim_idle_ms, n)
        reclaimed = len(out)
        if reclaimed:
            log.info("reclaimed %d idle entries of %r", reclaimed, self.drafter_id)
        if len(out) < n:
            seen = {e.id for e in out}  # read() re-serves own pending: reclaimed ones too
            out += [e for e in self.buffer.read(self.stream, n - len(out)) if e.id not in seen]
        return out, reclaimed

    def _decode(self, entries: Sequence[Entry]) -> tuple[list[DistillRecord], list[str], int]:
        """Valid records and the ids to ack after the step; malformed ones are acked now."""
        records, ids, bad = [], [], []
        for entry in entries:
            try:
                records.append(decode(entry.data, self.student.vocab_size))
                ids.append(entry.id)
            except RecordError as err:
                log.warning(
                    "dropping malformed record %s of %r: %s", entry.id, self.drafter_id, err
                )
                bad.append(entry.id)
        if bad:  # poison entries: never redeliver them
            self.buffer.ack(self.stream, bad)
            self.skipped += len(bad)
        return records, ids, len(bad)

    def _update(self, records: list[DistillRecord]) -> float:
        cfg = self.config
        self.student.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.student.predict(records, cfg.max_len)  # per record [n, V]
        loss = self.objective.loss(logits, records).mean()  # over all positions
        if not torch.isfinite(loss):
            # A diverged draft or a poison batch: no update, but ack (the caller does) so
            # the batch is not redelivered forever.
            log.warning(
                "non-finite loss %s on %d records; update skipped", loss.item(), len(records)
            )
            return float(loss.item())
        loss.backward()
        if cfg.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.objective.after_step([lg.detach() for lg in logits], records)
        self.steps += 1
        return float(loss.item())

    # ---- publishing ----------------------------------------------------------------------

    def should_publish(self) -> bool:
        """At least one step since the last publish, and M steps or T seconds have passed."""
        since = self.steps - self._published_step
        if since < 1:
            return False
        cfg = self.config
        by_steps = cfg.publish_every_steps is not None and since >= cfg.publish_every_steps
        by_time = (
            cfg.publish_every_s is not None
            and self.clock() - self._published_at >= cfg.publish_every_s
        )
        return by_steps or by_time

    def mark_published(self) -> None:
        """Restart the publish timer and step count (call after a successful publish)."""
        self._reset_publish_timer()
        self.publishes += 1

    def _reset_publish_timer(self) -> None:
        self._published_step = self.steps
        self._published_at = self.clock()

    def provenance(self, trainer: str) -> dict[str, object]:
        """What a published version records about where it came from."""
        return {
            "trainer": trainer,
            "steps": self.steps,
            "records_seen": self.records_seen,
            "loss": self.config.loss,
        }

    # ---- loop ----------------------------------------------------------------------------

    def run(
        self,
        max_steps: int | None = None,
        until: float | Callable[[], bool] | None = None,
        idle_sleep_s: float = 0.05,
        on_publish: Callable[[OnlineDistiller], None] | None = None,
    ) -> int:
        """Step until ``max_steps`` optimiser steps were taken, or ``until`` (a deadline on
        :attr:`clock`, or a predicate returning True to stop); returns the steps taken.

        After each step, when :meth:`should_publish`, calls ``on_publish(self)`` (which
        exports ``self.student`` and hands the weights to the registry) and then
        :meth:`mark_published`. A failing ``on_publish`` is logged and retried at the next
        trigger; training goes on.
        """
        first = self.steps

        def done() -> bool:
            if max_steps is not None and self.steps - first >= max_steps:
                return True
            if until is None:
                return False
            return until() if callable(until) else self.clock() >= until

        while not done():
            if self.step() is None:
                self.sleep(idle_sleep_s)
                continue
            if on_publish is not None and self.should_publish():
                try:
                    on_publish(self)
                except Exception:
                    log.exception("publishing %r at step %d failed", self.drafter_id, self.steps)
                    self._reset_publish_timer()
                else:
                    self.mark_published()
        return self.steps - first
