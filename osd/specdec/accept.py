"""Acceptance: walk a token tree, keep the accepted path, and emit one extra token.

Terms (as in vLLM's rejection sampler):

- **proposed tokens**: the drafter's candidate tokens — the nodes of a token tree.
- **accepted tokens**: the proposed tokens on the path from the root that the target keeps.
- **recovered token**: when every child of the last accepted node (or of the root) is
  rejected, the token drawn instead from the *residual* target distribution there.
- **bonus token**: when the walk reaches a node without children (every proposed token on
  the path accepted), the token drawn from the target distribution after that node.
- **emitted tokens**: the accepted tokens followed by the bonus or the recovered token; one
  step emits between 1 and ``depth + 1`` tokens.

Tree representation (``n`` proposed tokens, vocabulary size ``V``):

- ``tokens``  ``[n]`` int64: the token of each node.
- ``parents`` ``[n]`` int64: the parent node of each node, ``-1`` for the depth-1 nodes.
  The root is the last verified position and is *not* a node. Nodes are in topological
  order (``parents[j] < j``); siblings are tested in index order.
- ``q`` ``[n + 1, V]``: target distributions. ``q[0]`` is the target at the root (the
  distribution of a depth-1 token); ``q[j + 1]`` is the target after node ``j`` (the
  distribution of a child of node ``j``).
- ``p`` ``[n, V]`` or ``None``: ``p[j]`` is the draft distribution node ``j`` was sampled
  from; ``None`` when the candidates are deterministic (point masses: n-gram, top-k heads,
  beams).
- ``without_replacement``: whether siblings were drawn one after another from the same
  ``p`` with earlier siblings removed. Then ``p[j]`` is that shared distribution and the
  acceptance uses the conditional ``p`` with the earlier siblings' tokens zeroed and
  renormalised — exactly the distribution the sibling was drawn from.

All distributions are already warped (temperature, top-k, top-p; see ``sampling.py``).

Rules (DESIGN §3; ``r`` is the current target, initially ``q`` at the node, ``d`` is the
distribution the child under test was drawn from):

- **greedy** (:func:`accept_greedy`): accept the first child whose token is the target's
  argmax; stop when there is none. The emitted tokens equal the target's greedy decoding.
- **speculative sampling** (:func:`accept_sampling`, lossless): accept child ``x`` with
  probability ``min(1, r(x) / d(x))``; on rejection ``r ← norm(max(r − d, 0))`` and the next
  sibling is tested. For a point mass ``d = δ_x`` this is: accept with probability ``r(x)``,
  else zero ``r(x)`` and renormalise. If every child is rejected, the recovered token is drawn
  from the final ``r``; after an accepted child the walk restarts below it with ``r`` = its
  fresh target row.
- **typical acceptance** (:func:`accept_typical`, Medusa): **LOSSY** — does not sample the
  target distribution; opt-in only.

Guarantee — speculative sampling emits tokens distributed *exactly* as target-only
sampling, for chains, multi-candidate trees (siblings iid or without replacement) and point
masses alike. Proof sketch at one node with children ``1..m``, where child ``i``'s token is
drawn from ``d_i`` given the earlier siblings (independently of the acceptance coins):
round ``i`` emits ``x`` with probability ``min(r_i, d_i)(x)`` and rejects with probability
``β_i = Σ max(r_i − d_i, 0)``; the next target ``r_{i+1} = max(r_i − d_i, 0) / β_i`` does
not depend on the token just rejected. If the later rounds emit ``r_{i+1}`` (induction; the
last "round" is the draw of the recovered token), round ``i`` emits
``min(r_i, d_i) + β_i · r_{i+1} = r_i``. So the first emitted token follows ``q`` at the
root; given it, the walk below the accepted child repeats the argument with that child's
target row. The statistical tests in ``tests/test_accept.py`` check this.

Edge cases, each handled so the guarantee still holds:

- residual numerically zero (``Σ max(r − d, 0) ≤ 1e-12``): then ``r ≤ d`` everywhere, and as
  both sum to 1, ``r = d`` — the rejection had probability 0 (or ~1e-12 from rounding).
  Any residual is then correct; we keep ``r``, which also keeps the emitted token inside
  the target's support (``max(r − d, 0) ≤ r`` in the regular case too).
- ``d(x) = 0`` for a proposed token (it cannot have been drawn from ``d``): the test
  ``u · d(x) < r(x)`` accepts it iff ``r(x) > 0`` — the limit of ``min(1, r(x) / d(x))``.
- disjoint supports: every stochastic proposal has ``r(x) = 0`` and is rejected; the
  residual is ``r`` itself, so the recovered token is drawn from the target.
- without replacement, when the earlier siblings hold all of ``p``'s mass: the sibling
  could not have been drawn; it is treated as a point mass.

Randomness: each call uses ``n + 1`` uniforms in ``[0, 1)``; slot ``j`` is the coin of
node ``j`` and slot ``n`` draws the bonus / recovered token by inverse CDF. They are drawn
from ``generator`` unless passed as ``uniforms``, so a call is a pure function of them;
:func:`accept_sampling` and its batched twin ``osd.specdec.accept_batch.accept_sampling_batch``
give identical results for the same uniforms.

Worked example (``V = 4``)::

    root ─┬─ node 0: token 2 ─── node 2: token 1
          └─ node 1: token 3
    tokens = [2, 3, 1]   parents = [-1, -1, 0]
    q[0] (root)        = [0.1, 0.2, 0.3, 0.4]
    p[0] = p[1]        = [0.1, 0.1, 0.6, 0.2]   (siblings drawn without replacement)

    greedy, target argmax per row = [3, 0, 1, 2]:
        root argmax 3: node 0 (token 2) no, node 1 (token 3) yes -> accept node 1;
        node 1 has no children -> bonus = argmax q[2] = 1.
        AcceptResult(path=[1], accepted_tokens=[3], next_token=1, is_bonus=True)

    sampling:
        node 0: accept token 2 with min(1, 0.3 / 0.6) = 0.5. Say it is rejected:
                r = norm(max(q[0] − p[0], 0)) = norm([0, 0.1, 0, 0.2]) = [0, 1/3, 0, 2/3]
        node 1: drawn from p without token 2: d = [0.25, 0.25, 0, 0.5];
                accept token 3 with min(1, (2/3) / 0.5) = 1 -> accept node 1, a leaf:
                bonus ~ q[2].
        (Had node 1 been token 0: r(0) = 0, rejected; r = norm(max(r − d, 0)) =
        [0, 1/3, 0, 2/3] and the recovered token ~ r.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "AcceptResult",
    "accept_greedy",
    "accept_sampling",
    "accept_typical",
    "final_distribution",
]

# A residual whose mass is at most this is treated as zero (see "Edge cases" above).
RESIDUAL_EPS = 1e-12


@dataclass(frozen=True)
class AcceptResult:
    """The outcome of acceptance for one tree.

    Attributes:
        path: accepted node indices, from the root down.
        accepted_tokens: the tokens of those nodes.
        next_token: the bonus token (``is_bonus``) or the recovered token.
        is_bonus: True when the walk ended at a node without children (nothing rejected).
    """

    path: list[int]
    accepted_tokens: list[int]
    next_token: int
    is_bonus: bool

    @property
    def num_accepted(self) -> int:
        """Number of accepted proposed tokens."""
        return len(self.path)

    @property
    def emitted_tokens(self) -> list[int]:
        """Accepted tokens followed by the bonus / recovered token."""
        return [*self.accepted_tokens, self.next_token]


# ---------------------------------------------------------------------------------------------
# Input checks and tree structure


def _children(parents: list[int]) -> list[list[int]]:
    """``children[0]``: the depth-1 nodes; ``children[j + 1]``: node ``j``'s children."""
    children: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for j, parent in enumerate(parents):
        if not -1 <= parent < j:
            raise ValueError(
                f"parents[{j}] = {parent}: a node's parent must be -1 (the root) or an earlier "
                f"node; order the nodes topologically"
            )
        children[parent + 1].append(j)
    return children


