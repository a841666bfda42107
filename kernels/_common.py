"""Jit helpers shared by the kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _lse_pass(x_row, ids, V, inv_t, BLOCK: tl.constexpr, TAIL_ONLY: tl.constexpr):
    """log-sum-exp of z = x / T over the row (or over the tokens not in ``ids``)."""
    ar = tl.arange(0, BLOCK)
    mx = tl.full([], float("-inf"), tl.float32)
    acc = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + ar
        z = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_t
        if TAIL_ONLY:
            hit = tl.sum((offs.to(tl.int64)[:, None] == ids[None, :]).to(tl.int32), 1)
            z = tl.where(hit > 0, float("-inf"), z)
        new = tl.maximum(mx, tl.max(z, 0))
        safe = tl.where(new == float("-inf"), 0.0, new)
        acc = acc * tl.exp(mx - safe) + tl.sum(tl.exp(z - safe), 0)
        mx = new
    return tl.where(acc > 0, mx + tl.log(acc), float("-inf"))
