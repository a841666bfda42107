"""The promotion gate: promote a candidate draft only if it is accepted as often as the live.

The expected acceptance of a draft at a logged position is
``Σ_x min(p(x), q(x)) = 1 − TVD(p, q)`` (:func:`osd.distill.losses.expected_acceptance`, on
the top-k + tail support). The record holds ``q``; ``p`` comes from the drafter's
:class:`~osd.distill.student.Student` — ``student.predict(records)``, e.g. one forward of a
draft model over the record's token ids — so the target never runs and the gate works for
any drafter that registers a student. :class:`PromotionGate` averages it over every
predicted position of held-out records, for the candidate and for the live version, and
promotes iff ``candidate ≥ live − margin`` on at least ``min_records`` records;
:meth:`osd.registry.Registry.gate_and_promote` records the verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from osd.distill.losses import expected_acceptance
from osd.distill.record import DistillRecord, validate
from osd.distill.student import Student, distill_temperature, sparse_target

__all__ = [
    "AcceptanceEstimate",
    "GateDecision",
    "PromotionGate",
    "draft_acceptance",
    "sparse_target",
]


@dataclass(frozen=True)
class AcceptanceEstimate:
    """Mean expected acceptance of one draft over the logged positions of some records."""

    mean: float  # over positions; 0.0 when there are none
    positions: int
    records: int  # records with at least one logged position


@torch.no_grad()
def draft_acceptance(
    student: Student, records: list[DistillRecord], chunk: int = 8
) -> AcceptanceEstimate:
    """Average ``Σ min(p, q)`` over the positions ``student`` predicts in ``records``,
    ``chunk`` records per :meth:`~osd.distill.student.Student.predict` call, each record
    at its request's temperature (:func:`~osd.distill.student.distill_temperature`:
    greedy traffic at T = 1).

    A record with tokens ``[5, 9, 2, 7]``, prompt 2, positions ``[2, 3]`` is scored with a
    causal-LM student's logits rows 1 and 2 of ``model([[5, 9, 2]])`` (they predict tokens
    2 and 7) against its top-k.
    """
    module = student.module
    was_training = module.training
    module.eval()
    total, positions, used = 0.0, 0, 0
    try:
        for lo in range(0, len(records), chunk):
            batch = records[lo : lo + chunk]
            for record in batch:
                validate(record, student.vocab_size)
            for logits, record in zip(student.predict(batch), batch, strict=True):  # [n, V]
                n = logits.shape[0]
                if n == 0:
                    continue
                target = student.sparse_target(record, n)
                temperature = distill_temperature(record)
                acc = expected_acceptance(logits.float().cpu(), target, temperature)  # [n]
                total += float(acc.double().sum())
                positions += n
                used += 1
    finally:
        module.train(was_training)
    return AcceptanceEstimate(total / positions if positions else 0.0, positions, used)


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict and the numbers behind it."""

    promote: bool
    candidate: float  # mean expected acceptance of the candidate
    live: float  # … of the live draft on the same positions
    records: int
    reason: str
    positions: int = 0

    def evaluation(self) -> dict[str, Any]:
        """What :meth:`Registry.gate_and_promote` records in ``VersionInfo.evaluation``."""
        return {
            "acceptance": self.candidate,
            "live_acceptance": self.live,
            "records": self.records,
            "positions": self.positions,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class PromotionGate:
    """Promote iff ``candidate ≥ live − margin`` measured on ``≥ min_records`` records.

    A negative ``margin`` demands a strict improvement of ``|margin|``.
    """

    margin: float = 0.0
    min_records: int = 1

    def __post_init__(self) -> None:
        if not math.isfinite(self.margin):
            raise ValueError(f"margin must be finite, got {self.margin}")
        if isinstance(self.min_records, bool) or not isinstance(self.min_records, int):
            raise ValueError(f"min_records must be an int, got {self.min_records!r}")
        if self.min_records < 1:
            raise ValueError(f"min_records must be >= 1, got {self.min_records}")

    def evaluate(
        self,
        candidate: Student,
        live: Student,
        records: list[DistillRecord],
    ) -> GateDecision:
        """Score the candidate's and the live version's students on the same records."""
        cand = candidate.gate_estimate(records)  # draft_acceptance unless the student says
        now = live.gate_estimate(records)
        if cand.records < self.min_records:
            ok = False
            reason = (
                f"{cand.records} records with logged positions; the gate needs {self.min_records}"
            )
        else:
            ok = cand.mean >= now.mean - self.margin
            sign = ">=" if ok else "<"
            reason = (
                f"{candidate.gate_metric} {cand.mean:.4f} {sign} live {now.mean:.4f} - margin "
                f"{self.margin} "
                f"over {cand.positions} positions of {cand.records} records"
            )
        return GateDecision(ok, cand.mean, now.mean, cand.records, reason, cand.positions)
