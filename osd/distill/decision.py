"""The early-stop decision model as a student: trained from the buffer, gated, versioned.

The decision model (:class:`osd.specdec.decision.AcceptPredictor`) predicts whether the
next draft token will be accepted. A replica learns it locally from its own verifications;
to serve it like any other weights — one version for every replica, gated before it goes
live, hot-swapped between steps — it is also a :class:`~osd.distill.student.Student`:

- its records are the ordinary distill records: the collector logs each drafted position's
  features and its verification label (``DistillRecord.stop_features`` / ``stop_labels``),
  and a trainer reading the drafter's stream with a consumer group of its own sees them all;
- :meth:`DecisionStudent.predict` returns, per record, the acceptance logits ``[n, 1]`` of
  its labelled positions; the objective is binary cross-entropy (:class:`StopObjective`);
- the gate scores a version by the **geometric-mean likelihood** of the held-out labels,
  ``exp(mean log p(label))`` with ``p`` for an accepted position and ``1 − p`` for a
  rejected one — ``exp(−BCE)``, a proper score (a plain mean of ``p`` would reward
  overconfident models); in ``[0, 1]``, higher is better, so the registry's
  "candidate ≥ live − margin" rule holds unchanged.

Its registry id is the drafter's id with :data:`SUFFIX` (:func:`decision_id`).

>>> from osd.specdec.decision import AcceptPredictor
>>> s = DecisionStudent(AcceptPredictor().net, vocab_size=64)
>>> decision_id("draft"), sorted(s.module.state_dict())[:2]
('draft-stop', ['0.bias', '0.weight'])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from osd.distill.record import DistillRecord
from osd.distill.student import Objective, Student

if TYPE_CHECKING:
    from osd.distill.config import DistillConfig
    from osd.registry.gate import AcceptanceEstimate

__all__ = ["SUFFIX", "DecisionStudent", "StopObjective", "decision_id"]

SUFFIX = "-stop"


def decision_id(drafter_id: str) -> str:
    """The registry / buffer id of ``drafter_id``'s decision model."""
    return f"{drafter_id}{SUFFIX}"


def _labels(record: DistillRecord) -> Tensor:
    if record.stop_labels is None:
        return torch.zeros(0)
    return torch.as_tensor(record.stop_labels, dtype=torch.float32)


class StopObjective(Objective):
    """Binary cross-entropy of the acceptance logits against the verification labels."""

    def loss(self, logits: Sequence[Tensor], records: Sequence[DistillRecord]) -> Tensor:
        out = [
            nn.functional.binary_cross_entropy_with_logits(
                lg[:, 0], _labels(r).to(lg.device), reduction="none"
            )
            for lg, r in zip(logits, records, strict=True)
            if lg.shape[0]
        ]
        return torch.cat(out) if out else torch.zeros(0)


class DecisionStudent(Student):
    """A decision model's network (``[n, 4]`` → ``[n, 1]``) under the student contract."""

    gate_metric = "stop-likelihood"

    def __init__(self, net: nn.Module, vocab_size: int) -> None:
        """``vocab_size``: the target's (what the records' token ids are checked against)."""
        super().__init__(net, vocab_size)

    def predictable(self, record: DistillRecord, max_len: int | None = None) -> int:
        return 0 if record.stop_labels is None else len(record.stop_labels)

    def predict(self, records: Sequence[DistillRecord], max_len: int | None = None) -> list[Tensor]:
        """Per record, the acceptance logits ``[n, 1]`` of its ``n`` labelled positions."""
        dev = self.device
        out = []
        for r in records:
            if r.stop_features is None:
                out.append(torch.zeros(0, 1, device=dev))
                continue
            x = torch.as_tensor(r.stop_features, dtype=torch.float32, device=dev)
            out.append(self.module(x))
        return out

    def objective(self, config: DistillConfig) -> Objective:
        return StopObjective()

    @torch.no_grad()
    def gate_estimate(self, records: list[DistillRecord]) -> AcceptanceEstimate:
        """Geometric-mean likelihood of the held-out labels (module docstring)."""
        from osd.registry.gate import AcceptanceEstimate

        was = self.module.training
        self.module.eval()
        try:
            bce = StopObjective().loss(self.predict(records), records)  # [n] per label
        finally:
            self.module.train(was)
        used = sum(1 for r in records if self.predictable(r))
        n = bce.numel()
        return AcceptanceEstimate(math.exp(-float(bce.double().mean())) if n else 0.0, n, used)
