"""Top-k + tail-mass extraction for the distill records, straight from the verifier's logits.

A replica logs, at each logged position, the target's ``k`` most likely tokens, their
log-probs (temperature 1) and the log of the mass outside them (DESIGN §4,
:mod:`osd.distill.record`). :func:`topk_tail` computes the three from ``[m, V]`` logits in
one launch, one program per row: a pass for the log-normaliser (online max / sum-exp), ``k``
selection passes (each the largest logit not yet taken; ties go to the lower index), and a
pass for the tail's log-sum-exp over the tokens not taken — summed directly, not as
``1 − Σ top-k``, so a tiny tail keeps its precision. Outputs are fp16 (what the record
stores), the tail clamped to ``[LOG_FLOOR, 0]`` as the reference does.

The PyTorch reference with the same signature is :func:`osd.distill.record.topk_tail`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from osd.kernels._common import _lse_pass

__all__ = ["topk_tail"]

BLOCK_V = 1024


@triton.jit
def _topk_tail_kernel(
    x_ptr,  # [m, V] logits
    ids_ptr,  # [m, K] int64 out
    lp_ptr,  # [m, K] fp16 out
    tail_ptr,  # [m] fp16 out
    V,
    stride,
    K: tl.constexpr,
    KPAD: tl.constexpr,
    LOG_FLOOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride
    ar = tl.arange(0, BLOCK)
    # log-normaliser, online
    kk = tl.arange(0, KPAD)
    log_z = _lse_pass(x_row, tl.full([KPAD], -1, tl.int64), V, 1.0, BLOCK, False)
    # k selection passes
    taken = tl.full([KPAD], -1, tl.int64)
    for i in range(K):
        best = tl.full([], float("-inf"), tl.float32)
        best_id = tl.full([], -1, tl.int64)
        for start in range(0, V, BLOCK):
            offs = start + ar
            z = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            hit = tl.sum((offs.to(tl.int64)[:, None] == taken[None, :]).to(tl.int32), 1)
            free = (hit == 0) & (offs < V)
            z = tl.where(free, z, float("-inf"))
            bm = tl.max(z, 0)
            bi = tl.min(tl.where((z == bm) & free, offs.to(tl.int64), 1 << 62), 0)
            better = (bm > best) | ((best_id < 0) & (bi < (1 << 62)))
            best_id = tl.where(better, bi, best_id)
            best = tl.where(better, bm, best)
        taken = tl.where(kk == i, best_id, taken)
        tl.store(ids_ptr + row * K + i, best_id)
        lp = tl.minimum(tl.maximum(best - log_z, LOG_FLOOR), 0.0)
        tl.store(lp_ptr + row * K + i, lp.to(tl.float16))
    # the tail: log-sum-exp of the tokens not taken (-inf when none is left)
    tail = _lse_pass(x_row, taken, V, 1.0, BLOCK, True) - log_z
    tail = tl.minimum(tl.maximum(tail, LOG_FLOOR), 0.0)
    tl.store(tail_ptr + row, tail.to(tl.float16))


def topk_tail(
    logits: torch.Tensor, k: int, log_floor: float = -30.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[m, V]`` logits → ``(ids [m, k] int64, logprobs [m, k] fp16 descending,
    tail [m] fp16)``; ``k`` is capped at ``V`` (then the tail is ``log_floor``)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be [m, V], got {list(logits.shape)}")
    m, vocab = logits.shape
    k = min(int(k), vocab)
    logits = logits.detach()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    ids = torch.empty(m, k, dtype=torch.long, device=logits.device)
    lp = torch.empty(m, k, dtype=torch.float16, device=logits.device)
    tail = torch.empty(m, dtype=torch.float16, device=logits.device)
    if m:
        _topk_tail_kernel[(m,)](
            logits,
            ids,
            lp,
            tail,
            vocab,
            logits.stride(0),
            K=k,
            KPAD=triton.next_power_of_2(k),
            LOG_FLOOR=log_floor,
            BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)),
        )
    return ids, lp, tail
