"""Spare compute: is the node busy with other work (the replicas) right now?

A trainer that shares its node with serving replicas should train in the gaps — the
mission's "spare compute" — not take cores the replicas want. :class:`NodeLoad` reads the
node's CPU use since its last call (``psutil``) and subtracts this process's own; the
trainer (:class:`~osd.distill.trainer.OnlineDistiller`, ``busy=NodeLoad(share)``) waits
before a step while the rest of the node uses more than ``share`` of its CPUs, at most
``DistillConfig.yield_max_s``, so that it still makes progress under constant load.

Worked example: 2 CPUs, the node at 90 % (1.8 CPUs), this trainer 70 % of one CPU → others
use 1.1 CPUs = 0.55 of the node > 0.5: busy. A trainer on GPUs of its own sets
``yield_cpu: null``.

>>> load = NodeLoad(0.5, cpus=2, system=lambda: 90.0, own=lambda: 70.0)
>>> load(), load.others
(True, 0.55)
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["NodeLoad"]


class NodeLoad:
    """``load()`` → the node's other processes use more than ``share`` of its CPUs."""

    def __init__(
        self,
        share: float,
        cpus: int | None = None,
        system: Callable[[], float] | None = None,
        own: Callable[[], float] | None = None,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        self.share = share
        self.cpus = cpus or os.cpu_count() or 1
        if system is None or own is None:
            import psutil

            proc = psutil.Process()
            system = system or (lambda: psutil.cpu_percent(interval=None))  # node, 0..100
            own = own or (lambda: proc.cpu_percent(interval=None))  # this process, 0..100·cpus
            system(), own()  # prime: the next readings cover the time since now
        self._system, self._own = system, own
        self.others = 0.0  # fraction of the node the others used, at the last reading

    def __call__(self) -> bool:
        used = self._system() / 100 * self.cpus - self._own() / 100
        self.others = round(max(used, 0.0) / self.cpus, 4)
        return self.others > self.share
