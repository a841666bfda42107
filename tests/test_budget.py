"""Spare compute (``osd.distill.budget``): the node-load probe behind ``distill.yield_cpu``
and the per-thread priority behind ``trainer.nice``. The trainer's waiting on the probe is
tested with the trainer (``tests/test_trainer.py``)."""

from __future__ import annotations

import os
import sys
import threading

import pytest


def test_node_load_counts_the_other_processes_only():
    from osd.distill.budget import NodeLoad

    assert not NodeLoad(0.5, cpus=2, system=lambda: 60.0, own=lambda: 100.0)()  # 0.2 others
    assert NodeLoad(0.5, cpus=2, system=lambda: 100.0, own=lambda: 20.0)()  # 0.9 others
    real = NodeLoad(0.99)  # psutil: a reading in [0, 1]
    real()
    assert 0.0 <= real.others <= 1.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_training_threads_run_at_low_priority_and_their_children_inherit_it():
    """``trainer.nice``: a thread lowers its own priority (the OS then gives it only the
    cycles others leave); threads it starts inherit it; the caller's thread is untouched."""
    from osd.distill.budget import lower_thread_priority

    def prio() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen: dict[str, int] = {}

    def child() -> None:
        seen["child"] = prio()

    def trainer_thread() -> None:
        seen["applied"] = lower_thread_priority(19)
        seen["own"] = prio()
        t = threading.Thread(target=child)
        t.start()
        t.join()

    before = prio()
    t = threading.Thread(target=trainer_thread)
    t.start()
    t.join()
    assert seen == {"applied": True, "own": 19, "child": 19}
    assert prio() == before  # per thread, not per process
    for bad in (-1, 20, 1.5, True, "19"):
        with pytest.raises(ValueError, match="nice"):
            lower_thread_priority(bad)
