"""Lossless speculative sampling for many trees of one topology, vectorised over the batch.

:func:`accept_sampling_batch` applies the rules of :func:`osd.specdec.accept.accept_sampling`
(terms, tree representation, edge cases and the exactness argument are in that module's
docstring) to ``B`` trees at once: tree ``b`` has tokens ``tokens[b]``, targets ``q[b]`` and
drafts ``p[b]``, and all share ``parents``. The ``*_rows`` helpers are the row-wise twins
of the one-tree helpers in ``osd.specdec.accept``; for the same uniforms both paths give
identical results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from osd.specdec.accept import (
    RESIDUAL_EPS,
    AcceptResult,
    _check_shape,
    _check_vector,
    _children,
    _depths,
    _describe,
    _uniforms,
)

__all__ = ["BatchAcceptResult", "accept_sampling_batch"]


@dataclass(frozen=True)
class BatchAcceptResult:
    """Acceptance outcomes of ``B`` trees with one topology (see :func:`accept_sampling_batch`).

    Attributes:
        path: ``[B, max_depth]`` accepted node indices from the root down, ``-1`` after the end.
        accepted_tokens: ``[B, max_depth]`` their tokens, ``-1`` after the end.
        num_accepted: ``[B]`` number of accepted tokens.
        next_token: ``[B]`` bonus or recovered token.
        is_bonus: ``[B]`` bool, True for a bonus token.
    """

    path: torch.Tensor
    accepted_tokens: torch.Tensor
    num_accepted: torch.Tensor
    next_token: torch.Tensor
    is_bonus: torch.Tensor

    def __len__(self) -> int:
        return self.next_token.shape[0]

    def unbind(self) -> list[AcceptResult]:
        """One :class:`AcceptResult` per tree."""
        out = []
        for path, toks, count, nxt, bonus in zip(
            self.path.tolist(),
            self.accepted_tokens.tolist(),
            self.num_accepted.tolist(),
            self.next_token.tolist(),
            self.is_bonus.tolist(),
            strict=True,
        ):
            out.append(AcceptResult(path[:count], toks[:count], nxt, bonus))
        return out


def _float64_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` as a float64 tensor, checked: ``shape`` and finite non-negative values."""
    _check_shape(name, t, shape)
    t = t.detach().to(torch.float64)
    if t.numel() and not (bool(t.min() >= 0) and bool(torch.isfinite(t.sum()))):
        raise ValueError(f"{name} must hold finite non-negative probabilities")
    return t


def _check_distinct_sibling_rows(tokens: torch.Tensor, children: list[list[int]]) -> None:
    """Row-wise :func:`_check_distinct_siblings` for ``tokens [B, n]``."""
    for siblings in children:
        if len(siblings) < 2:
            continue
        sibling_tokens = tokens[:, siblings]  # [B, k]
        equal = sibling_tokens[:, :, None] == sibling_tokens[:, None, :]  # [B, k, k]
        if bool((equal.sum((1, 2)) > len(siblings)).any()):
            raise ValueError(
                "without_replacement=True but siblings repeat a token; "
                "pass without_replacement=False for iid siblings"
            )


def _normalised_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows divided by their sums; all-zero rows stay zero. ``[B, V] -> [B, V]``."""
    return rows / rows.sum(-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)


def _residual_rows(
    target: torch.Tensor,  # [B, V]
    draft: torch.Tensor | None,  # [B, V]
    x: torch.Tensor,  # [B]
) -> torch.Tensor:
    """Row-wise :func:`_residual`. ``[B, V]``."""
    if draft is None:
        residual = target.scatter(1, x[:, None], 0.0)
    else:
        residual = (target - draft).clamp_min(0.0)
    total = residual.sum(-1, keepdim=True)  # [B, 1]
    return torch.where(total > RESIDUAL_EPS, residual / total.clamp_min(RESIDUAL_EPS), target)


def _draft_rows(
    p_rows: torch.Tensor,  # [B, V]
    removed: torch.Tensor | None,  # [B, k] tokens of earlier siblings
    x: torch.Tensor,  # [B]
) -> torch.Tensor:
    """Row-wise :func:`_draft`. ``[B, V]``."""
    draft = _normalised_rows(p_rows)
    if removed is None or removed.shape[1] == 0:
        return draft
    draft = draft.scatter(1, removed, 0.0)
    total = draft.sum(-1, keepdim=True)  # [B, 1]
    point = torch.zeros_like(draft).scatter_(1, x[:, None], 1.0)
    return torch.where(total > RESIDUAL_EPS, draft / total.clamp_min(RESIDUAL_EPS), point)


def _inverse_cdf_rows(dist: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row-wise :func:`_inverse_cdf`: ``dist [B, V]``, ``u [B]`` -> ``[B]``."""
    cdf = dist.cumsum(-1)  # [B, V]
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)  # [B]
    vocab = dist.shape[1]
    last_nonzero = vocab - 1 - (dist.flip(-1) > 0).int().argmax(-1)  # [B]
    return torch.where(index < vocab, index, last_nonzero)


