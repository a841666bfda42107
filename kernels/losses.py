"""Fused sparse distillation losses (FKL, RKL, JSD(β), TVD, CE on the top-k + tail bucket),
forward and backward, one program per logged position.

The reference is :func:`osd.distill.losses.distill_loss` (same arguments; the support, the
losses, the temperature rule and the numerics are documented there). What is fused is the
part that reads the vocabulary: the draft's log-normaliser, its top-``k`` log-probs and
its tail bucket (a log-sum-exp over the tokens outside the top-``k``) in the forward, and
``∂loss/∂logits`` over the whole row in the backward — without materialising the
``[m, V]`` log-softmax, the ``[m, V]`` top-k mask or autograd's intermediates. The
target's ``k + 1`` buckets are computed by the reference's
:func:`~osd.distill.losses.target_bucket_logprobs` (``[m, k + 1]``, small).

Backward, with ``z = logits / T``, ``s = softmax(z)``, ``g_b = ∂loss/∂log p_b`` per bucket
and ``G = Σ_b g_b``::

    ∂loss/∂logit_v = (g_{j(v)} [v in top-k] + g_tail · e^{z_v} / Σ_tail e^z [v not in top-k]
                      − s_v · G) / T

with ``g_b`` in closed form: FKL ``−q_b``; RKL ``p_b (log p_b − max(log q_b, floor) + 1)``;
JSD ``(1 − β) p_b (log p_b − log μ_b)``; TVD ``½ p_b sign(p_b − q_b)``; CE ``−1`` at the
label (``0 · log 0 = 0`` everywhere, as in the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from osd.kernels._common import _lse_pass

from osd.distill.losses import (
    LOG_FLOOR,
    LOSS_NAMES,
    Reduction,
    SparseTarget,
    check_inputs,
    reduce_loss,
    target_bucket_logprobs,
)

__all__ = ["sparse_distill_loss"]

BLOCK_V = 1024
_CODE = {name: i for i, name in enumerate(LOSS_NAMES)}  # fkl rkl jsd tvd ce


@triton.jit
def _loss_fwd_kernel(
    x_ptr,  # [m, V] draft logits
    ids_ptr,  # [m, K] int64
    lq_ptr,  # [m, K + 1] fp32 target bucket log-probs
    label_ptr,  # [m] int64 (ce)
    loss_ptr,  # [m] fp32 out
    g_ptr,  # [m, KB] fp32 out: dloss / dlog p per bucket
    lz_ptr,  # [m] fp32 out: log-normaliser of z
    lt_ptr,  # [m] fp32 out: log-sum-exp of z over the tail
    V,
    stride,
    inv_t,
    beta,
    K: tl.constexpr,
    KB: tl.constexpr,
    LOSS: tl.constexpr,
    FLOOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride
    kb = tl.arange(0, KB)
    ids = tl.load(ids_ptr + row * K + kb, mask=kb < K, other=-1)
    log_z = _lse_pass(x_row, ids, V, inv_t, BLOCK, False)
    log_tail = _lse_pass(x_row, ids, V, inv_t, BLOCK, True)
    head = tl.load(x_row + ids, mask=kb < K, other=0.0).to(tl.float32) * inv_t
    real = kb <= K
    lp = tl.where(kb < K, head - log_z, log_tail - log_z)
    lp = tl.where(real, lp, float("-inf"))
    lq = tl.load(lq_ptr + row * (K + 1) + kb, mask=real, other=float("-inf"))
    p = tl.exp(lp)
    q = tl.exp(lq)
    zero = tl.zeros([KB], tl.float32)
    if LOSS == 0:  # fkl: KL(q || p)
        loss = tl.sum(tl.where(q > 0, q * (lq - lp), zero), 0)
        g = -q
    elif LOSS == 1:  # rkl: KL(p || q), log q floored
        gap = tl.where(p > 0, lp - tl.maximum(lq, FLOOR), zero)
        loss = tl.sum(p * gap, 0)
        g = tl.where(p > 0, p * (gap + 1.0), zero)
    elif LOSS == 2:  # jsd(beta)
        mu = beta * q + (1.0 - beta) * p
        lmu = tl.where(mu > 0, tl.log(tl.where(mu > 0, mu, 1.0)), float("-inf"))
        kq = tl.sum(tl.where(q > 0, q * (lq - lmu), zero), 0)
        kp = tl.sum(tl.where(p > 0, p * (lp - lmu), zero), 0)
        loss = beta * kq + (1.0 - beta) * kp
        g = tl.where(p > 0, (1.0 - beta) * p * (lp - lmu), zero)
    elif LOSS == 3:  # tvd
        loss = 0.5 * tl.sum(tl.abs(q - p), 0)
        sign = tl.where(p > q, 1.0, tl.where(p < q, -1.0, 0.0))
        g = 0.5 * p * sign
    else:  # ce: -log p(label)
        label = tl.load(label_ptr + row)
        loss = -tl.sum(tl.where(kb == label, lp, zero), 0)
        g = tl.where(kb == label, -1.0, 0.0)
    g = tl.where(real, g, zero)
    tl.store(loss_ptr + row, loss)
    tl.store(g_ptr + row * KB + kb, g)
    tl.store(lz_ptr + row, log_z)
    tl.store(lt_ptr + row, log_tail)


@triton.jit
def _loss_bwd_kernel(
    x_ptr,  # [m, V]
    ids_ptr,  # [m, K]
    g_ptr,  # [m, KB]
    lz_ptr,  # [m]
    lt_ptr,  # [m]
    go_ptr,  # [m] upstream gradient
    dx_ptr,  # [m, V] out
    V,
    stride,
    dstride,
    inv_t,
    K: tl.constexpr,
    KB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride
    kb = tl.arange(0, KB)
    ids = tl.load(ids_ptr + row * K + kb, mask=kb < K, other=-1)
    g = tl.load(g_ptr + row * KB + kb)
    g_tail = tl.sum(tl.where(kb == K, g, 0.0), 0)
    g_all = tl.sum(g, 0)
    log_z = tl.load(lz_ptr + row)
    log_tail = tl.load(lt_ptr + row)
    scale = tl.load(go_ptr + row) * inv_t
    ar = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        offs = start + ar
        z = tl.load(x_row + offs, mask=offs < V, other=0.0).to(tl.float32) * inv_t
        eq = offs.to(tl.int64)[:, None] == ids[None, :]  # [BLOCK, KB]
        g_head = tl.sum(tl.where(eq, g[None, :], 0.0), 1)
        in_topk = tl.sum(eq.to(tl.int32), 1) > 0
        share = tl.where(log_tail > float("-inf"), tl.exp(z - log_tail), 0.0)
        d = tl.where(in_topk, g_head, g_tail * share) - tl.exp(z - log_z) * g_all
        tl.store(
            dx_ptr + row * dstride + offs, (d * scale).to(dx_ptr.dtype.element_ty), mask=offs < V
        )


class _SparseLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, log_q, label, code, temperature, beta):
        m, vocab = logits.shape
        k = ids.shape[1]
        kb = triton.next_power_of_2(k + 1)
        dev = logits.device
        loss = torch.empty(m, dtype=torch.float32, device=dev)
        g = torch.empty(m, kb, dtype=torch.float32, device=dev)
        lz = torch.empty(m, dtype=torch.float32, device=dev)
        lt = torch.empty(m, dtype=torch.float32, device=dev)
        block = min(BLOCK_V, triton.next_power_of_2(vocab))
        if m:
            _loss_fwd_kernel[(m,)](
                logits, ids, log_q, label, loss, g, lz, lt, vocab, logits.stride(0),
                1.0 / temperature, beta, K=k, KB=kb, LOSS=code, FLOOR=LOG_FLOOR, BLOCK=block,
            )  # fmt: skip
        ctx.save_for_backward(logits, ids, g, lz, lt)
        ctx.temperature, ctx.block = temperature, block
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        logits, ids, g, lz, lt = ctx.saved_tensors
        m, vocab = logits.shape
        dx = torch.empty_like(logits)
        if m:
            _loss_bwd_kernel[(m,)](
                logits, ids, g, lz, lt, grad_out.contiguous().float(), dx, vocab,
                logits.stride(0), dx.stride(0), 1.0 / ctx.temperature,
                K=ids.shape[1], KB=g.shape[1], BLOCK=ctx.block,
            )  # fmt: skip
        return dx, None, None, None, None, None, None


def sparse_distill_loss(
    name: str,
    draft_logits: torch.Tensor,
    target: SparseTarget,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """The Triton twin of :func:`osd.distill.losses.distill_loss` (same arguments)."""
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown distillation loss {name!r}; choose one of {LOSS_NAMES}")
    if name == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1; got beta = {beta}")
    check_inputs(draft_logits, target, temperature)
    log_q = target_bucket_logprobs(target, temperature).float().contiguous()  # [m, k + 1]
    label = target.topk_logprobs.argmax(dim=1).contiguous()
    logits = draft_logits if draft_logits.stride(1) == 1 else draft_logits.contiguous()
    ids = target.topk_ids.to(torch.long).contiguous()
    loss = _SparseLoss.apply(logits, ids, log_q, label, _CODE[name], float(temperature), beta)
    return reduce_loss(loss, reduction)
