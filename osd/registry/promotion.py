"""One promotion flow: publish → gate → promote, and the full weights of any version.

The one-process loop (:mod:`osd.online`) and the registry actor
(``actors/registry_actor.py``) both hand a trainer's export to a :class:`Promoter`:

1. **publish** — :meth:`Registry.publish` validates names, shapes, dtypes, finiteness and
   checksum and stores the candidate (a LoRA adapter with its
   :class:`~osd.distill.lora.LoraSpec`); bad weights never get a version;
2. **gate** — the candidate and the live version are each loaded into a copy of the
   drafter's :class:`~osd.distill.student.Student` and scored on the held-out records
   (:class:`~osd.registry.gate.PromotionGate`: expected acceptance, no target pass);
3. **promote** or **reject** — :meth:`Registry.gate_and_promote` records the verdict;
4. **watch** — after a promotion, :meth:`Promoter.observe_live` feeds live traffic's
   acceptance to a :class:`~osd.registry.watch.PostSwapWatch` and :meth:`Promoter.check_watch`
   rolls the version back when it serves worse than the one it replaced.

:meth:`Promoter.sync` notices a store emptied under the registry (see
:mod:`osd.registry.epochs`) and registers the base again: a new epoch.

What is gated is what is served: both students load :meth:`Promoter.weights`, the full
weights a replica adopts. A LoRA version is merged onto its spec's ``base_version`` from
the registry alone, so replicas and restarted processes need no out-of-band config.

Use (``tests/test_registry.py`` runs this on tiny Llama drafts)::

    registry = Registry()
    promoter = Promoter(registry, "draft", base_student, PromotionGate(margin=0.01))
    snap = trainer.student.export()                  # Snapshot(weights, kind, lora)
    outcome = promoter.submit(snap.weights, snap.kind, {"steps": 16}, holdout, snap.lora)
    if outcome.promoted:
        drafter.load_state_dict(promoter.weights(outcome.version), outcome.version)
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from osd.distill.lora import LoraSpec, merge_adapter
from osd.distill.record import DistillRecord
from osd.distill.student import Student
from osd.registry.gate import PromotionGate
from osd.registry.versions import Registry
from osd.registry.watch import PostSwapWatch

__all__ = ["Outcome", "Promoter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What one :meth:`Promoter.submit` decided, and the numbers behind it."""

    version: int  # the candidate's version
    promoted: bool
    candidate: float  # mean expected acceptance of the candidate
    live: float  # … of the live version on the same positions
    live_version: int  # live before the decision
    records: int
    positions: int
    reason: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Promoter:
    """publish → gate → promote for one drafter id; see the module docstring.

    ``base``: the drafter's student holding the weights of version 0, which the promoter
    registers (if the registry does not hold it yet) and copies for every version it loads;
    it is never trained. ``submit`` calls are serialised.
    """

    def __init__(
        self,
        registry: Registry,
        drafter_id: str,
        base: Student,
        gate: PromotionGate,
        provenance: dict[str, Any] | None = None,
        watch: PostSwapWatch | None = None,
    ) -> None:
        if base.lora is not None:
            raise ValueError("the promoter's base student must hold plain weights, not LoRA")
        self.registry = registry
        self.drafter_id = drafter_id
        self.base = base
        self.gate = gate
        self.watch = watch
        self._provenance = provenance
        registry.register_base(drafter_id, base.module.state_dict(), provenance=provenance)
        self._live: tuple[int, Student] | None = None
        self._lock = threading.Lock()

    def sync(self) -> str:
        """:meth:`Registry.sync`; an emptied store gets the base again (a new epoch)."""
        with self._lock:
            status = self.registry.sync(self.drafter_id)
            if status != "ok":
                self._live = None
                if self.watch is not None:
                    self.watch.reset()
            if status == "emptied":
                state = self.base.module.state_dict()
                self.registry.register_base(self.drafter_id, state, provenance=self._provenance)
        return status

    def observe_live(self, records: list[DistillRecord]) -> int:
        """Feed live acceptance (records whose ``meta`` has ``proposed`` / ``accepted``) to
        the watch; returns how many records counted."""
        if self.watch is None:
            return 0
        n = 0
        for r in records:
            proposed, accepted = r.meta.get("proposed"), r.meta.get("accepted")
            if isinstance(proposed, int) and isinstance(accepted, int):
                self.watch.observe(r.version, proposed, accepted)
                n += 1
        return n

    def check_watch(self) -> dict[str, Any] | None:
        """The watch's verdict on the latest promotion, once it has one: a rollback (the
        version rejected with the numbers, ``by="post-swap watch"``) or a "kept" event.
        Both go into the registry's history; returns the verdict or ``None``."""
        if self.watch is None:
            return None
        with self._lock:
            verdict = self.watch.check(self.registry.live_version(self.drafter_id))
            if verdict is None:
                return None
            out = verdict.to_dict()
            if verdict.rollback:
                self.registry.rollback(
                    self.drafter_id,
                    verdict.reason,
                    {"watch": out},
                    by="post-swap watch",
                )
                self._live = None
            else:
                self.registry.record_event(self.drafter_id, "watch", **out)
        log.log(
            logging.WARNING if verdict.rollback else logging.INFO,
            "%s post-swap watch: %s",
            self.drafter_id,
            verdict.reason,
        )
        return out

    def submit(
        self,
        weights: Mapping[str, Tensor] | bytes,
        kind: str,
        provenance: dict[str, Any],
        records: list[DistillRecord],
        lora: LoraSpec | Mapping[str, Any] | None = None,
        checksum: str | None = None,
    ) -> Outcome:
        """Publish a candidate, gate it against the live version on ``records``, and
        promote or reject it. Raises (and stores nothing) when the weights are invalid."""
        with self._lock:
            live = self.registry.live_version(self.drafter_id)
            info = self.registry.publish(
                self.drafter_id,
                weights,
                provenance,
                checksum=checksum,
                kind=kind,
                parent=live,
                lora=lora,
            )
            try:
                candidate = self.student(info.version)
            except Exception as err:  # e.g. an adapter that does not fit: never a candidate
                self.registry.reject(self.drafter_id, info.version, f"cannot load: {err}")
                raise
            decision = self.registry.gate_and_promote(
                self.drafter_id,
                info.version,
                self.gate,
                candidate,
                self._live_student(live),
                records,
            )
            if decision.promote:
                self._live = (info.version, candidate)
                if self.watch is not None:
                    self.watch.start(info.version, previous=live)
        log.info(
            "%s v%d %s: %s",
            self.drafter_id,
            info.version,
            "promoted" if decision.promote else "rejected",
            decision.reason,
        )
        return Outcome(
            info.version,
            decision.promote,
            decision.candidate,
            decision.live,
            live,
            decision.records,
            decision.positions,
            decision.reason,
            info.provenance,
        )

    def weights(self, version: int) -> dict[str, Tensor]:
        """Full weights of ``version`` under the base module's names (what a drafter's
        ``load_state_dict`` takes): stored as is, or a LoRA adapter merged onto its base."""
        live = self._live
        if live is not None and live[0] == version:
            return {k: v.detach().clone() for k, v in live[1].module.state_dict().items()}
        info = self.registry.info(self.drafter_id, version)
        stored = self.registry.weights(self.drafter_id, version)
        spec = info.lora_spec
        if spec is None:
            return stored
        module = copy.deepcopy(self.base.module)
        module.load_state_dict(self.weights(spec.base_version))
        return merge_adapter(module, stored, spec, self.base.lora_task_type)

    def student(self, version: int) -> Student:
        """A copy of the base student holding ``version``'s full weights, in eval mode."""
        student = copy.deepcopy(self.base)
        student.load_weights(self.weights(version))
        student.module.eval()
        return student

    def _live_student(self, live: int) -> Student:
        if self._live is None or self._live[0] != live:  # first use, or rolled back
            self._live = (live, self.student(live))
        return self._live[1]
