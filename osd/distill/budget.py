"""Spare compute: a trainer that shares its node with serving replicas trains in the gaps.

That is the mission's "spare compute": the trainer must not take cores the replicas want.
Two mechanisms, the first on by default:

- **Priority** (``trainer.nice``, 19 by default). :func:`lower_thread_priority` gives each
  training thread a nice value, and the OS scheduler does the rest: it runs the thread on
  cycles the replicas leave and hands the core back the moment a replica thread wakes.
  Under constant full load a nice-19 thread gets ≈ 1.5 % of a core by weight (15 against
  1024): learning waits for the load to drop (``experiments/priority.py``: no step in its
  4 s phases beside a saturating loop). Linux applies nice per thread, and
  only among the processes of one session (autogroup). A Ray node's replicas and trainers
  are all workers of the same raylet, so they compete as intended.
- **Yielding** (``distill.yield_cpu``, off by default). :class:`NodeLoad` reads the node's
  CPU use since its last call (``psutil``) and subtracts this process's own. The trainer
  (:class:`~osd.distill.trainer.OnlineDistiller`, ``busy=NodeLoad(share)``) waits before a
  step while the rest of the node uses more than ``share`` of its CPUs, at most
  ``DistillConfig.yield_max_s``, so that it still makes progress under constant load.

Yielding, a worked example: 2 CPUs, the node at 90 % (1.8 CPUs), this trainer 70 % of one
CPU → others use 1.1 CPUs = 0.55 of the node > 0.5: busy. A trainer on GPUs of its own sets
``yield_cpu: null``.

>>> load = NodeLoad(0.5, cpus=2, system=lambda: 90.0, own=lambda: 70.0)
>>> load(), load.others
(True, 0.55)
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable

__all__ = ["NodeLoad", "check_nice", "lower_thread_priority"]

log = logging.getLogger(__name__)


def check_nice(nice: int) -> int:
    """``nice`` if it is a nice value a thread may take (an int in 0..19), else ValueError."""
    if not isinstance(nice, int) or isinstance(nice, bool) or not 0 <= nice <= 19:
        raise ValueError(f"nice must be an int in 0..19, got {nice!r}")
    return nice


def lower_thread_priority(nice: int) -> bool:
    """Set the calling thread's nice value to ``nice`` (0 normal … 19 lowest); the threads
    it starts afterwards (torch's intra-op pool among them) inherit it. True if applied.

    Linux only (elsewhere: logged, False). Going back up (a lower value than now) needs
    privileges an ordinary process lacks, so a thread meant to run at 0 again is replaced
    by a new one rather than reniced (``TrainerActor.set_nice``).
    """
    check_nice(nice)
    if not sys.platform.startswith("linux"):
        log.warning("thread priorities are not set on %s; nice %d ignored", sys.platform, nice)
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)  # on Linux: this thread only
    except OSError as err:
        log.warning("could not set nice %d on thread %d: %s", nice, tid, err)
        return False
    return True


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
