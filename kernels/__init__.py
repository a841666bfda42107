"""Triton kernels on the hot path, each behind a plain function that dispatches between
the kernel and its PyTorch reference (same signature, same results).

=========================  ===========================================  ==================================
function                   kernel                                       reference
=========================  ===========================================  ==================================
``accept_greedy_batch``    :mod:`osd.kernels.accept` (one launch/step)  ``osd.specdec.accept_batch``
``accept_sampling_batch``  :mod:`osd.kernels.accept`                    ``osd.specdec.accept_batch``
``topk_tail``              :mod:`osd.kernels.topk`                      ``osd.distill.record.topk_tail``
``sparse_distill_loss``    :mod:`osd.kernels.losses` (fwd + bwd)        ``osd.distill.losses.distill_loss``
=========================  ===========================================  ==================================

Which runs: the kernel when the tensors are on a CUDA device and Triton imports, the
reference elsewhere (the CPU) — unless overridden by :func:`set_backend` or the
``OSD_KERNELS`` environment variable (``auto`` | ``triton`` | ``torch``). Forcing
``triton`` with CPU tensors needs Triton's interpreter (``TRITON_INTERPRET=1`` set before
the first kernel import): that is how the tests check the kernels on a machine without a
GPU. Kernel modules are imported on first use, so importing this package costs nothing.

Callers: the engine (acceptance), the record collector (top-k), the trainer's student
objective (losses).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator


def _hand_over_the_name() -> None:
    """This folder is the package ``osd.kernels``. Imported as a top-level ``kernels`` —
    the repository root on ``sys.path``: ``python -m …`` run from it, a process started
    there — it would shadow Hugging Face's ``kernels`` library, which transformers imports
    as it loads (and requires since 5.25). So the name is handed to that library where
    it is installed: the import system returns whatever ``sys.modules["kernels"]`` holds
    once this file ran."""
    import importlib.machinery
    import importlib.util
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None:  # the library is not installed: nothing to shadow (transformers
        return  # < 5.25 imports this folder to look for a version; it finds none)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise


if __name__ == "kernels":
    _hand_over_the_name()

import torch  # noqa: E402

__all__ = [
    "BACKENDS",
    "accept_greedy_batch",
    "accept_sampling_batch",
    "backend",
    "set_backend",
    "sparse_distill_loss",
    "topk_tail",
    "use_triton",
]

BACKENDS = ("auto", "triton", "torch")
_forced: str | None = None


def set_backend(name: str | None) -> None:
    """Force ``"triton"`` or ``"torch"`` (``"auto"`` / ``None``: by device, or
    ``$OSD_KERNELS``)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    _forced = None if name in (None, "auto") else name


@contextlib.contextmanager
def using(name: str | None) -> Iterator[None]:
    """``with using("torch"): ...`` — :func:`set_backend` for a block."""
    global _forced
    before = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = before


def backend() -> str:
    """The backend in force: ``auto``, ``triton`` or ``torch``."""
    if _forced is not None:
        return _forced
    name = os.environ.get("OSD_KERNELS", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"OSD_KERNELS must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@functools.cache
def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(device: torch.device | str) -> bool:
    """Whether a call with tensors on ``device`` runs the Triton kernel."""
    device = torch.device(device)
    name = backend()
    if name == "torch":
        return False
    if name == "triton":
        if not _triton_ok():
            raise RuntimeError("kernel backend 'triton' forced, but triton does not import")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"Triton kernels on {device.type} tensors need the interpreter: set "
                "TRITON_INTERPRET=1 before the first kernel import (or use backend 'torch')"
            )
        return True
    return device.type == "cuda" and _triton_ok()


def accept_greedy_batch(tokens, parents, target_argmax, trees=None):
    """Batched greedy tree acceptance (see ``osd.specdec.accept_batch``)."""
    if use_triton(target_argmax.device):
        from osd.kernels.accept import accept_greedy_batch as fn
    else:
        from osd.specdec.accept_batch import accept_greedy_batch as fn
    return fn(tokens, parents, target_argmax, trees)


def accept_sampling_batch(tokens, parents, q, p, without_replacement=False, generator=None, **kw):
    """Batched lossless sampling acceptance (see ``osd.specdec.accept_batch``)."""
    if use_triton(q.device):
        from osd.kernels.accept import accept_sampling_batch as fn
    else:
        from osd.specdec.accept_batch import accept_sampling_batch as fn
    return fn(tokens, parents, q, p, without_replacement, generator, **kw)


def topk_tail(logits: torch.Tensor, k: int, log_floor: float | None = None):
    """``[m, V]`` logits → (top-k ids, fp16 log-probs, fp16 tail log-mass) for a record."""
    if use_triton(logits.device):
        from osd.kernels.topk import topk_tail as fn
    else:
        from osd.distill.record import topk_tail as fn
    return fn(logits, k) if log_floor is None else fn(logits, k, log_floor)


def sparse_distill_loss(name, draft_logits, target, **kw):
    """A distillation loss on the top-k + tail support (see ``osd.distill.losses``)."""
    if use_triton(draft_logits.device):
        from osd.kernels.losses import sparse_distill_loss as fn
    else:
        from osd.distill.losses import distill_loss as fn
    return fn(name, draft_logits, target, **kw)
