"""The promotion gate: promote a candidate draft only if it is accepted as often as the live.

The expected acceptance of a draft at a logged position is
``Σ_x min(p(x), q(x)) = 1 − TVD(p, q)`` (:func:`osd.distill.losses.expected_acceptance`, on
the top-k + tail support). The record holds ``q``; ``p`` comes from ONE forward of the draft
over the record's token ids (logits at index ``t − 1`` predict token ``t``), so the target
never runs. :class:`PromotionGate` averages it over every logged position of held-out
records, for the candidate and for the live draft, and promotes iff
``candidate ≥ live − margin`` on at least ``min_records`` records;
:meth:`osd.registry.Registry.gate_and_promote` records the verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from osd.distill.losses import SparseTarget, expected_acceptance
from osd.distill.record import DistillRecord, validate

__all__ = [
    "AcceptanceEstimate",
    "GateDecision",
    "PromotionGate",
    "draft_acceptance",
    "sparse_target",
]


def sparse_target(record: DistillRecord) -> SparseTarget:
    """A record's logged top-k + tail as a :class:`SparseTarget` ([m, k], [m, k], [m])."""
    return SparseTarget(
        topk_ids=torch.as_tensor(record.topk_ids, dtype=torch.long),
        topk_logprobs=torch.as_tensor(record.topk_logprobs, dtype=torch.float32),
        tail_logmass=torch.as_tensor(record.tail_logmass, dtype=torch.float32),
    )


@dataclass(frozen=True)
class AcceptanceEstimate:
    """Mean expected acceptance of one draft over the logged positions of some records."""

    mean: float  # over positions; 0.0 when there are none
    positions: int
    records: int  # records with at least one logged position


@torch.no_grad()
def draft_acceptance(
    model: torch.nn.Module, records: list[DistillRecord], temperature: float = 1.0
) -> AcceptanceEstimate:
    """Run only the draft ``model`` (an HF causal LM) once per record and average
    ``Σ min(p, q)`` over all logged positions.

    A record with tokens ``[5, 9, 2, 7]``, prompt 2, positions ``[2, 3]`` takes logits rows
    1 and 2 of ``model([[5, 9, 2, 7]])`` (they predict tokens 2 and 7) against its top-k.
    """
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, positions, used = 0.0, 0, 0
    try:
        for record in records:
            validate(record, vocab)
            if record.num_positions == 0:
                continue
            ids = torch.as_tensor(record.token_ids, dtype=torch.long, device=device)[None]
            logits = model(ids).logits[0]  # [T, V]
            rows = torch.as_tensor(record.positions, dtype=torch.long, device=device) - 1
            acc = expected_acceptance(
                logits[rows].float().cpu(), sparse_target(record), temperature
            )
            total += float(acc.double().sum())  # acc: [m]
            positions += record.num_positions
            used += 1
    finally:
        model.train(was_training)
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
        candidate_model: torch.nn.Module,
        live_model: torch.nn.Module,
        records: list[DistillRecord],
        temperature: float = 1.0,
    ) -> GateDecision:
        cand = draft_acceptance(candidate_model, records, temperature)
        live = draft_acceptance(live_model, records, temperature)
        if cand.records < self.min_records:
            ok = False
            reason = (
                f"{cand.records} records with logged positions; the gate needs {self.min_records}"
            )
        else:
            ok = cand.mean >= live.mean - self.margin
            sign = ">=" if ok else "<"
            reason = (
                f"acceptance {cand.mean:.4f} {sign} live {live.mean:.4f} - margin {self.margin} "
                f"over {cand.positions} positions of {cand.records} records"
            )
        return GateDecision(ok, cand.mean, live.mean, cand.records, reason, cand.positions)
