"""The weight registry: versioned drafter weights, validated before any of them goes live.

Terms:

- **drafter id**: names one drafter, 1–64 characters from ``A-Z a-z 0-9 _ . -`` starting
  with a letter or digit. It becomes a directory name or a key, so nothing else is accepted.
- **version**: an int per drafter; ``0`` is the **base** registered first, then 1, 2, …
  in publish order. Each has a :class:`VersionInfo`: kind (``"full"`` weights or a
  ``"lora"`` adapter), checksum, provenance, evaluation and **status**::

      candidate --promote--> live --(another is promoted)--> retired --promote--> live
      candidate / retired --reject--> rejected       live --rollback--> rejected

- **reference**: per kind, the tensor names, shapes and dtypes (:class:`TensorSpec`) every
  version of that kind must have: the base for its own kind; for the other kind a spec
  given to :meth:`Registry.register_base`, else the first version published of that kind.
- **canonical bytes**: ``safetensors`` bytes of the contiguous CPU tensors in name order
  (:func:`weights_to_bytes`); the **checksum** is their sha256. Weights are never pickled:
  they come from other processes and machines, and ``safetensors`` holds only data.
- **live history**: the versions that were live before the current one, newest last;
  :meth:`Registry.rollback` goes back one step.

Publishing checks, before anything is stored, that the names equal the reference's, that
shapes and dtypes match, that every float is finite and that the checksum (when given)
matches. A failure raises :class:`WeightValidationError` naming the tensor and changes
nothing. Loading re-checks the checksum, so a corrupted file is caught, not served.

Worked example (one 2×2 tensor; ``v1`` ones, then a wrong shape)::

    >>> reg = Registry(MemoryStore())
    >>> reg.register_base("draft-a", {"w": torch.zeros(2, 2)}).status
    'live'
    >>> v1 = reg.publish("draft-a", {"w": torch.ones(2, 2)}, provenance={"steps": 10})
    >>> v1.version, v1.status, reg.live_version("draft-a")
    (1, 'candidate', 0)
    >>> reg.promote("draft-a", 1).status, reg.live_version("draft-a")
    ('live', 1)
    >>> reg.rollback("draft-a").version, reg.info("draft-a", 1).status
    (0, 'rejected')
    >>> reg.publish("draft-a", {"w": torch.ones(2, 3)})
    Traceback (most recent call last):
    ...
    osd.registry.weights.WeightValidationError: draft-a v2 (full): tensor 'w' has shape [2, 3]; the reference has [2, 2]

Modules: :mod:`osd.registry.weights` (canonical bytes, checksums, reference checks),
:mod:`osd.registry.store` (metadata, and the memory and disk stores) and :mod:`osd.registry.gate`
(the promotion gate: candidate vs live expected acceptance on held-out records). Their
public names are re-exported here.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
from collections.abc import Mapping
from typing import Any

import torch  # noqa: F401  (the module doctest uses it)
from torch import Tensor

from osd.distill.lora import LoraSpec
from osd.distill.record import DistillRecord
from osd.distill.student import Student
from osd.registry.epochs import EpochMixin
from osd.registry.gate import (
    GateDecision,
    PromotionGate,
)
from osd.registry.store import (
    DrafterMeta,
    MemoryStore,
    RegistryError,
    RegistryStore,
    VersionInfo,
    _check_json,
    _check_kind,
    _check_version,
    check_drafter_id,
)
from osd.registry.weights import (
    TensorSpec,
    WeightValidationError,
    check_lora_adapter,
    check_weights,
    checksum,
    spec_of,
    weights_from_bytes,
    weights_to_bytes,
)

__all__ = ["Registry"]  # the package (osd.registry) exports the rest

logger = logging.getLogger(__name__)

_checksum_of = checksum  # for `Registry.publish`, whose parameter `checksum` shadows it


class Registry(EpochMixin):
    """Per drafter id, an ordered list of validated versions and a live pointer.

    Metadata is cached in memory and written through to the store on every change; the
    store write happens first, so a failed write leaves the registry as it was. Epochs,
    the persisted history and recovery from an emptied store: :class:`EpochMixin`.
    """

    def __init__(self, store: RegistryStore | None = None) -> None:
        self.store: RegistryStore = MemoryStore() if store is None else store
        self._meta: dict[str, DrafterMeta] = {}
        self._lock = threading.RLock()
        self._fresh: set[str] = set()  # epoch started or loaded here, nothing promoted since
        self._lost: dict[str, dict[str, Any]] = {}  # drafter → live ref of an emptied store

    # -- reading
    def _get(self, drafter_id: str) -> DrafterMeta:
        check_drafter_id(drafter_id)
        meta = self._meta.get(drafter_id)
        if meta is None:
            meta = self.store.get_meta(drafter_id)
            if meta is None:
                known = self.drafters()
                raise RegistryError(f"unknown drafter {drafter_id!r}; registered: {known}")
            self._meta[drafter_id] = meta
            self._fresh.add(drafter_id)
        return meta

    def drafters(self) -> list[str]:
        return sorted(set(self.store.drafter_ids()) | set(self._meta))

    def info(self, drafter_id: str, version: int) -> VersionInfo:
        with self._lock:
            return copy.deepcopy(self._get(drafter_id).info(version))

    def versions(self, drafter_id: str) -> list[VersionInfo]:
        with self._lock:
            return copy.deepcopy(self._get(drafter_id).versions)

    def live(self, drafter_id: str) -> VersionInfo:
        with self._lock:
            meta = self._get(drafter_id)
            return copy.deepcopy(meta.info(meta.live))

    def live_version(self, drafter_id: str) -> int:
        """The live version number: a dict lookup once cached, cheap enough to poll."""
        with self._lock:
            return self._get(drafter_id).live

    def weight_bytes(self, drafter_id: str, version: int | None = None) -> bytes:
        """Stored bytes of ``version`` (default: live), checksum re-verified."""
        with self._lock:
            meta = self._get(drafter_id)
            info = meta.info(meta.live if version is None else version)
        data = self.store.get_weights(drafter_id, info.version)
        got = checksum(data)
        if got != info.checksum:
            raise WeightValidationError(
                f"{drafter_id} v{info.version}: stored weights fail their checksum "
                f"(expected {info.checksum[:16]}…, got {got[:16]}…); the stored copy is "
                "corrupted — reject this version or publish it again"
            )
        return data

    def weights(self, drafter_id: str, version: int | None = None) -> dict[str, Tensor]:
        """The tensors of ``version`` (default: live) on CPU, checksum re-verified."""
        return weights_from_bytes(self.weight_bytes(drafter_id, version))

    # -- writing
    def _commit(self, meta: DrafterMeta) -> None:
        self.store.put_meta(meta.drafter_id, meta)
        self._meta[meta.drafter_id] = meta

    def register_base(
        self,
        drafter_id: str,
        state_dict: Mapping[str, Tensor],
        provenance: dict[str, Any] | None = None,
        lora_reference: Mapping[str, Tensor | TensorSpec] | None = None,
    ) -> VersionInfo:
        """Register version 0 (live, full weights) and the ``"full"`` reference.

        ``lora_reference`` (a LoRA adapter state dict or specs) fixes the ``"lora"``
        reference; without it the first ``"lora"`` version published does. Registering
        again with identical weights returns the existing base; different weights raise.
        """
        check_drafter_id(drafter_id)
        kind = "full"
        what = f"{drafter_id} v0 ({kind})"
        check_weights(state_dict, None, what)
        data = weights_to_bytes(state_dict)
        with self._lock:
            try:
                old = self._get(drafter_id).info(0)
            except RegistryError:
                old = None
            info = VersionInfo(drafter_id, 0, kind, checksum(data), provenance or {}, status="live")
            if old is not None:
                if (old.checksum, old.kind) == (info.checksum, info.kind):
                    return copy.deepcopy(old)
                raise RegistryError(
                    f"drafter {drafter_id!r} is already registered with a different base "
                    f"(kind {old.kind}, checksum {old.checksum[:16]}…); use another id"
                )
            refs = {kind: spec_of(state_dict)}
            if lora_reference is not None:
                refs["lora"] = spec_of(lora_reference)
            meta = DrafterMeta(drafter_id, [], live=0, references=refs)
            info = dataclasses.replace(info, epoch=meta.epoch)
            meta.versions.append(info)
            meta.add_event("epoch", started="register_base", base=info.ref())
            lost = self._lost.pop(drafter_id, None)
            if lost is not None:
                meta.add_event("epoch", started="store emptied", lost_live=lost)
            self.store.put_weights(drafter_id, 0, data)
            self._commit(meta)
            self._fresh.add(drafter_id)
        logger.info(
            "registered %s v0 (%s, %d tensors), epoch %s",
            drafter_id,
            kind,
            len(state_dict),
            meta.epoch,
        )
        return copy.deepcopy(info)

    def publish(
        self,
        drafter_id: str,
        weights: Mapping[str, Tensor] | bytes,
        provenance: dict[str, Any] | None = None,
        checksum: str | None = None,
        kind: str = "full",
        parent: int | None = None,
        lora: LoraSpec | Mapping[str, Any] | None = None,
    ) -> VersionInfo:
        """Validate ``weights`` against the reference of ``kind`` and store them as the next
        version, a ``"candidate"``. ``checksum`` (sha256 hex) may be of the bytes sent or of
        their canonical form. A ``"lora"`` adapter needs its ``lora`` spec, whose
        ``base_version`` must be a ``"full"`` version of this drafter. Raises
        :class:`WeightValidationError` (or ``ValueError`` / :class:`RegistryError` for the
        spec); nothing changes then.
        """
        _check_kind(kind)
        prov = _check_json("provenance", provenance or {})
        if isinstance(lora, Mapping):
            lora = LoraSpec.from_dict(lora)
        with self._lock:
            meta = copy.deepcopy(self._get(drafter_id))
            version = meta.versions[-1].version + 1
            if parent is not None:
                meta.info(_check_version(parent))
            if lora is not None:
                base = meta.info(lora.base_version)
                if base.kind != "full":
                    raise RegistryError(
                        f"{drafter_id}: a LoRA adapter sits on full weights; its base "
                        f"v{base.version} is {base.kind}"
                    )
            what = f"{drafter_id} v{version} ({kind})"
            given = None
            if isinstance(weights, bytes | bytearray | memoryview):
                given = bytes(weights)
                weights = weights_from_bytes(given)
            if kind == "lora":  # an adapter, not full weights, before it sets any reference
                if lora is None:
                    raise ValueError(
                        f"{what} is a LoRA adapter without its LoRA spec (r, alpha, target "
                        "modules, base version); publish it with lora=LoraSpec(...)"
                    )
                full = meta.references.get("full")
                check_lora_adapter(weights, lora.r, lora.target_modules, full, what)
            check_weights(weights, meta.references.get(kind), what)
            data = weights_to_bytes(weights)
            digest = _checksum_of(data)
            if checksum is not None and checksum not in (digest, given and _checksum_of(given)):
                raise WeightValidationError(
                    f"{what}: checksum mismatch: given {checksum!r:.80}, computed {digest} — "
                    "the weights were altered or truncated in transit"
                )
            meta.references.setdefault(kind, spec_of(weights))
            info = VersionInfo(
                drafter_id,
                version,
                kind,
                digest,
                prov,
                parent=parent,
                lora=None if lora is None else lora.to_dict(),
                epoch=meta.epoch,
            )
            meta.versions.append(info)
            self.store.put_weights(drafter_id, version, data)
            self._commit(meta)
        logger.info("published %s (%d bytes, provenance %s)", what, len(data), prov)
        return copy.deepcopy(info)

    def promote(
        self, drafter_id: str, version: int, evaluation: dict[str, Any] | None = None
    ) -> VersionInfo:
        """Make ``version`` live (from candidate or retired); the old live one is retired."""
        with self._lock:
            meta = copy.deepcopy(self._get(drafter_id))
            info = meta.info(version)
            if version == meta.live:
                return copy.deepcopy(info)
            if info.status not in ("candidate", "retired"):
                reason = info.evaluation.get("reason", "no reason recorded")
                raise RegistryError(
                    f"{drafter_id} v{version} is {info.status} ({reason}); publish it again "
                    "to retry"
                )
            old = meta.info(meta.live)
            meta.replace(dataclasses.replace(old, status="retired"))
            meta.history = [v for v in meta.history if v != version] + [old.version]
            info = dataclasses.replace(
                info, status="live", evaluation={**info.evaluation, **(evaluation or {})}
            )
            meta.replace(info)
            meta.live = version
            meta.add_event("promote", version=version, previous=old.version, why=evaluation or {})
            self._commit(meta)
            self._fresh.discard(drafter_id)
        logger.info("promoted %s v%d (was v%d)", drafter_id, version, old.version)
        return copy.deepcopy(info)

    def reject(
        self,
        drafter_id: str,
        version: int,
        reason: str,
        evaluation: dict[str, Any] | None = None,
    ) -> VersionInfo:
        """Mark a candidate (or retired) version rejected; it can no longer be promoted."""
        with self._lock:
            meta = copy.deepcopy(self._get(drafter_id))
            info = meta.info(version)
            if version == meta.live:
                raise RegistryError(f"{drafter_id} v{version} is live; use rollback() instead")
            info = self._rejected(info, reason, evaluation)
            meta.replace(info)
            meta.history = [v for v in meta.history if v != version]
            meta.add_event("reject", version=version, reason=str(reason))
            self._commit(meta)
        logger.info("rejected %s v%d: %s", drafter_id, version, reason)
        return copy.deepcopy(info)

    @staticmethod
    def _rejected(info: VersionInfo, reason: str, evaluation: dict[str, Any] | None) -> VersionInfo:
        merged = {**info.evaluation, **(evaluation or {}), "reason": str(reason)}
        return dataclasses.replace(info, status="rejected", evaluation=merged)

    def rollback(
        self,
        drafter_id: str,
        reason: str = "rolled back",
        evaluation: dict[str, Any] | None = None,
        by: str = "operator",
    ) -> VersionInfo:
        """Put the previously live version back; the current one is marked rejected (with
        ``evaluation`` merged in). ``by`` names who decided, in the history."""
        with self._lock:
            meta = copy.deepcopy(self._get(drafter_id))
            if not meta.history:
                raise RegistryError(
                    f"drafter {drafter_id!r} has no earlier live version to roll back to "
                    f"(live is v{meta.live})"
                )
            current = meta.info(meta.live)
            meta.replace(self._rejected(current, reason, evaluation))
            previous = dataclasses.replace(meta.info(meta.history.pop()), status="live")
            meta.replace(previous)
            meta.live = previous.version
            meta.add_event(
                "rollback",
                version=current.version,
                to=previous.version,
                reason=str(reason),
                by=str(by),
                evaluation=evaluation or {},
            )
            self._commit(meta)
            self._fresh.discard(drafter_id)
        logger.warning("rolled %s back from v%d to v%d", drafter_id, current.version, meta.live)
        return copy.deepcopy(previous)

    def gate_and_promote(
        self,
        drafter_id: str,
        version: int,
        gate: PromotionGate,
        candidate: Student,
        live: Student,
        records: list[DistillRecord],
    ) -> GateDecision:
        """Evaluate candidate ``version`` (loaded in the ``candidate`` student) against the
        live version (in ``live``) on ``records``; record the numbers and promote or reject.
        """
        with self._lock:
            info = self._get(drafter_id).info(version)
            if info.status != "candidate":
                raise RegistryError(f"{drafter_id} v{version} is {info.status}, not a candidate")
            live_before = self._get(drafter_id).live
        decision = gate.evaluate(candidate, live, records)  # unlocked
        evaluation = {
            **decision.evaluation(),
            "live_version": live_before,
            "margin": gate.margin,
        }
        with self._lock:
            if self._get(drafter_id).live != live_before:
                raise RegistryError(
                    f"{drafter_id}: the live version changed during evaluation "
                    f"(v{live_before} → v{self._get(drafter_id).live}); evaluate again"
                )
            if decision.promote:
                self.promote(drafter_id, version, evaluation)
            else:
                self.reject(drafter_id, version, decision.reason, evaluation)
        return decision

    def gc(self, keep: int = 3) -> list[tuple[str, int]]:
        """Delete all but the newest ``keep`` versions of every drafter, always keeping the
        base, the live version, the rollback target and the base version of every LoRA
        version kept. Returns ``(drafter_id, version)``."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        removed: list[tuple[str, int]] = []
        with self._lock:
            for drafter_id in self.drafters():
                meta = copy.deepcopy(self._get(drafter_id))
                protect = {0, meta.live, *meta.history[-1:]}
                protect |= {i.version for i in meta.versions[-keep:]}
                protect |= {
                    i.lora_spec.base_version
                    for i in meta.versions
                    if i.version in protect and i.lora_spec is not None
                }
                gone = [i.version for i in meta.versions if i.version not in protect]
                if not gone:
                    continue
                meta.versions = [i for i in meta.versions if i.version in protect]
                meta.history = [v for v in meta.history if v in protect]
                self._commit(meta)  # index first: it never points at a deleted file
                for version in gone:
                    self.store.delete_weights(drafter_id, version)
                    removed.append((drafter_id, version))
        if removed:
            logger.info("gc removed %d versions: %s", len(removed), removed)
        return removed
