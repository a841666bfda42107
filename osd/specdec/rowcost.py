"""How many rows a target forward should run at: the cheapest count at least the one needed.

On a CPU a small model's decode step is a chain of matrix–vector products; the BLAS takes
a different path for a few rows, and on this project's 2-core machine a matmul over 2–4
rows costs **more** than over 5–6 (the zoo target's whole forward: 6.7 ms at 1 row, 9.2 at
2, 9.5 at 3, 8.6 at 4, 7.7 at 5, 7.1 at 6). A verification of a short chain or a partial
n-gram match runs 2–4 rows; padding it to 5 or 6 makes it ~20 % cheaper and changes
nothing else (padding rows see only themselves and their logits are never read).

:func:`row_padding` measures the model's own linear layers once per process (per weight
shapes, dtype and thread count) at 1…``max_rows`` rows, cycling through up to
``budget_mb`` of its weights so that, as in a real step, they stream from memory; the
resulting :class:`RowPadding` answers ``rows(b, t)``: the ``t' ≥ t`` whose ``b · t'``-row
matmuls are cheapest — ``t`` itself unless another is clearly (≥ ``margin``) cheaper —
and ``use_packed(m)``: whether the packed oneDNN linear (:mod:`osd.specdec.packed`) or
PyTorch's default is the cheaper at ``m`` rows, measured the same way. Off the CPU (a
GPU's small-row matmuls are flat) it never pads.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from osd.specdec.packed import available, linear, measured

MAX_ROWS = 16


class RowPadding:
    """Cost per row count (``costs[m - 1]`` for ``m`` rows) → the row count to run at; and,
    per row count, which linear is cheaper here: the packed oneDNN one or PyTorch's default
    (``packed[m - 1]``; none measured: the default).

    >>> pad = RowPadding([6.7, 9.2, 9.5, 8.6, 7.7, 7.1, 7.6, 8.2])
    >>> [pad.rows(1, t) for t in range(1, 9)]
    [1, 6, 6, 6, 5, 6, 7, 8]
    >>> pad.rows(2, 1), pad.rows(2, 3), pad.rows(3, 3), pad.rows(1, 20)
    (3, 3, 3, 20)
    >>> RowPadding([]).rows(1, 3), RowPadding([]).use_packed(3)
    (3, False)
    >>> p = RowPadding([1.0, 2.0], packed=[False, True])
    >>> p.use_packed(1), p.use_packed(2), p.use_packed(40)
    (False, True, True)
    """

    def __init__(
        self, costs: list[float], margin: float = 0.08, packed: list[bool] | None = None
    ) -> None:
        self.costs = list(costs)
        self.margin = margin
        self.packed = list(packed or [])

    def rows(self, b: int, t: int) -> int:
        """The rows per sequence to run ``b`` sequences of ``t`` needed rows at."""
        if b * t > len(self.costs):
            return t
        need = self.costs[b * t - 1]
        best, cost = t, need
        for u in range(t + 1, len(self.costs) // b + 1):
            if self.costs[b * u - 1] < cost:
                best, cost = u, self.costs[b * u - 1]
        return best if cost < (1 - self.margin) * need else t

    def use_packed(self, m: int) -> bool:
        """Run a forward of ``m`` rows through the packed linears? (beyond the measured
        counts: as at the largest)"""
        if not self.packed:
            return False
        return self.packed[min(m, len(self.packed)) - 1]


_MEASURED: dict[tuple, RowPadding] = {}


def _weights(lm, budget_mb: float) -> list[torch.Tensor]:
    """The stacked linear weights of ``lm``'s layers in forward order, up to the budget
    (at least one layer), then its LM head if it still fits."""
    out: list[torch.Tensor] = []
    total = 0.0
    for i, layer in enumerate(lm.layers):
        qkv, gate_up = lm._qkv(i), lm._gate_up(i)
        attn, mlp = layer.self_attn, layer.mlp
        ws = (
            [qkv.weight]
            if qkv is not None
            else [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        )
        ws.append(attn.o_proj.weight)
        if gate_up is not None:
            ws += [gate_up.weight, mlp.down_proj.weight]
        size = sum(w.numel() * w.element_size() for w in ws) / 2**20
        if out and total + size > budget_mb:
            break
        out += ws
        total += size
    head = lm.model.lm_head.weight
    if total + head.numel() * head.element_size() / 2**20 <= budget_mb:
        out.append(head)
    return out


@torch.inference_mode()
def measure(
    lm, max_rows: int = MAX_ROWS, reps: int = 3, budget_mb: float = 64.0, packed: bool = False
) -> list[float]:
    """ms per pass over ``lm``'s linear weights at 1…``max_rows`` rows (min of ``reps``
    passes; the row counts interleaved so that drift in the machine's load hits all),
    through PyTorch's default linear or (``packed``) the packed oneDNN one."""
    weights = _weights(lm, budget_mb)
    dims = {int(w.shape[1]) for w in weights}
    gen = torch.Generator().manual_seed(0)
    xs = {
        (m, d): torch.randn(m, d, generator=gen).to(weights[0])
        for m in range(1, max_rows + 1)
        for d in dims
    }
    run = linear if packed else F.linear
    best = [float("inf")] * max_rows
    for rep in range(reps + 1):
        for m in range(1, max_rows + 1):
            start = time.perf_counter()
            for w in weights:
                run(xs[(m, int(w.shape[1]))], w)
            if rep:  # the first pass warms up
                best[m - 1] = min(best[m - 1], 1e3 * (time.perf_counter() - start))
    return best


def row_padding(lm, max_rows: int = MAX_ROWS) -> RowPadding:
    """The :class:`RowPadding` of ``lm`` (a :class:`~osd.specdec.lean.LeanLM`), measured
    once per process per weight shapes, dtype, device and thread count, with both linears
    where the packed one applies (which is cheaper may depend on the model's size, the row
    count and the OpenMP wait policy, so it is measured, not assumed); no padding off the
    CPU."""
    if lm.device.type != "cpu":
        return RowPadding([])
    shapes = tuple(tuple(p.shape) for p in lm.model.parameters())
    key = (shapes, lm.dtype, torch.get_num_threads(), max_rows)
    if key not in _MEASURED:
        plain = measure(lm, max_rows)
        if available() and lm.dtype == torch.float32:
            packed = measure(lm, max_rows, packed=True)
            # one row (a decode step) on its own; the rest as one decision over their sum —
            # single counts are too noisy to pick per count (threads waking, cache residue)
            one = packed[0] < plain[0]
            many = sum(packed[1:]) < sum(plain[1:])
            use = [one] + [many] * (max_rows - 1)
            cost = [p if u else c for p, c, u in zip(packed, plain, use, strict=True)]
            _MEASURED[key] = RowPadding(cost, packed=use)
            measured(use)  # the head drafters' linears follow it
        else:
            _MEASURED[key] = RowPadding(plain)
    return _MEASURED[key]
