"""Which thread of a process gets the cores: one *compute* thread; the others run on one.

PyTorch's CPU build parallelises an operation over OpenMP (GNU libgomp). Each thread that
runs a parallel region becomes the master of a *team* of worker threads, kept for the
thread's lifetime. Between two regions a worker either spins (and catches the next region
in ~1 µs) or sleeps (and is woken through the kernel: tens of µs on a virtual machine).
libgomp spins only while the process's team threads, all teams together, are no more
than the CPUs; past that it throttles every spin to ~100 iterations, so every worker
sleeps.

A decode step of a small model is ~100 small operations, so the wake-ups *are* its cost.
Measured on the project's 2-core machine (zoo target, one forward of ``b`` sequences,
ms, run from a second thread as the serving loop does):

=====================================================  ======  ======  ======
                                                         b = 1   b = 8  b = 32
=====================================================  ======  ======  ======
workers sleep (``OMP_WAIT_POLICY=PASSIVE``)               7.6    11.6    19.8
bounded spin, but the main thread also holds a team       6.3    10.1    18.6
bounded spin, the compute thread's team alone             2.7     5.8    14.0
=====================================================  ======  ======  ======

So a process keeps **one** team: the thread that runs the engine (the serving loop, or the
main thread of a one-thread program). Models are built in a short-lived thread
(:func:`apart`: its team ends with it), and threads beside the compute thread run their
torch work on one intra-op thread (:func:`side`: no team at all). That includes the
thread that started the serving loop: one parallel operation there afterwards (a KV
cache of 2.4 M zeros, in a session script) gave it a team for good, and the loop's
forwards went back to 7.3 / 12.2 / 20.7 ms (the serving bench leaves that thread idle;
the replica calls :func:`side` there). ``osd/__init__.py`` sets the bounded spin (``GOMP_SPINCOUNT``; a worker spins at most ~0.2 ms, then sleeps,
so an idle replica leaves the cores to a co-located trainer).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

SPIN_COUNT = "20000"  # GOMP_SPINCOUNT: ~0.2 ms of spinning before a worker sleeps


def apart(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` run in a new thread that ends when it returns, so the OpenMP
    team its torch work starts ends with it and the caller never holds one. Exceptions
    are re-raised here.

    >>> apart(lambda x: x + 1, 41)
    42
    """
    out: list = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn(*args, **kwargs))
        except BaseException as e:  # re-raised in the caller
            err.append(e)

    t = threading.Thread(target=run, name="osd-build")
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


def _set(n: int) -> None:
    """``torch.set_num_threads(n)`` for this thread. PyTorch initialises a thread's count
    lazily, at its first parallel operation, from the count *last set in any thread*; and
    each library built against it (a C++ extension: ``osd.kernels.cpu_attention``) does
    so again at its own first parallel operation in the thread. So a thread that set 2
    ran on 1 after another thread set 1 (the serving loop did: 208 instead of 289 tok/s
    at concurrency 1). Reading the count first settles libtorch's own initialisation; the
    serving loop calls :func:`compute` again before every step for the others (≈ 0.1 µs)."""
    torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))


def side() -> None:
    """Run this thread's torch work on one intra-op thread: a thread beside the compute
    thread (a poller, a sink, a trainer in the serving process) starts no OpenMP team.

    PyTorch also takes the count as the one other threads initialise to (:func:`_set`),
    so a compute thread sets its own (:func:`compute`; the serving loop does before every
    step, with its creator's count)."""
    _set(1)


def compute(threads: int) -> None:
    """Give this thread ``threads`` intra-op threads: call it first in the compute thread."""
    _set(threads)
