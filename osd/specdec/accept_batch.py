"""Acceptance for a batch of token trees, vectorised over the batch, on the tensors' device.

:func:`accept_sampling_batch` applies the rules of :func:`osd.specdec.accept.accept_sampling`
(terms, tree representation, edge cases and the exactness argument are in that module's
docstring) to ``B`` trees at once, and :func:`accept_greedy_batch` those of
:func:`~osd.specdec.accept.accept_greedy`. Trees may differ (*ragged*): ``parents`` is
``[n]`` (one topology) or ``[B, n]`` with **padding nodes** marked by a parent ``≤ -2``
(never reached; put them after the real nodes). Tree ``b`` has ``n_b`` real nodes; its
uniforms are ``uniforms[b, :n_b]`` for the nodes and ``uniforms[b, n_b]`` for the bonus /
recovered token, exactly as the one-tree function uses its ``n_b + 1``. For the same
uniforms both paths give identical results (in float64; the engine computes in the
distributions' own dtype). The ``*_rows`` helpers are the row-wise twins of the one-tree
helpers in ``osd.specdec.accept``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from osd.specdec.accept import (
    RESIDUAL_EPS,
    AcceptResult,
    _check_distinct_siblings,
    _check_shape,
    _check_vector,
    _children,
    _describe,
    _uniforms,
)

__all__ = ["BatchAcceptResult", "TreeBatch", "accept_greedy_batch", "accept_sampling_batch"]


@dataclass(frozen=True)
class BatchAcceptResult:
    """Acceptance outcomes of ``B`` trees (see :func:`accept_sampling_batch`).

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
    removed: torch.Tensor | None,  # [B, k] tokens of earlier siblings; V = none
    x: torch.Tensor,  # [B]
) -> torch.Tensor:
    """Row-wise :func:`_draft`. ``[B, V]``."""
    draft = _normalised_rows(p_rows)
    if removed is None or removed.shape[1] == 0:
        return draft
    vocab = draft.shape[1]
    spare = torch.zeros(draft.shape[0], 1, dtype=draft.dtype, device=draft.device)
    draft = torch.cat([draft, spare], 1).scatter(1, removed, 0.0)[:, :vocab]
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


