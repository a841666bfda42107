"""Registry epochs: what a registry does when its store was emptied or replaced.

Version numbers alone do not name weights across stores: a registry restarted on an
emptied store registers its base again as v0 and numbers from 1 again. So each drafter's
metadata carries an **epoch** id (drawn when the base is registered into a store that does
not hold it), and a version is named by its **ref** ``(epoch, version, checksum)``.

- :meth:`EpochMixin.sync` compares the store with what the registry holds: an emptied
  store or one of another epoch is logged loudly (``ERROR``) and returned; the registry
  never writes its cached view over it, nor rolls anything back by itself.
- :meth:`EpochMixin.resolve` is a replica's poll: given the ref it serves, it answers
  ``keep`` (you serve live), ``adopt`` (fetch live), or ``upload``: the replica serves
  weights this registry does not hold (another epoch) while nothing has been promoted in
  the registry's current epoch — a store emptied under live replicas. The replica then
  :meth:`EpochMixin.recover` s: its weights (validated, checksum-matched against its ref)
  become the live version of the new epoch, so **live is never rolled back silently**:
  replicas keep serving what they served, and trainers resume from it.
- every decision is an event in the drafter's persisted history (:meth:`history`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from osd.registry.store import DrafterMeta, RegistryError
from osd.registry.weights import (
    WeightValidationError,
    checksum,
    weights_from_bytes,
    weights_to_bytes,
)

__all__ = ["EpochMixin", "check_ref"]

logger = logging.getLogger("osd.registry")


def check_ref(ref: Any) -> dict[str, Any]:
    """A ``{"epoch": str, "version": int, "checksum": str}`` map, or ``ValueError``."""
    if not isinstance(ref, Mapping) or set(ref) != {"epoch", "version", "checksum"}:
        raise ValueError(f"a version ref is {{epoch, version, checksum}}, got {ref!r:.120}")
    epoch, version, digest = ref["epoch"], ref["version"], ref["checksum"]
    if not isinstance(epoch, str) or not isinstance(digest, str) or len(epoch) > 64:
        raise ValueError(f"bad version ref {ref!r:.120}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"bad version in ref {ref!r:.120}")
    return {"epoch": epoch, "version": version, "checksum": digest}


class EpochMixin:
    """Epoch handling of :class:`~osd.registry.versions.Registry`; see the module docstring."""

    # provided by Registry
    store: Any
    _meta: dict[str, DrafterMeta]
    _fresh: set[str]
    _lost: dict[str, dict[str, Any]]

    # -- names and history
    def ref(self, drafter_id: str, version: int | None = None) -> dict[str, Any]:
        """``(epoch, version, checksum)`` of ``version`` (default: live)."""
        with self._lock:
            meta = self._get(drafter_id)
            return meta.info(meta.live if version is None else version).ref()

    def epoch(self, drafter_id: str) -> str:
        with self._lock:
            return self._get(drafter_id).epoch

    def history(self, drafter_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        """The persisted events (newest last), optionally of one ``kind``."""
        with self._lock:
            events = self._get(drafter_id).events
            return copy.deepcopy([e for e in events if kind is None or e["kind"] == kind])

    def record_event(self, drafter_id: str, kind: str, **fields: Any) -> dict[str, Any]:
        """Append an event (a gate decision, an adoption, …) to the persisted history."""
        with self._lock:
            meta = copy.deepcopy(self._get(drafter_id))
            event = meta.add_event(kind, **fields)
            self._commit(meta)
        return event

    # -- the store changed under us
    def sync(self, drafter_id: str) -> str:
        """``"ok"``, ``"emptied"`` (the store lost the drafter: register the base again to
        start a new epoch) or ``"replaced"`` (the store holds another epoch, now adopted
        as is). Either change is logged at ``ERROR``; nothing is rolled back."""
        with self._lock:
            cached = self._meta.get(drafter_id)
            if cached is None:
                return "ok"
            stored = self.store.get_meta(drafter_id)
            if stored is not None and stored.epoch == cached.epoch:
                return "ok"
            live = cached.info(cached.live).ref()
            del self._meta[drafter_id]
            if stored is None:
                self._lost[drafter_id] = live
                logger.error(
                    "REGISTRY STORE EMPTIED: %s epoch %s (live v%d, %s…) is gone from the "
                    "store; a new epoch starts, replicas keep serving their weights and "
                    "upload them as its live version",
                    drafter_id,
                    cached.epoch,
                    live["version"],
                    live["checksum"][:12],
                )
                return "emptied"
            self._fresh.add(drafter_id)
            logger.error(
                "REGISTRY STORE REPLACED: %s was epoch %s (live v%d), the store now holds "
                "epoch %s (live v%d); replicas serving weights it lacks upload them",
                drafter_id,
                cached.epoch,
                live["version"],
                stored.epoch,
                stored.live,
            )
            self._meta[drafter_id] = stored
            return "replaced"

    # -- what a replica should do
    def resolve(self, drafter_id: str, serving: Mapping[str, Any] | None) -> dict[str, Any]:
        """A replica's poll: the live ref and ``action`` (keep / adopt / upload)."""
        with self._lock:
            meta = self._get(drafter_id)
            live = meta.info(meta.live).ref()
            fresh = drafter_id in self._fresh
        if serving is None:
            return {**live, "action": "adopt"}
        serving = check_ref(serving)
        if serving["epoch"] == live["epoch"]:
            same = serving["version"] == live["version"]
            return {**live, "action": "keep" if same else "adopt"}
        known = any(i.checksum == serving["checksum"] for i in meta.versions)
        if known or not fresh:  # its weights are here, or this epoch has promoted since
            return {**live, "action": "adopt"}
        return {**live, "action": "upload"}

    def recover(
        self,
        drafter_id: str,
        weights: Mapping[str, Tensor] | bytes,
        served: Mapping[str, Any],
        source: str,
    ) -> dict[str, Any]:
        """Make the full weights a replica serves (``served``: their ref from another epoch)
        the live version of this epoch: validated as any publish, their checksum must equal
        the ref's. Idempotent: a second replica uploading the same weights changes nothing.
        Returns the new live ref."""
        served = check_ref(served)
        if isinstance(weights, bytes | bytearray | memoryview):
            weights = weights_from_bytes(bytes(weights))
        with self._lock:
            meta = self._get(drafter_id)
            live = meta.info(meta.live)
            if live.checksum == served["checksum"]:
                return live.ref()
            if drafter_id not in self._fresh:
                raise RegistryError(
                    f"{drafter_id}: epoch {meta.epoch} has promoted since it started; "
                    "replicas adopt its live version instead of uploading theirs"
                )
            if checksum(weights_to_bytes(weights)) != served["checksum"]:
                raise WeightValidationError(
                    f"{drafter_id}: recovered weights do not match the checksum of the ref "
                    f"they claim ({served['checksum'][:12]}…)"
                )
            info = self.publish(
                drafter_id,
                weights,
                provenance={"recovered_from": served, "replica": str(source)},
                kind="full",
            )
            why = {"reason": f"recovered from replica {source}: live when the store was lost"}
            self.promote(drafter_id, info.version, {**why, "recovered_from": served})
            self.record_event(
                drafter_id, "recover", version=info.version, served=served, replica=str(source)
            )
            ref = self.ref(drafter_id)
        logger.error(
            "registry %s: epoch %s live is now v%d = the replicas' weights (%s epoch %s v%d)",
            drafter_id,
            ref["epoch"],
            ref["version"],
            served["checksum"][:12],
            served["epoch"],
            served["version"],
        )
        return ref
