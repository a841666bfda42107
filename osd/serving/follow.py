"""A replica's side of the registry: follow the live version, named by its ref.

A replica names what it serves by the registry's ref ``(epoch, version, checksum)`` (see
:mod:`osd.registry.epochs`), never by the number alone: numbers restart in a new epoch.
Each poll sends that ref and acts on the answer:

- ``keep``: it serves live;
- ``adopt``: fetch the live version's full weights, check their checksum (the one the
  answer names, and the one sent with them) and the drafter's reference, and offer them to
  the :class:`~osd.serving.ServingLoop` (adopted between two steps);
- ``upload``: the registry lost what this replica serves (its store was emptied or
  replaced): send the weights it serves, so they become the new epoch's live version —
  the replica itself changes nothing.

A replica that never adopted a version (``serving`` is ``None``) never uploads: start-up
weights are not a registry version. No Ray here: the three calls are injected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from osd.registry.weights import (
    TensorSpec,
    WeightValidationError,
    check_weights,
    checksum,
    weights_from_bytes,
    weights_to_bytes,
)
from osd.serving.loop import ServingLoop, SwapEvent

__all__ = ["VersionFollower"]

log = logging.getLogger(__name__)

Ref = dict[str, Any]


def _ref(answer: Mapping[str, Any]) -> Ref:
    return {"epoch": answer["epoch"], "version": answer["version"], "checksum": answer["checksum"]}


class VersionFollower:
    """Poll answers → offers to the loop; see the module docstring. Call :meth:`on_swap`
    from the loop's swap callback. ``loop``: the :class:`ServingLoop` (its drafter), or
    one part of it (``loop.part("stop")``: the drafter's early-stop decision model)."""

    def __init__(self, loop: ServingLoop, reference: Mapping[str, TensorSpec], what: str):
        self.loop = loop
        self.reference = reference
        self.what = what
        self.serving: Ref | None = None
        self._offered: dict[int, Ref] = {}
        self.uploads = 0

    def step(
        self,
        poll: Callable[[Ref | None], Mapping[str, Any]],
        fetch: Callable[[int], tuple[bytes, str]],
        upload: Callable[[bytes, Ref], Any],
    ) -> str:
        """One poll; returns the action taken (keep, pending, adopt, upload)."""
        answer = poll(self.serving)
        action, ref = answer["action"], _ref(answer)
        if action == "keep":
            return "keep"
        if action == "upload":
            if self.serving is None:
                return "keep"
            log.warning(
                "registry lost what %s serves (%s v%d); uploading it as the live version",
                self.what,
                self.serving["epoch"],
                self.serving["version"],
            )
            upload(weights_to_bytes(self.loop.state_dict()), self.serving)
            self.uploads += 1
            return "upload"
        if action != "adopt":
            raise ValueError(f"unknown poll action {action!r}")
        if self._offered.get(self.loop.pending_version) == ref:
            return "pending"
        if self.serving is None and ref["version"] == self.loop.version and not self._offered:
            self.serving = ref  # start-up weights are the registry's base: nothing to fetch
            return "keep"
        data, digest = fetch(ref["version"])
        got = checksum(data)
        if got != digest or got != ref["checksum"]:
            raise WeightValidationError(
                f"{self.what} v{ref['version']}: checksum mismatch in transit (or the live "
                "version changed meanwhile); retrying"
            )
        weights = weights_from_bytes(data)
        check_weights(weights, self.reference, f"{self.what} v{ref['version']}")
        self._offered = {ref["version"]: ref}
        self.loop.offer_weights(weights, ref["version"])
        return "adopt"

    def on_swap(self, event: SwapEvent) -> Ref | None:
        """The loop adopted ``event.version``: that ref is now what this replica serves."""
        ref = self._offered.pop(event.version, None)
        if ref is not None:
            self.serving = ref
        return self.serving
