"""Distillation losses between a draft and a *sparse* target, at logged positions.

Terms:

- **positions** ``m``: the logged positions of a batch, flattened; one row each.
- **sparse target**: what a serving replica logs at a position (DESIGN §4) — the target's
  top-``k`` token ids, their log-probs at temperature 1, and the log of the mass outside
  the top-``k`` (the **tail**). See :class:`SparseTarget`.
- **support**: the ``k`` top-``k`` tokens plus ONE **tail bucket** that merges every other
  token; ``k + 1`` buckets per position. Both distributions are compared on it:
  ``q`` (target) = ``(exp(topk_logprobs), exp(tail_logmass))``;
  ``p`` (draft) = ``(softmax(draft_logits)[topk_ids], mass of every other token)``.
  When ``k = V`` the tail is empty (``tail_logmass = -inf``) and the support is the
  vocabulary, so every loss below is *exact*.

Losses (``q`` target, ``p`` draft, sums over the support; each is ``[m]``, one per
position; reduce with :func:`reduce_loss`, or call :func:`distill_loss` by name):

- ``"fkl"`` forward KL ``KL(q || p) = Σ q (log q − log p)`` — mass covering.
- ``"rkl"`` reverse KL ``KL(p || q) = Σ p (log p − log q)`` — mode seeking.
- ``"jsd"`` generalised Jensen–Shannon ``β·KL(q || μ) + (1 − β)·KL(p || μ)`` with
  ``μ = β q + (1 − β) p``, ``0 < β < 1``; bounded by the binary entropy ``H(β) ≤ log 2``.
- ``"tvd"`` total variation ``½ Σ |q − p|``, in ``[0, 1]``.
- ``"ce"`` hard-label cross entropy ``−log p(argmax q)``, the argmax over the top-``k``
  ids — the target's greedy token (no tail token can beat the top-``k``).

:func:`expected_acceptance` is ``Σ min(p, q) = 1 − TVD`` on the support: the chance that
speculative sampling accepts a draft token at that position. It is exact when ``k = V`` and
an **upper bound** otherwise: merging the tail into one bucket can only raise it, since
``min(Σ_tail p, Σ_tail q) ≥ Σ_tail min(p, q)``. The promotion gate compares versions with
it, and both versions are measured with the same bias.

Temperature ``T`` (for training at the serving temperature):

- draft: ``softmax(draft_logits / T)``, bucketed afterwards — exact.
- target: log-probs are logits up to a per-position constant, so the top-``k`` are
  re-tempered **exactly relative to each other**: ``softmax(topk_logprobs / T)``. The tail
  is only known as one total, so its **share is kept at its T = 1 mass** and the top-``k``
  share ``1 − q_tail`` is split by the tempered ratios. This is the one approximation: the
  true tempered tail shrinks for ``T < 1`` and grows for ``T > 1`` by an amount that needs
  the tail's shape, which is not logged. It is exact when ``T = 1`` (any ``k``) and when
  ``k = V`` (any ``T``: the tail is empty). With ``T ≠ 1`` and ``k < V`` the acceptance
  estimate is neither exact nor a guaranteed bound.

Worked example (``V = 4``, ``k = 2``; ``q = (0.5, 0.3, 0.2, 0)``, a uniform draft):

>>> import torch
>>> target = SparseTarget(
...     topk_ids=torch.tensor([[0, 1]]),                      # [m=1, k=2]
...     topk_logprobs=torch.tensor([[0.5, 0.3]]).log(),       # [1, 2]
...     tail_logmass=torch.tensor([0.2]).log(),               # [1]: tokens 2 and 3
... )
>>> log_p, log_q = bucket_logprobs(torch.zeros(1, 4), target)  # p = (.25, .25, .5)
>>> [round(x, 4) for x in log_q.exp()[0].tolist()]
[0.5, 0.3, 0.2]
>>> [round(x, 4) for x in log_p.exp()[0].tolist()]
[0.25, 0.25, 0.5]
>>> round(distill_loss("fkl", torch.zeros(1, 4), target).item(), 4)  # .5 ln2 + .3 ln1.2 + .2 ln.4
0.218
>>> round(distill_loss("tvd", torch.zeros(1, 4), target).item(), 4)  # ½(.25 + .05 + .3)
0.3
>>> round(distill_loss("ce", torch.zeros(1, 4), target).item(), 4)   # −ln p(token 0)
1.3863

A draft that puts its tail mass on token 3 instead of token 2 matches on the buckets
(``p = (0.5, 0.3, 0.2)``) although it would be accepted with probability ``0.8``, not 1:

>>> draft = torch.tensor([[0.5, 0.3, 0.0, 0.2]]).log()            # [1, V=4]; token 2: -inf
>>> round(expected_acceptance(draft, target).item(), 4)           # the upper bound
1.0

Numerics: everything is computed in log space in at least float32. The draft's tail is a
``logsumexp`` over the non-top-``k`` logits (masked), not ``1 − Σ p``. ``0 · log 0 = 0``
everywhere, and gradients stay finite with one-hot or zero targets and an empty tail. The
reverse KL floors ``log q`` at :data:`LOG_FLOOR` (``e^-100 ≈ 4e-44``, below float32's
normal range): a target zero where the draft has mass then costs a large finite amount
instead of ``+inf`` with NaN gradients. The target's buckets are renormalised (a
``log_softmax`` over the ``k + 1`` values), absorbing rounding in the logged numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LOSS_NAMES = ("fkl", "rkl", "jsd", "tvd", "ce")
LOG_FLOOR = -100.0  # reverse KL floors log q here (nats); e^-100 ≈ 3.7e-44

Reduction = Literal["mean", "sum", "none"]


@dataclass(frozen=True)
class SparseTarget:
    """The target's distribution at ``m`` positions, as logged: top-``k`` + tail mass."""

    topk_ids: Tensor  # [m, k] int64: the target's k most likely tokens, distinct per row
    topk_logprobs: Tensor  # [m, k] float: their log-probs at temperature 1
    tail_logmass: Tensor  # [m] float: log of the mass outside the top-k; -inf when k = V


