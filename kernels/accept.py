"""Batched tree acceptance in one Triton launch per step: the greedy walk and the lossless
sampling walk, one program per sequence, reading the target (and draft) probabilities in
place.

Same signatures and same results as the PyTorch references in
:mod:`osd.specdec.accept_batch` (for the same uniforms; the rules, the tree representation
and the exactness argument are documented in :mod:`osd.specdec.accept`). The tree's
topology comes from the same :class:`~osd.specdec.accept_batch.TreeBatch`.

Why it is one program per sequence: the walk is sequential over a tree's nodes (node
``j`` is tested only if the walk stands at its parent), but every test is a handful of
reductions over the vocabulary, which the program does in ``BLOCK``-wide vector loops
with masked loads — so a vocabulary that is not a multiple of ``BLOCK`` never reads or
writes index ``V``. The sampling walk keeps the current target row ``r`` in a ``[B, V]``
scratch buffer; the recovered / bonus token is drawn from it at the end by an inverse CDF
with a running (blockwise) cumulative sum.

An accepted node is never undone (the walk only moves down), so the kernel writes the
accepted path as it goes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from osd.specdec.accept import RESIDUAL_EPS, _describe, _uniforms
from osd.specdec.accept_batch import BatchAcceptResult, TreeBatch, _float_tensor

__all__ = ["accept_greedy_batch", "accept_sampling_batch"]

BLOCK_V = 1024


def _outputs(batch: int, width: int, device) -> tuple[torch.Tensor, ...]:
    """What a walk kernel writes: path and accepted tokens ``[B, max(W, 1)]`` (-1 filled),
    count, next token, bonus flag ``[B]``."""
    path = torch.full((batch, max(width, 1)), -1, dtype=torch.long, device=device)
    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    return path, path.clone(), zeros, zeros.clone(), zeros.to(torch.int8)


@triton.jit
def _greedy_kernel(
    tok_ptr,  # [B, n] int64
    par_ptr,  # [B, n] int64 (padding <= -2)
    leaf_ptr,  # [B, n] int8
    root_leaf_ptr,  # [B] int8
    am_ptr,  # [B, n + 1] int64 target argmax
    path_ptr,  # [B, W] int64 out, pre-filled with -1
    acc_tok_ptr,  # [B, W] int64 out, pre-filled with -1
    count_ptr,  # [B] int64 out
    next_ptr,  # [B] int64 out
    bonus_ptr,  # [B] int8 out
    n,
    W,
):
    b = tl.program_id(0).to(tl.int64)
    cur = tl.full([], -1, tl.int64)
    depth = tl.full([], 0, tl.int64)
    for j in range(n):
        par = tl.load(par_ptr + b * n + j)
        tok = tl.load(tok_ptr + b * n + j)
        want = tl.load(am_ptr + b * (n + 1) + par + 1, mask=par >= -1, other=-1)
        ok = (par == cur) & (tok == want)
        if ok:
            jj = cur * 0 + j
            tl.store(path_ptr + b * W + depth, jj)
            tl.store(acc_tok_ptr + b * W + depth, tok)
            depth += 1
            cur = jj
    tl.store(count_ptr + b, depth)
    tl.store(next_ptr + b, tl.load(am_ptr + b * (n + 1) + cur + 1))
    leaf = tl.load(leaf_ptr + b * n + cur, mask=cur >= 0, other=0)
    root_leaf = tl.load(root_leaf_ptr + b)
    tl.store(bonus_ptr + b, tl.where(cur >= 0, leaf, root_leaf))


def accept_greedy_batch(
    tokens: torch.Tensor,  # [B, n]
    parents: torch.Tensor,  # [n] or [B, n]
    target_argmax: torch.Tensor,  # [B, n + 1]
    trees: TreeBatch | None = None,
) -> BatchAcceptResult:
    """The Triton twin of :func:`osd.specdec.accept_batch.accept_greedy_batch` (siblings
    distinct, as every drafter proposes them under greedy decoding)."""
    batch, n = tokens.shape
    device = target_argmax.device
    tb = trees or TreeBatch.of(parents, batch, device)
    width = max(tb.max_depth, 0)
    tokens = tokens.to(device=device, dtype=torch.long).contiguous()
    path, acc_tok, count, nxt, bonus = _outputs(batch, width, device)
    if batch:
        _greedy_kernel[(batch,)](
            tokens,
            tb.parents.contiguous(),
            tb.leaf.to(torch.int8).contiguous(),
            tb.root_leaf.to(torch.int8).contiguous(),
            target_argmax.to(torch.long).contiguous(),
            path,
            acc_tok,
            count,
            nxt,
            bonus,
            n,
            max(width, 1),
        )
    return BatchAcceptResult(path[:, :width], acc_tok[:, :width], count, nxt, bonus.bool())


@triton.jit
def _row_sum(ptr, V, BLOCK: tl.constexpr):
    acc = tl.load(ptr + tl.arange(0, BLOCK), mask=tl.arange(0, BLOCK) < V, other=0.0)
    for start in range(BLOCK, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(ptr + offs, mask=offs < V, other=0.0)
    return tl.sum(acc, 0)


@triton.jit
def _residual(r_row, p_row, offs, V, x, sp, total, removed, point, EPS, HAS_P, WOR):
    """``max(r − d, 0)`` on one block, ``d`` the distribution the rejected child ``x`` was
    drawn from: ``p / sp`` (without replacement: earlier siblings zeroed, renormalised by
    ``total``, a point mass at ``x`` when nothing was left), or a point mass at ``x``."""
    r = tl.load(r_row + offs, mask=offs < V, other=0.0)
    if HAS_P:
        d = tl.load(p_row + offs, mask=offs < V, other=0.0) / sp
        if WOR:
            hit = tl.sum((offs[:, None] == removed[None, :]).to(tl.int32), 1)
            d = tl.where(hit > 0, 0.0, d) / tl.maximum(total, EPS)
            d = tl.where(point, tl.where(offs == x, 1.0, 0.0), d)
        res = tl.maximum(r - d, 0.0)
    else:
        res = tl.where(offs == x, 0.0, r)
    return res


@triton.jit
def _sampling_kernel(
    tok_ptr,  # [B, n] int64 (padding: 0)
    par_ptr,  # [B, n] int64 (padding <= -2)
    leaf_ptr,  # [B, n] int8
    last_ptr,  # [B, n] int8
    earlier_ptr,  # [B, n, n] int8
    size_ptr,  # [B] int64
    root_leaf_ptr,  # [B] int8
    q_ptr,  # [B, n + 1, V]
    p_ptr,  # [B, n, V] (unused without HAS_P)
    u_ptr,  # [B, n + 1]
    r_ptr,  # [B, V] scratch: the current target row
    path_ptr,  # [B, W] int64 out, -1 filled
    acc_tok_ptr,  # [B, W] int64 out, -1 filled
    count_ptr,  # [B] int64 out
    next_ptr,  # [B] int64 out
    bonus_ptr,  # [B] int8 out
    total_ptr,  # [B] out: mass of the final row (0: the walk reached a zero row)
    n,
    V,
    W,
    EPS: tl.constexpr,
    TINY: tl.constexpr,
    HAS_P: tl.constexpr,
    WOR: tl.constexpr,  # siblings drawn without replacement
    NPAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    r_row = r_ptr + b * V
    ar = tl.arange(0, BLOCK)
    sib = tl.arange(0, NPAD)
    # r = normalise(q[b, 0])
    q0 = q_ptr + b * (n + 1) * V
    s = tl.maximum(_row_sum(q0, V, BLOCK), TINY)
    for start in range(0, V, BLOCK):
        offs = start + ar
        tl.store(r_row + offs, tl.load(q0 + offs, mask=offs < V, other=0.0) / s, mask=offs < V)
    cur = tl.full([], -1, tl.int64)
    depth = tl.full([], 0, tl.int64)
    alive = tl.load(root_leaf_ptr + b) == 0
    bonus = tl.load(root_leaf_ptr + b)
    for j in range(n):
        par = tl.load(par_ptr + b * n + j)
        if alive & (par == cur):
            x = tl.load(tok_ptr + b * n + j)
            r_x = tl.load(r_row + x)
            u = tl.load(u_ptr + b * (n + 1) + j)
            p_x = tl.full([], 1.0, r_x.dtype)
            sp = tl.full([], 1.0, r_x.dtype)
            total = tl.full([], 1.0, r_x.dtype)
            point = tl.full([], 0, tl.int1)
            removed = tl.full([NPAD], -1, tl.int64)
            p_row = p_ptr + (b * n + j) * V  # (q itself when there is no p: never read)
            if HAS_P:
                sp = tl.maximum(_row_sum(p_row, V, BLOCK), TINY)
                p_x = tl.load(p_row + x) / sp
                if WOR:
                    # tokens of the earlier siblings, each counted once
                    ear = tl.load(earlier_ptr + (b * n + j) * n + sib, mask=sib < n, other=0)
                    sib_tok = tl.load(tok_ptr + b * n + sib, mask=sib < n, other=-1)
                    removed = tl.where(ear != 0, sib_tok, -1)
                    same = (removed[:, None] == removed[None, :]) & (sib[None, :] < sib[:, None])
                    first = (tl.sum(same.to(tl.int32), 1) == 0) & (removed >= 0)
                    gone = tl.load(p_row + removed, mask=first, other=0.0) / sp
                    total = 1.0 - tl.sum(gone, 0)
                    x_removed = tl.sum((removed == x).to(tl.int32), 0) > 0
                    point = total <= EPS
                    p_x = tl.where(x_removed, 0.0, p_x) / tl.maximum(total, EPS)
                    p_x = tl.where(point, 1.0, p_x)
            if u * p_x < r_x:  # accept node j: the walk moves below it
                q_row = q_ptr + (b * (n + 1) + j + 1) * V
                s = tl.maximum(_row_sum(q_row, V, BLOCK), TINY)
                for start in range(0, V, BLOCK):
                    offs = start + ar
                    row = tl.load(q_row + offs, mask=offs < V, other=0.0)
                    tl.store(r_row + offs, row / s, mask=offs < V)
                jj = cur * 0 + j
                tl.store(path_ptr + b * W + depth, jj)
                tl.store(acc_tok_ptr + b * W + depth, x)
                depth += 1
                cur = jj
                if tl.load(leaf_ptr + b * n + j) != 0:
                    bonus = tl.full([], 1, tl.int8)
                    alive = tl.full([], 0, tl.int1)
            else:  # reject: r <- norm(max(r - d, 0)), kept as is when that is ~0
                res_sum = tl.zeros([BLOCK], r_x.dtype)
                for start in range(0, V, BLOCK):
                    offs = start + ar
                    res_sum += _residual(
                        r_row, p_row, offs, V, x, sp, total, removed, point, EPS, HAS_P, WOR
                    )
                res_total = tl.sum(res_sum, 0)
                if res_total > EPS:
                    for start in range(0, V, BLOCK):
                        offs = start + ar
                        res = _residual(
                            r_row, p_row, offs, V, x, sp, total, removed, point, EPS, HAS_P, WOR
                        )
                        tl.store(r_row + offs, res / res_total, mask=offs < V)
                if tl.load(last_ptr + b * n + j) != 0:
                    alive = tl.full([], 0, tl.int1)
    # the recovered / bonus token: inverse CDF of the final row with the last uniform
    size = tl.load(size_ptr + b)
    u_last = tl.load(u_ptr + b * (n + 1) + size)
    total = _row_sum(r_row, V, BLOCK)
    thresh = u_last * total
    carry = total * 0.0
    found = tl.full([], 2147483647, tl.int64)
    last_nz = tl.full([], -1, tl.int64)
    for start in range(0, V, BLOCK):
        offs = start + ar
        row = tl.load(r_row + offs, mask=offs < V, other=0.0)
        cdf = carry + tl.cumsum(row, 0)
        cand = tl.where((cdf > thresh) & (offs < V), offs.to(tl.int64), 2147483647)
        found = tl.minimum(found, tl.min(cand, 0))
        last_nz = tl.maximum(last_nz, tl.max(tl.where(row > 0, offs.to(tl.int64), -1), 0))
        carry += tl.sum(row, 0)
    tl.store(next_ptr + b, tl.where(found < V, found, last_nz))
    tl.store(count_ptr + b, depth)
    tl.store(bonus_ptr + b, bonus)
    tl.store(total_ptr + b, total)


def accept_sampling_batch(
    tokens: torch.Tensor,
    parents: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor | None,
    without_replacement: bool = False,
    generator: torch.Generator | None = None,
    *,
    uniforms: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    trees: TreeBatch | None = None,
    check_siblings: bool = True,
) -> BatchAcceptResult:
    """The Triton twin of :func:`osd.specdec.accept_batch.accept_sampling_batch`: same
    arguments, same results for the same uniforms (``check_siblings`` is accepted for the
    signature; repeated siblings are handled as the reference handles them)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (B, n), got {_describe(tokens)}")
    batch, n = tokens.shape
    device = q.device
    tb = trees or TreeBatch.of(parents, batch, device)
    qx = _float_tensor("q", q, (batch, n + 1, -1), dtype).contiguous()
    vocab = qx.shape[2]
    real = tb.parents >= -1
    tokens = tokens.to(device=device, dtype=torch.long)
    if n and bool((((tokens < 0) | (tokens >= vocab)) & real).any()):
        raise ValueError(f"tokens must lie in [0, {vocab})")
    tokens = tokens.masked_fill(~real, 0).contiguous()
    px = None
    if p is not None:
        px = _float_tensor("p", p.to(device), (batch, n, vocab), dtype).contiguous()
    u = _uniforms(uniforms, (batch, n + 1), generator, device).to(dtype).contiguous()
    width = max(tb.max_depth, 0)
    path, acc_tok, count, nxt, bonus = _outputs(batch, width, device)
    total = torch.zeros(batch, dtype=dtype, device=device)
    scratch = torch.empty(batch, vocab, dtype=dtype, device=device)
    if batch:
        _sampling_kernel[(batch,)](
            tokens,
            tb.parents.contiguous(),
            tb.leaf.to(torch.int8).contiguous(),
            tb.last.to(torch.int8).contiguous(),
            tb.earlier.to(torch.int8).contiguous(),
            tb.sizes.to(torch.long).contiguous(),
            tb.root_leaf.to(torch.int8).contiguous(),
            qx,
            qx if px is None else px,
            u,
            scratch,
            path,
            acc_tok,
            count,
            nxt,
            bonus,
            total,
            n,
            vocab,
            max(width, 1),
            EPS=RESIDUAL_EPS,
            TINY=torch.finfo(dtype).tiny,
            HAS_P=px is not None,
            WOR=bool(without_replacement) and px is not None,
            NPAD=triton.next_power_of_2(max(n, 1)),
            BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)),
        )
    if bool((total <= 0).any()):
        raise ValueError("a target distribution row reached by the walk sums to 0")
    return BatchAcceptResult(path[:, :width], acc_tok[:, :width], count, nxt, bonus.bool())