def _float_tensor(
    name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """``t`` as a ``dtype`` tensor, checked: ``shape`` and finite non-negative values."""
    _check_shape(name, t, shape)
    t = t.detach().to(dtype)
    if t.numel() and not (bool(t.min() >= 0) and bool(torch.isfinite(t.sum()))):
        raise ValueError(f"{name} must hold finite non-negative probabilities")
    return t


def _topology(pr: list[int], n: int) -> tuple:
    """One row's (size, depth, leaf, last, earlier [n, n], anc [n, n], root_leaf)."""
    size = sum(1 for x in pr if x >= -1)
    if any(x < -1 for x in pr[:size]):
        raise ValueError("padding nodes (parent ≤ -2) must come after the real nodes")
    _check_vector("parents", torch.tensor(pr[:size], dtype=torch.long), size)
    depth, leaf, last = [0] * n, [True] * n, [False] * n
    # host lists, one tensor each at the end: an element write per node costs µs in torch
    earlier = [[False] * n for _ in range(n)]
    anc = [[False] * n for _ in range(n)]
    kids = _children(pr[:size])
    for j in range(size):
        p = pr[j]
        depth[j] = 1 if p < 0 else depth[p] + 1
        leaf[j] = not kids[j + 1]
        sib = kids[p + 1]
        last[j] = sib[-1] == j
        for i in sib[: sib.index(j)]:
            earlier[j][i] = True
        if p >= 0:
            anc[j] = list(anc[p])
        anc[j][j] = True
    earlier_t = torch.tensor(earlier, dtype=torch.bool).reshape(n, n)  # n = 0: [0, 0]
    anc_t = torch.tensor(anc, dtype=torch.bool).reshape(n, n)
    return size, depth, leaf, last, earlier_t, anc_t, not kids[0]


@dataclass(frozen=True)
class TreeBatch:
    """Per-row topology of ``B`` (ragged) trees, precomputed once on the host.

    ``parents [B, n]`` (padding nodes ``≤ -2``) → ``sizes [B]`` real nodes, ``depth [B, n]``
    (0 for padding), ``leaf [B, n]`` (no children), ``last [B, n]`` (last of its siblings),
    ``earlier [B, n, n]`` (``earlier[b, j, i]``: node i is an earlier sibling of node j),
    ``anc [B, n, n]`` (node i is node j or one of its ancestors), ``root_leaf [B]``.
    """

    parents: torch.Tensor
    sizes: torch.Tensor
    depth: torch.Tensor
    leaf: torch.Tensor
    last: torch.Tensor
    earlier: torch.Tensor
    anc: torch.Tensor
    root_leaf: torch.Tensor

    @classmethod
    def of(cls, parents: torch.Tensor, batch: int, device: torch.device) -> TreeBatch:
        """The topology of each distinct row of ``parents`` (a batch drafted with one shape
        — a chain, a static tree — has one), then indexed per row. Remembered for the last
        :data:`_KNOWN_MAX` batches of shapes (a decoder drafts the same few shapes step after
        step; building one is ~80 µs, a batch-1 decode step ~3 ms); the tensors are never
        modified in place by their users."""
        par = parents.expand(batch, -1) if parents.dim() == 1 else parents
        rows = tuple(map(tuple, par.tolist()))
        key = (rows, par.shape[1], str(device))
        known = _KNOWN.get(key)
        if known is not None:
            _KNOWN.move_to_end(key)
            return known
        made = cls._make(par, rows, device)
        _KNOWN[key] = made
        if len(_KNOWN) > _KNOWN_MAX:
            _KNOWN.popitem(last=False)
        return made

    @classmethod
    def _make(cls, par: torch.Tensor, rows: tuple, device: torch.device) -> TreeBatch:
        batch, n = par.shape
        distinct: dict[tuple[int, ...], int] = {}
        at = torch.tensor([distinct.setdefault(r, len(distinct)) for r in rows], dtype=torch.long)
        tops = [_topology(list(r), n) for r in distinct] or [_topology([], n)]  # batch 0

        def stacked(i: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([t[i] for t in tops], dtype=dtype)[at].to(device)

        return cls(
            par.to(device=device, dtype=torch.long).clone(),  # the caller may reuse its own
            stacked(0, torch.long).reshape(batch),
            stacked(1, torch.long).reshape(batch, n),
            stacked(2, torch.bool).reshape(batch, n),
            stacked(3, torch.bool).reshape(batch, n),
            torch.stack([t[4] for t in tops])[at].to(device),
            torch.stack([t[5] for t in tops])[at].to(device),
            stacked(6, torch.bool).reshape(batch),
        )

    @property
    def max_depth(self) -> int:
        return int(self.depth.max()) if self.depth.numel() else 0


_KNOWN: OrderedDict[tuple, TreeBatch] = OrderedDict()  # TreeBatch.of's memory, LRU
_KNOWN_MAX = 256


def _path_result(
    tokens: torch.Tensor,
    tb: TreeBatch,
    end: torch.Tensor,
    next_token: torch.Tensor,
    is_bonus: torch.Tensor,
) -> BatchAcceptResult:
    """Results from the node each walk ended at (``end [B]``, −1 = the root)."""
    batch, n = tokens.shape
    width = max(tb.max_depth, 0)
    if n == 0:
        empty = torch.zeros(batch, 0, dtype=torch.long, device=tokens.device)
        none = torch.zeros(batch, dtype=torch.long, device=tokens.device)
        return BatchAcceptResult(empty, empty.clone(), none, next_token, is_bonus)
    on_path = tb.anc[torch.arange(batch, device=tokens.device), end.clamp_min(0)]  # [B, n]
    on_path &= (end >= 0)[:, None]
    col = torch.where(on_path, tb.depth - 1, width)  # off-path nodes go to a spare column
    path = torch.full((batch, width + 1), -1, dtype=torch.long, device=tokens.device)
    nodes = torch.arange(n, device=tokens.device).expand(batch, n)
    path.scatter_(1, col, nodes)
    path = path[:, :width]
    num_accepted = (path >= 0).sum(-1)
    accepted_tokens = tokens.gather(1, path.clamp_min(0)).masked_fill(path < 0, -1)
    return BatchAcceptResult(path, accepted_tokens, num_accepted, next_token, is_bonus)


def accept_greedy_batch(
    tokens: torch.Tensor,  # [B, n]
    parents: torch.Tensor,  # [n] or [B, n]
    target_argmax: torch.Tensor,  # [B, n + 1]
    trees: TreeBatch | None = None,
) -> BatchAcceptResult:
    """:func:`~osd.specdec.accept.accept_greedy` for ``B`` ragged trees, no host loop.

    A node is accepted iff it and all its ancestors carry their parent row's argmax; the
    walk ends at the deepest such node (siblings are distinct, so there is one), and the
    next token is the argmax after it: a bonus if it is a leaf, else the recovered token.
    """
    batch = tokens.shape[0]
    device = target_argmax.device
    tokens = tokens.to(device)
    tb = trees or TreeBatch.of(parents, batch, device)
    real = tb.parents >= -1  # [B, n]
    want = target_argmax.gather(1, (tb.parents + 1).clamp_min(0))  # [B, n]
    match = (tokens == want) & real
    ok = ~(tb.anc & ~match[:, None, :]).any(-1) & real  # [B, n]: whole path matches
    score = torch.where(ok, tb.depth, 0)
    if score.shape[1] == 0:  # no tree at all: the walk ends at the root
        end = torch.full((batch,), -1, dtype=torch.long, device=device)
    else:
        best = score.argmax(-1)  # first deepest ok node
        end = torch.where(score.gather(1, best[:, None]).squeeze(1) > 0, best, -1)
    next_token = target_argmax.gather(1, (end + 1)[:, None]).squeeze(1)
    is_bonus = tb.root_leaf.clone()
    if score.shape[1]:
        leaf_end = tb.leaf.gather(1, end.clamp_min(0)[:, None]).squeeze(1)
        is_bonus = torch.where(end >= 0, leaf_end, is_bonus)
    return _path_result(tokens, tb, end, next_token, is_bonus)


def accept_sampling_batch(
    tokens: torch.Tensor,  # [B, n]
    parents: torch.Tensor,  # [n] or [B, n]
    q: torch.Tensor,  # [B, n + 1, V]
    p: torch.Tensor | None,  # [B, n, V]
    without_replacement: bool = False,
    generator: torch.Generator | None = None,
    *,
    uniforms: torch.Tensor | None = None,  # [B, n + 1]
    dtype: torch.dtype = torch.float64,
    trees: TreeBatch | None = None,
    check_siblings: bool = True,
) -> BatchAcceptResult:
    """:func:`accept_sampling` for ``B`` independent (ragged) trees, vectorised.

    The nodes are visited in index order; node ``j`` acts on the trees whose walk
    currently stands at its parent. With the same uniforms it returns exactly what
    :func:`accept_sampling` returns for each tree (see the module docstring for the
    uniforms of a ragged batch). Used by the batched engine (``dtype`` = the model's) and
    by the statistical tests (many draws of one tree).

    Args:
        tokens: ``[B, n]`` node tokens per tree.
        parents: ``[n]`` shared, or ``[B, n]`` per tree with padding ``≤ -2``.
        q: ``[B, n + 1, V]`` warped target distributions.
        p: ``[B, n, V]`` warped draft distributions, or ``None`` for point masses.
        without_replacement: siblings were drawn without replacement from their ``p`` row.
        generator: source of the uniforms (on ``q``'s device).
        uniforms: ``[B, n + 1]`` uniforms in ``[0, 1)`` to use instead of drawing them.
        dtype: the arithmetic's dtype (float64 reproduces the one-tree function exactly).
        trees: the precomputed :class:`TreeBatch` of ``parents``.
        check_siblings: refuse repeated sibling tokens without replacement (a caller's
            bug, usually). ``False`` where repeats are meant: a drafter that ran out of
            support repeats a token, which is then a point mass (see ``accept.py``).

    Returns:
        A :class:`BatchAcceptResult` with tensors on ``q``'s device.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (B, n), got {_describe(tokens)}")
    batch, n = tokens.shape
    device = q.device
    if parents.dim() == 1:
        _check_vector("parents", parents, n)
    tb = trees or TreeBatch.of(parents, batch, device)
    qx = _float_tensor("q", q, (batch, n + 1, -1), dtype)  # [B, n + 1, V]
    vocab = qx.shape[2]
    tokens = tokens.to(device=device, dtype=torch.long)
    real = tb.parents >= -1
    if n and bool((((tokens < 0) | (tokens >= vocab)) & real).any()):
        raise ValueError(f"tokens must lie in [0, {vocab})")
    tokens = tokens.masked_fill(~real, 0)
    px = None
    if p is not None:
        px = _float_tensor("p", p.to(device), (batch, n, vocab), dtype)  # [B, n, V]
        if without_replacement and check_siblings:
            for b, row in enumerate(tb.parents.tolist()):
                size = int(tb.sizes[b])
                _check_distinct_siblings(tokens[b, :size].tolist(), _children(row[:size]))
    u = _uniforms(uniforms, (batch, n + 1), generator, device).to(dtype)  # [B, n + 1]

    cur = torch.full((batch,), -1, dtype=torch.long, device=device)  # node the walk is at
    alive = ~tb.root_leaf  # walk not finished
    target = _normalised_rows(qx[:, 0])  # [B, V] r: current target
    final = torch.where(tb.root_leaf[:, None], target, torch.zeros_like(target))
    is_bonus = tb.root_leaf.clone()
    end = torch.full((batch,), -1, dtype=torch.long, device=device)

    for j in range(n):
        rows = (alive & (cur == tb.parents[:, j])).nonzero().squeeze(1)  # [A]
        if rows.numel() == 0:
            continue
        x = tokens[rows, j]  # [A]
        r = target[rows]  # [A, V]
        draft = None
        p_x = torch.ones(rows.shape[0], dtype=dtype, device=device)  # [A]
        if px is not None:
            removed = None
            if without_replacement:
                removed = tb.earlier[rows, j]  # [A, n]
                removed = torch.where(removed, tokens[rows], vocab)  # vocab = no token
            draft = _draft_rows(px[rows, j], removed, x)  # [A, V]
            p_x = draft.gather(1, x[:, None]).squeeze(1)
        r_x = r.gather(1, x[:, None]).squeeze(1)  # [A]
        accept = u[rows, j] * p_x < r_x  # [A] probability min(1, r(x) / d(x))
        accepted, rejected = rows[accept], rows[~accept]
        fresh = _normalised_rows(qx[accepted, j + 1])  # [A_acc, V] target below node j
        target[rejected] = _residual_rows(
            r[~accept], None if draft is None else draft[~accept], x[~accept]
        )
        target[accepted] = fresh
        cur[accepted] = j
        end[accepted] = j
        leaf = tb.leaf[accepted, j]
        done = accepted[leaf]  # accepted a leaf: bonus token from below it
        final[done] = fresh[leaf]
        is_bonus[done] = True
        alive[done] = False
        gone = rejected[tb.last[rejected, j]]  # rejected the last sibling: recovered token
        final[gone] = target[gone]
        alive[gone] = False

    if bool((final.sum(-1) <= 0).any()):
        raise ValueError("a target distribution row reached by the walk sums to 0")
    u_final = u.gather(1, tb.sizes[:, None]).squeeze(1)  # [B]
    next_token = _inverse_cdf_rows(final, u_final)  # [B]
    return _path_result(tokens, tb, end, next_token, is_bonus)