# ---- input checks ------------------------------------------------------------------------


def check_inputs(draft_logits: Tensor, target: SparseTarget, temperature: float = 1.0) -> None:
    """Raise ``ValueError`` naming the shapes if the draft and the target do not fit."""
    if draft_logits.ndim != 2 or not draft_logits.is_floating_point():
        raise ValueError(
            f"draft_logits must be a float [m, V] tensor; got shape {tuple(draft_logits.shape)} "
            f"and dtype {draft_logits.dtype}"
        )
    m, vocab = draft_logits.shape
    ids, logprobs, tail = target.topk_ids, target.topk_logprobs, target.tail_logmass
    if ids.ndim != 2 or ids.shape[0] != m:
        raise ValueError(
            f"topk_ids must be [m, k] with m = {m} rows like draft_logits "
            f"{tuple(draft_logits.shape)}; got {tuple(ids.shape)}"
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor; got dtype {ids.dtype}")
    k = ids.shape[1]
    if not 1 <= k <= vocab:
        raise ValueError(
            f"need 1 <= k <= V; topk_ids {tuple(ids.shape)} has k = {k} and draft_logits "
            f"{tuple(draft_logits.shape)} has V = {vocab}"
        )
    if logprobs.shape != ids.shape or not logprobs.is_floating_point():
        raise ValueError(
            f"topk_logprobs must be a float tensor shaped like topk_ids {tuple(ids.shape)}; "
            f"got {tuple(logprobs.shape)} ({logprobs.dtype})"
        )
    if tail.shape != (m,) or not tail.is_floating_point():
        raise ValueError(
            f"tail_logmass must be a float [m] = ({m},) tensor; got {tuple(tail.shape)} "
            f"({tail.dtype})"
        )
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(
            f"temperature must be finite and > 0; got {temperature} (for greedy decoding "
            "train with the 'ce' loss at temperature 1)"
        )
    if m == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(
            f"topk_ids must lie in [0, V) = [0, {vocab}) for draft_logits "
            f"{tuple(draft_logits.shape)}; found ids in [{lo}, {hi}] — does the draft share "
            "the target's tokenizer?"
        )
    sorted_ids = ids.sort(dim=1).values
    if bool((sorted_ids[:, 1:] == sorted_ids[:, :-1]).any()):
        raise ValueError(f"topk_ids {tuple(ids.shape)} repeats a token within a row")
    if bool(logprobs.isnan().any() | (logprobs == float("inf")).any() | tail.isnan().any()):
        raise ValueError(
            f"topk_logprobs {tuple(logprobs.shape)} / tail_logmass {tuple(tail.shape)} "
            "contain NaN or +inf"
        )
    if bool((logprobs.amax(dim=1) == float("-inf")).any()):
        raise ValueError(
            f"every row of topk_logprobs {tuple(logprobs.shape)} needs a finite log-prob"
        )


# ---- the (k + 1)-bucket support ----------------------------------------------------------


def _logsumexp(x: Tensor) -> Tensor:
    """``logsumexp`` over the last dim that gives ``-inf`` with zero gradient for a row of
    ``-inf`` (``torch.logsumexp``'s backward is NaN there).

    x: [m, n] -> [m]
    """
    peak = x.amax(dim=-1, keepdim=True).detach()  # [m, 1]; the result does not depend on it
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = (x - peak).exp().sum(dim=-1)  # [m]
    nonempty = total > 0
    safe = torch.where(nonempty, total, torch.ones_like(total))
    return torch.where(nonempty, safe.log() + peak.squeeze(-1), torch.full_like(total, -torch.inf))


def draft_bucket_logprobs(draft_logits: Tensor, topk_ids: Tensor, temperature: float) -> Tensor:
    """The draft's log-probs on the support: the top-``k`` ids, then the tail bucket.

    draft_logits: [m, V], topk_ids: [m, k] -> [m, k + 1]
    e.g. logits 0 over V = 4, ids (0, 1): log (0.25, 0.25, 0.5).
    """
    dtype = torch.promote_types(draft_logits.dtype, torch.float32)
    z = draft_logits.to(dtype) / temperature  # [m, V]
    total = _logsumexp(z)  # [m]
    head = z.gather(1, topk_ids) - total[:, None]  # [m, k]
    in_topk = torch.zeros_like(z, dtype=torch.bool).scatter_(1, topk_ids, True)  # [m, V]
    tail = _logsumexp(z.masked_fill(in_topk, -torch.inf)) - total  # [m]; -inf when k = V
    return torch.cat([head, tail[:, None]], dim=1)


def target_bucket_logprobs(target: SparseTarget, temperature: float) -> Tensor:
    """The target's log-probs on the support at temperature ``T``: [m, k + 1].

    The top-``k`` are re-tempered exactly relative to each other; the tail keeps its T = 1
    share (module docstring). e.g. ``q = (0.5, 0.3 | tail 0.2)`` at ``T = 0.5``: the top-2
    share 0.8 splits 25 : 9, giving ``(0.588, 0.212 | 0.2)``.
    """
    dtype = torch.promote_types(target.topk_logprobs.dtype, torch.float32)
    logits = torch.cat([target.topk_logprobs, target.tail_logmass[:, None]], dim=1).to(dtype)
    log_q = torch.log_softmax(logits, dim=1)  # [m, k + 1]; renormalised at T = 1
    if temperature == 1.0:
        return log_q
    head, tail = log_q[:, :-1], log_q[:, -1:]  # [m, k], [m, 1]
    head_share = torch.logsumexp(head, dim=1, keepdim=True)  # [m, 1]: log(1 − q_tail)
    head = head_share + torch.log_softmax(head / temperature, dim=1)  # [m, k]
    return torch.cat([head, tail], dim=1)


def bucket_logprobs(
    draft_logits: Tensor, target: SparseTarget, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """``(log p, log q)`` on the ``k + 1`` buckets, each [m, k + 1]; checks inputs first."""
    check_inputs(draft_logits, target, temperature)
    log_p = draft_bucket_logprobs(draft_logits, target.topk_ids, temperature)
    log_q = target_bucket_logprobs(target, temperature).to(log_p.dtype)
    return log_p, log_q


# ---- losses between two distributions on one support --------------------------------------
# Each takes log-distributions [m, n] (rows sum to 1; -inf for zeros) and returns [m].


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``KL(a || b) = Σ a (log a − log b)`` with ``0 · log 0 = 0``: [m, n] x 2 -> [m]."""
    a = log_a.exp()
    present = a > 0
    gap = torch.where(present, log_a - log_b, torch.zeros_like(log_a))  # no -inf − -inf NaN
    return (a * gap).sum(dim=-1)


def forward_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(q || p)``, q target, p draft: [m, n] x 2 -> [m]. ``+inf`` only if p = 0 < q."""
    return _kl(log_q, log_p)


def reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` with ``log q`` floored at :data:`LOG_FLOOR`: [m, n] x 2 -> [m]."""
    return _kl(log_p, log_q.clamp(min=LOG_FLOOR))


def _log_mix(log_a: Tensor, log_b: Tensor, beta: float) -> Tensor:
    """``log(β a + (1 − β) b)``, ``-inf`` with zero gradient where a = b = 0."""
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)
    zero = torch.zeros_like(log_a)
    mixed = torch.logaddexp(
        torch.where(both_zero, zero, log_a) + math.log(beta),
        torch.where(both_zero, zero, log_b) + math.log1p(-beta),
    )
    return torch.where(both_zero, torch.full_like(mixed, -torch.inf), mixed)


def jsd(log_p: Tensor, log_q: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised JSD ``β·KL(q || μ) + (1 − β)·KL(p || μ)``, ``μ = β q + (1 − β) p``.

    [m, n] x 2 -> [m]; in ``[0, H(β)]``, ``H(0.5) = log 2``; symmetric at ``β = 0.5``.
    e.g. ``q = (1, 0)``, ``p = (0, 1)``, ``β = 0.5``: ``log 2 ≈ 0.6931``.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1; got beta = {beta}")
    log_mu = _log_mix(log_q, log_p, beta)  # [m, n]
    return beta * _kl(log_q, log_mu) + (1.0 - beta) * _kl(log_p, log_mu)


def tvd(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Total variation ``½ Σ |q − p|`` in ``[0, 1]``: [m, n] x 2 -> [m]."""
    return 0.5 * (log_q.exp() - log_p.exp()).abs().sum(dim=-1)


def acceptance(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``Σ min(p, q) = 1 − TVD``, the speculative-sampling acceptance: [m, n] x 2 -> [m]."""
    return torch.minimum(log_p.exp(), log_q.exp()).sum(dim=-1)


def hard_ce(log_p: Tensor, label: Tensor) -> Tensor:
    """``−log p(label)``: log_p [m, n], label [m] (bucket index) -> [m]."""
    return -log_p.gather(1, label[:, None]).squeeze(1)


# ---- the sparse-target entry points ------------------------------------------------------


def reduce_loss(loss: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Per-position loss [m] -> scalar (``"mean"``, ``"sum"``) or [m] (``"none"``).

    The mean over no positions is 0 (and keeps the graph), not NaN.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")
    if reduction == "none":
        return loss
    if reduction == "sum" or loss.numel() == 0:
        return loss.sum()
    return loss.mean()


def distill_loss(
    name: str,
    draft_logits: Tensor,
    target: SparseTarget,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    reduction: Reduction = "mean",
) -> Tensor:
    """The loss ``name`` (one of :data:`LOSS_NAMES`) of the draft against the sparse target.

    draft_logits: [m, V] (differentiable); ``beta`` is used by ``"jsd"`` only.
    Returns a scalar, or [m] with ``reduction="none"``.
    """
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown distillation loss {name!r}; choose one of {LOSS_NAMES}")
    log_p, log_q = bucket_logprobs(draft_logits, target, temperature)  # [m, k + 1] each
    match name:
        case "fkl":
            loss = forward_kl(log_p, log_q)
        case "rkl":
            loss = reverse_kl(log_p, log_q)
        case "jsd":
            loss = jsd(log_p, log_q, beta)
        case "tvd":
            loss = tvd(log_p, log_q)
        case _:  # "ce": the target's greedy token is the argmax of its top-k
            loss = hard_ce(log_p, target.topk_logprobs.argmax(dim=1))
    return reduce_loss(loss, reduction)


def expected_acceptance(
    draft_logits: Tensor, target: SparseTarget, temperature: float = 1.0
) -> Tensor:
    """``Σ min(p, q)`` on the support, per position: [m].

    Exact when ``k = V``; an upper bound on the true acceptance when ``k < V`` (at
    ``T = 1``; see the module docstring for ``T ≠ 1``). Differentiable; wrap in
    ``torch.no_grad()`` to evaluate.
    """
    return acceptance(*bucket_logprobs(draft_logits, target, temperature))
