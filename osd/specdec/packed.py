"""Linear layers through oneDNN with the weight reordered once ("packed"): the CPU step's matmuls.

Why: a decode step on a CPU is a chain of matrix products over a handful of rows, and
PyTorch's default path (MKL's sgemm) is slow there. Measured on this project's 2-core
machine (2 threads, SmolLM2-135M's 30 layers of weights, ms per pass; its 49,152-row LM
head apart)::

    rows                     1      2      4      8
    F.linear (MKL)          41.0   70.9   62.6   74.0     LM head 11.5 / 27.1 / 21.3 / 20.1
    oneDNN, packed weight   23.5   30.5   28.1   31.3     LM head  5.6 /  6.1 /  5.0 /  6.0

So one row streams the weights at close to the memory's speed, and a verification of
8 rows costs 1.3 single-row steps instead of 1.8. The packed copy is oneDNN's blocked
layout of the same fp32 values (the products differ from MKL's only in summation order);
it is made on first use and made again whenever the weight changes — replaced, or
modified in place (a hot-swap's ``load_state_dict``, an optimiser step, a LoRA merge:
the tensor's version counter moves). It costs one extra copy of the weights.

Used only where it holds: fp32 weights on the CPU, outside autograd, when this build of
PyTorch has the oneDNN ops (checked once). ``OSD_PACKED_LINEAR=0`` turns it off.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F

_AVAILABLE: bool | None = None
# id(weight) -> ((data_ptr, version, shape, stride, stamp) it was packed at, the copy); a
# weight that is garbage-collected takes its copy with it (weakref.finalize)
_PACKED: dict[int, tuple[tuple, torch.Tensor]] = {}


def available() -> bool:
    """Does this PyTorch build run a packed oneDNN linear correctly (checked once)?"""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = False
        if os.environ.get("OSD_PACKED_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available():
            try:
                gen = torch.Generator().manual_seed(0)
                w, x = torch.randn(8, 4, generator=gen), torch.randn(3, 4, generator=gen)
                with torch.no_grad():
                    y = _run(x, torch.ops.mkldnn._reorder_linear_weight(w, None), None)
                _AVAILABLE = bool(torch.allclose(y, F.linear(x, w), atol=1e-5))
            except (RuntimeError, AttributeError, NotImplementedError):
                pass
    return _AVAILABLE


def _run(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stamp: tuple = (),
    packed: bool = True,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the packed copy of ``weight`` where that applies.
    ``stamp``: what else says the weight changed — the version counters of parameters
    that are views of it made by assigning ``.data`` (they do not share its counter).

    >>> lin = torch.nn.Linear(4, 3)
    >>> x = torch.randn(2, 4)
    >>> with torch.no_grad():
    ...     ok = torch.allclose(linear(x, lin.weight, lin.bias), lin(x), atol=1e-6)
    ...     _ = lin.weight.mul_(2)  # in place: the packed copy is remade
    ...     ok2 = torch.allclose(linear(x, lin.weight, lin.bias), lin(x), atol=1e-6)
    >>> ok and ok2
    True
    """
    if not (packed and _applies(x, weight)):
        return F.linear(x, weight, bias)
    key = (weight.data_ptr(), weight._version, weight.shape, weight.stride(), stamp)
    held = _PACKED.get(id(weight))
    if held is None or held[0] != key:
        with torch.no_grad():
            copy = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
        if held is None:
            weakref.finalize(weight, _PACKED.pop, id(weight), None)
        _PACKED[id(weight)] = held = (key, copy)
    return _run(x, held[1], None if bias is None else bias.detach())


# torch thread count -> per row count (1, 2, …), is the packed linear the cheaper here: the
# last model measured (osd.specdec.rowcost.row_padding); for callers without a plan
_MEASURED: dict[int, list[bool]] = {}


def measured(use: list[bool]) -> None:
    """Record which linear a measurement found cheaper per row count at this thread count;
    :func:`linear_module` callers that pass no choice (the head drafters) follow it."""
    _MEASURED[torch.get_num_threads()] = list(use)


def preferred(rows: int) -> bool:
    """The packed linear for ``rows`` rows? As measured here (:func:`measured`); before any
    measurement, yes.

    >>> saved = dict(_MEASURED); _MEASURED.clear(); preferred(4)
    True
    >>> measured([False, True]); preferred(1), preferred(2), preferred(9)
    (False, True, True)
    >>> _MEASURED.clear(); _MEASURED.update(saved)
    """
    use = _MEASURED.get(torch.get_num_threads())
    if not use:
        return True
    return use[min(rows, len(use)) - 1]


def linear_module(
    module: torch.nn.Module, x: torch.Tensor, packed: bool | None = None
) -> torch.Tensor:
    """``module(x)``; a plain ``nn.Linear`` through :func:`linear` (a wrapper — LoRA, … —
    runs its own forward). ``packed``: whether to use the packed copy; ``None``: as
    measured in this process for this many rows (:func:`preferred`). On the sixth
    session's machine the packed copy was ~2x slower than MKL at 1–16 rows, and following
    the measurement made the EAGLE drafter 14 % and Medusa 7 % faster."""
    if type(module) is not torch.nn.Linear:
        return module(x)
    if packed is None:
        packed = preferred(max(1, x.numel() // max(1, x.shape[-1])))
    if packed:
        return linear(x, module.weight, module.bias)
    return F.linear(x, module.weight, module.bias)


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and x.dtype == torch.float32
        and not weight.is_inference()  # no version counter to watch
        and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
        and available()
    )