def accept_sampling_batch(
    tokens: torch.Tensor,  # [B, n]
    parents: torch.Tensor,  # [n]
    q: torch.Tensor,  # [B, n + 1, V]
    p: torch.Tensor | None,  # [B, n, V]
    without_replacement: bool = False,
    generator: torch.Generator | None = None,
    *,
    uniforms: torch.Tensor | None = None,  # [B, n + 1]
) -> BatchAcceptResult:
    """:func:`accept_sampling` for ``B`` independent trees sharing one topology, vectorised.

    Tree ``b`` has tokens ``tokens[b]``, targets ``q[b]`` and drafts ``p[b]``; the nodes
    are visited once each in index order, and a node acts on the trees whose walk currently
    stands at its parent (one host sync per node, to select those trees). With the same
    ``uniforms[b]`` it returns exactly what :func:`accept_sampling` returns for tree ``b``.
    Used for batched verification and for the statistical tests (many draws of one tree).

    Args:
        tokens: ``[B, n]`` node tokens per tree.
        parents: ``[n]`` parent of each node, shared; topological order.
        q: ``[B, n + 1, V]`` warped target distributions.
        p: ``[B, n, V]`` warped draft distributions, or ``None`` for point masses.
        without_replacement: siblings were drawn without replacement from their ``p`` row.
        generator: source of the uniforms (on ``q``'s device).
        uniforms: ``[B, n + 1]`` uniforms in ``[0, 1)`` to use instead of drawing them.

    Returns:
        A :class:`BatchAcceptResult` with tensors on ``q``'s device.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (B, n), got {_describe(tokens)}")
    batch, n = tokens.shape
    par = _check_vector("parents", parents, n)
    children = _children(par)
    depth = _depths(par)
    q64 = _float64_tensor("q", q, (batch, n + 1, -1))  # [B, n + 1, V]
    vocab = q64.shape[2]
    device = q.device
    tokens = tokens.to(device=device, dtype=torch.long)
    if n and bool(((tokens < 0) | (tokens >= vocab)).any()):
        raise ValueError(f"tokens must lie in [0, {vocab})")
    p64 = None
    if p is not None:
        p64 = _float64_tensor("p", p.to(device), (batch, n, vocab))  # [B, n, V]
        if without_replacement:
            _check_distinct_sibling_rows(tokens, children)
    u = _uniforms(uniforms, (batch, n + 1), generator, device)  # [B, n + 1]

    cur = torch.full((batch,), -1, dtype=torch.long, device=device)  # node the walk is at
    alive = torch.ones(batch, dtype=torch.bool, device=device)  # walk not finished
    path = torch.full((batch, max(depth, default=0)), -1, dtype=torch.long, device=device)
    target = _normalised_rows(q64[:, 0])  # [B, V] r: current target
    final = torch.zeros_like(target)  # [B, V] the next token is drawn from this
    is_bonus = torch.zeros(batch, dtype=torch.bool, device=device)
    if not children[0]:
        final, is_bonus, alive = target.clone(), ~is_bonus, ~alive

    for j in range(n):
        siblings = children[par[j] + 1]
        rows = (alive & (cur == par[j])).nonzero().squeeze(1)  # [A] walks standing at the parent
        if rows.numel() == 0:
            continue
        x = tokens[rows, j]  # [A]
        r = target[rows]  # [A, V]
        draft = None
        p_x = torch.ones(rows.shape[0], dtype=torch.float64, device=device)  # [A]
        if p64 is not None:
            earlier = siblings[: siblings.index(j)] if without_replacement else []
            draft = _draft_rows(p64[rows, j], tokens[rows][:, earlier], x)  # [A, V]
            p_x = draft.gather(1, x[:, None]).squeeze(1)
        r_x = r.gather(1, x[:, None]).squeeze(1)  # [A]
        accept = u[rows, j] * p_x < r_x  # [A] probability min(1, r(x) / d(x))
        accepted, rejected = rows[accept], rows[~accept]
        fresh = _normalised_rows(q64[accepted, j + 1])  # [A_acc, V] target below node j
        target[rejected] = _residual_rows(
            r[~accept], None if draft is None else draft[~accept], x[~accept]
        )
        target[accepted] = fresh
        cur[accepted] = j
        path[accepted, depth[j] - 1] = j
        if not children[j + 1]:  # accepted a leaf: bonus token from below it
            final[accepted] = fresh
            is_bonus[accepted] = True
            alive[accepted] = False
        if j == siblings[-1]:  # rejected the last sibling: recovered token from the residual
            final[rejected] = target[rejected]
            alive[rejected] = False

    if bool((final.sum(-1) <= 0).any()):
        raise ValueError("a target distribution row reached by the walk sums to 0")
    next_token = _inverse_cdf_rows(final, u[:, n])  # [B]
    num_accepted = (path >= 0).sum(-1)  # [B]
    accepted_tokens = tokens.gather(1, path.clamp_min(0)).masked_fill(path < 0, -1)
    return BatchAcceptResult(path, accepted_tokens, num_accepted, next_token, is_bonus)