def _depths(parents: list[int]) -> list[int]:
    """Depth of each node; the depth-1 nodes are the root's children."""
    depth: list[int] = []
    for parent in parents:
        depth.append(1 if parent < 0 else depth[parent] + 1)
    return depth


def _check_vector(name: str, t: torch.Tensor, length: int | None = None) -> list[int]:
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor, got {_describe(t)}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} has {t.shape[0]} entries; expected {length}")
    return t.tolist()


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"a tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """``t`` is a tensor of ``shape`` (``-1`` = any size)."""
    if not isinstance(t, torch.Tensor) or t.dim() != len(shape):
        raise ValueError(f"{name} must have shape {shape}, got {_describe(t)}")
    if any(want not in (-1, got) for want, got in zip(shape, t.shape, strict=True)):
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _float64_numpy(
    name: str, t: torch.Tensor, shape: tuple[int, int]
) -> tuple[np.ndarray, list[float]]:
    """``t`` as a float64 array and its row sums, checked: ``shape``, finite, non-negative."""
    _check_shape(name, t, shape)
    array = t.detach().cpu().numpy().astype(np.float64, copy=False)  # [rows, V]
    sums = array.sum(-1).tolist()  # [rows]
    if array.size and not (array.min() >= 0 and all(map(math.isfinite, sums))):
        raise ValueError(f"{name} must hold finite non-negative probabilities")
    return array, sums


def _check_tokens(tokens: list[int], vocab: int) -> None:
    if any(not 0 <= x < vocab for x in tokens):
        raise ValueError(f"tokens must lie in [0, {vocab}), got {tokens}")


def _check_distinct_siblings(tokens: list[int], children: list[list[int]]) -> None:
    for siblings in children:
        if len(siblings) < 2:
            continue
        seen = [tokens[j] for j in siblings]
        if len(set(seen)) != len(seen):
            raise ValueError(
                f"without_replacement=True but siblings repeat a token: {seen}; "
                f"pass without_replacement=False for iid siblings"
            )


# ---------------------------------------------------------------------------------------------
# Greedy


def accept_greedy(
    tokens: torch.Tensor,  # [n]
    parents: torch.Tensor,  # [n]
    target_argmax: torch.Tensor,  # [n + 1]
) -> AcceptResult:
    """Greedy acceptance (temperature 0): follow the children that match the target's argmax.

    At the current node (initially the root) the first child whose token equals
    ``target_argmax`` there is accepted and the walk descends to it; when no child matches,
    the argmax is the recovered token, and at a node without children it is the bonus token.

    Args:
        tokens: ``[n]`` node tokens.
        parents: ``[n]`` parent of each node, ``-1`` for depth-1 nodes.
        target_argmax: ``[n + 1]`` argmax of the target at the root (slot 0) and after each
            node ``j`` (slot ``j + 1``).

    Returns:
        The accepted path and the next token.
    """
    tok = _check_vector("tokens", tokens)
    par = _check_vector("parents", parents, len(tok))
    _children(par)  # checks the order: parents first
    return walk_greedy(tok, par, _check_vector("target_argmax", target_argmax, len(tok) + 1))


def walk_greedy(tokens: list[int], parents: list[int], argmax: list[int]) -> AcceptResult:
    """:func:`accept_greedy` on host lists, unchecked (``parents`` topologically ordered).

    One pass in node order: a node is taken when its parent is the walk's current node and
    its token is the argmax there — the first such child, as children come after their
    parent and siblings in index order. The engine uses it on a CPU, where a batch of these
    walks costs less than the batched tensor ops (~20 µs against ~130 at batch 1).
    """
    path: list[int] = []
    node = -1
    for j, (token, parent) in enumerate(zip(tokens, parents, strict=True)):
        if parent == node and token == argmax[node + 1]:
            path.append(j)
            node = j
    leaf = node not in parents[node + 1 :]
    return AcceptResult(path, [tokens[j] for j in path], argmax[node + 1], is_bonus=leaf)


# ---------------------------------------------------------------------------------------------
# Lossless speculative sampling, one tree (numpy float64, Python loop over the visited nodes)


def _normalised(rows: np.ndarray, sums: list[float], i: int, name: str) -> np.ndarray:
    """Row ``i`` of ``rows`` divided by its sum ``sums[i]``."""
    if not sums[i] > 0:
        raise ValueError(f"{name}[{i}] sums to 0; it must be a probability distribution")
    return rows[i] / sums[i]


def _residual(target: np.ndarray, draft: np.ndarray | None, x: int) -> np.ndarray:
    """``norm(max(target − draft, 0))``; a point-mass draft (``None``) zeroes ``target[x]``.

    Falls back to ``target`` when the residual mass is ≤ ``RESIDUAL_EPS`` (module docstring).
    """
    if draft is None:
        residual = target.copy()
        residual[x] = 0.0
    else:
        residual = np.maximum(target - draft, 0.0)
    total = residual.sum()
    return residual / total if total > RESIDUAL_EPS else target


def _draft(p: np.ndarray, p_sums: list[float], node: int, x: int, removed: list[int]) -> np.ndarray:
    """The distribution node ``node`` (token ``x``) was drawn from: ``p[node]`` less ``removed``."""
    draft = _normalised(p, p_sums, node, "p")
    if not removed:
        return draft
    draft = draft.copy()
    draft[removed] = 0.0
    total = draft.sum()
    if total > RESIDUAL_EPS:
        return draft / total
    point = np.zeros_like(draft)  # earlier siblings took all the mass: treat as a point mass
    point[x] = 1.0
    return point


def _inverse_cdf(dist: np.ndarray, u: float) -> int:
    """The token at which the CDF of (unnormalised, non-zero) ``dist`` first exceeds ``u``."""
    cdf = np.cumsum(dist)  # [V]
    index = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    if index < len(dist):
        return index
    return int(np.flatnonzero(dist)[-1])  # u * total rounded up to total


def _uniforms(
    uniforms: torch.Tensor | None,
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    if uniforms is None:
        return torch.rand(shape, dtype=torch.float64, generator=generator, device=device)
    if tuple(uniforms.shape) != shape:
        raise ValueError(f"uniforms must have shape {shape}, got {tuple(uniforms.shape)}")
    if bool(((uniforms < 0) | (uniforms >= 1)).any()):
        raise ValueError("uniforms must lie in [0, 1)")
    return uniforms.to(device=device, dtype=torch.float64)


def accept_sampling(
    tokens: torch.Tensor,  # [n]
    parents: torch.Tensor,  # [n]
    q: torch.Tensor,  # [n + 1, V]
    p: torch.Tensor | None,  # [n, V]
    without_replacement: bool = False,
    generator: torch.Generator | None = None,
    *,
    uniforms: torch.Tensor | None = None,  # [n + 1]
) -> AcceptResult:
    """Lossless speculative sampling over one token tree (rules in the module docstring).

    Args:
        tokens: ``[n]`` node tokens.
        parents: ``[n]`` parent of each node, ``-1`` for depth-1 nodes; topological order.
        q: ``[n + 1, V]`` warped target distributions (row 0 at the root, row ``j + 1``
            after node ``j``). Rows the walk does not reach may be all zero.
        p: ``[n, V]`` warped draft distribution each node was drawn from, or ``None`` for
            point-mass (deterministic) candidates.
        without_replacement: siblings were drawn without replacement from their shared
            ``p`` row (ignored for point masses).
        generator: source of the uniforms (on ``q``'s device); ``None`` uses the global one.
        uniforms: ``[n + 1]`` uniforms in ``[0, 1)`` to use instead of drawing them.

    Returns:
        The accepted path and the bonus or recovered token.
    """
    tok = _check_vector("tokens", tokens)
    n = len(tok)
    children = _children(_check_vector("parents", parents, n))
    q64, q_sums = _float64_numpy("q", q, (n + 1, -1))  # [n + 1, V], [n + 1]
    vocab = q64.shape[1]
    _check_tokens(tok, vocab)
    p64, p_sums = None, []
    if p is not None:
        p64, p_sums = _float64_numpy("p", p, (n, vocab))  # [n, V], [n]
        if without_replacement:
            _check_distinct_siblings(tok, children)
    u = _uniforms(uniforms, (n + 1,), generator, q.device).tolist()

    path: list[int] = []
    node = -1
    target = _normalised(q64, q_sums, 0, "q")  # r: current target at the node
    while True:
        kids = children[node + 1]
        if not kids:  # leaf: every proposed token on the path was accepted
            return AcceptResult(path, [tok[j] for j in path], _inverse_cdf(target, u[n]), True)
        removed: list[int] = []  # tokens of rejected siblings
        for j in kids:
            x = tok[j]
            draft = None
            if p64 is not None:
                draft = _draft(p64, p_sums, j, x, removed if without_replacement else [])
            p_x = 1.0 if draft is None else draft[x]
            if u[j] * p_x < target[x]:  # probability min(1, r(x) / d(x))
                break
            target = _residual(target, draft, x)
            removed.append(x)
        else:  # every child rejected: recovered token from the residual
            return AcceptResult(path, [tok[j] for j in path], _inverse_cdf(target, u[n]), False)
        path.append(j)
        node = j
        target = _normalised(q64, q_sums, j + 1, "q")


def final_distribution(
    tokens: torch.Tensor,  # [n]
    parents: torch.Tensor,  # [n]
    q: torch.Tensor,  # [n + 1, V]
    p: torch.Tensor | None,  # [n, V]
    without_replacement: bool,
    result: AcceptResult,
) -> torch.Tensor:
    """``[V]`` the distribution :func:`accept_sampling` drew ``result.next_token`` from.

    At a leaf (bonus) it is the target row after the last accepted node; after a rejection
    (recovered) it is that row with every child of the last accepted node rejected in turn,
    ``r ← norm(max(r − d, 0))`` — fixed by the tree and the path, not by the coins. A
    target-initialised step (:mod:`osd.drafters.draft_model`) keeps it instead of drawing
    the token: the next step proposes its top-k as point masses, which samples it exactly.

    Worked example (the module's tree, point masses): both children of the root rejected,
    ``q[0] = [0.1, 0.2, 0.3, 0.4]`` less token 2, then less token 3, renormalised:

    >>> q = torch.tensor([[0.1, 0.2, 0.3, 0.4]] + [[0.25] * 4] * 3)
    >>> r = final_distribution(torch.tensor([2, 3, 1]), torch.tensor([-1, -1, 0]), q, None,
    ...                        False, AcceptResult([], [], 1, False))
    >>> [round(x, 3) for x in r.tolist()]
    [0.333, 0.667, 0.0, 0.0]
    """
    tok = _check_vector("tokens", tokens)
    children = _children(_check_vector("parents", parents, len(tok)))
    last = result.path[-1] if result.path else -1
    q64, q_sums = _float64_numpy("q", q, (len(tok) + 1, -1))
    target = _normalised(q64, q_sums, last + 1, "q")
    if not result.is_bonus:
        p64, p_sums = (None, []) if p is None else _float64_numpy("p", p, (len(tok), -1))
        removed: list[int] = []
        for j in children[last + 1]:
            x = tok[j]
            draft = None
            if p64 is not None:
                draft = _draft(p64, p_sums, j, x, removed if without_replacement else [])
            target = _residual(target, draft, x)
            removed.append(x)
    return torch.from_numpy(target).to(q.device)


# ---------------------------------------------------------------------------------------------
# Typical acceptance (Medusa) — LOSSY


def _typical_threshold(dist: np.ndarray, epsilon: float, delta: float) -> float:
    """``min(epsilon, delta · exp(−H(dist)))`` with the natural-log entropy ``H``."""
    nonzero = dist[dist > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum())
    return min(epsilon, delta * math.exp(-entropy))


def accept_typical(
    tokens: torch.Tensor,  # [n]
    parents: torch.Tensor,  # [n]
    q: torch.Tensor,  # [n + 1, V]
    *,
    epsilon: float = 0.09,
    delta: float = 0.3,
) -> AcceptResult:
    """LOSSY typical acceptance (Medusa): output does NOT follow the target distribution.

    A node with token ``x`` whose parent's target row is ``q_r`` passes when
    ``q_r(x) > min(epsilon, delta · exp(−H(q_r)))``; a node is accepted when it and all its
    ancestors pass. Of the accepted nodes the deepest wins (ties: the larger sum of
    ``log q(x)`` along the path, then the lower index); the next token is the target's argmax
    after it (greedy-style, as Medusa). Faster than lossless sampling at high temperature
    because plausible-but-unlikely drafts are kept — at the price of exactness. Opt-in only.
    Defaults are Medusa's ``posterior_threshold`` (0.09) and ``posterior_alpha`` (0.3).

    Example: ``q[0] = [0.5, 0.3, 0.2]``, ``H ≈ 1.03``, threshold
    ``min(0.09, 0.3 · e^−1.03) ≈ 0.09``: depth-1 tokens 0, 1 and 2 all pass.

    Args:
        tokens: ``[n]`` node tokens.
        parents: ``[n]`` parent of each node, ``-1`` for depth-1 nodes.
        q: ``[n + 1, V]`` warped target distributions.
        epsilon: hard probability threshold.
        delta: entropy-scaled threshold factor.

    Returns:
        The accepted path and the next token (``is_bonus`` when the path ends at a leaf).
    """
    if epsilon < 0 or delta < 0:
        raise ValueError(f"epsilon and delta must be >= 0, got {epsilon}, {delta}")
    tok = _check_vector("tokens", tokens)
    n = len(tok)
    par = _check_vector("parents", parents, n)
    children = _children(par)
    q64, q_sums = _float64_numpy("q", q, (n + 1, -1))  # [n + 1, V], [n + 1]
    _check_tokens(tok, q64.shape[1])

    rows: dict[int, tuple[np.ndarray, float]] = {}  # row -> (distribution, threshold)

    def row(index: int) -> tuple[np.ndarray, float]:
        if index not in rows:
            dist = _normalised(q64, q_sums, index, "q")
            rows[index] = (dist, _typical_threshold(dist, epsilon, delta))
        return rows[index]

    depth = _depths(par)
    loglik: dict[int, float] = {}  # accepted node -> sum of log q(x) from the root
    for j in range(n):
        if par[j] >= 0 and par[j] not in loglik:
            continue
        dist, threshold = row(par[j] + 1)
        if dist[tok[j]] > threshold:
            loglik[j] = loglik.get(par[j], 0.0) + math.log(dist[tok[j]])
    path: list[int] = []
    if loglik:
        node = max(loglik, key=lambda j: (depth[j], loglik[j], -j))
        while node >= 0:
            path.append(node)
            node = par[node]
        path.reverse()
    last = path[-1] if path else -1
    next_token = int(row(last + 1)[0].argmax())
    return AcceptResult(path, [tok[j] for j in path], next_token, is_bonus=not children[last + 1])
