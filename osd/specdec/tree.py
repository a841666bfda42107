"""Token trees: what a drafter proposes and what one target forward verifies.

Vocabulary. The **root** is the last committed token, whose target distribution is not
known yet (the *pending* token: the KV cache holds every committed token but it). The
**nodes** are the draft tokens; node ``i`` has token ``tokens[i]``, parent ``parents[i]``
(−1 for a child of the root) and depth ``depths[i]`` (1 for a child of the root). Nodes
are stored parents-first. A chain is the degenerate tree ``parents = [-1, 0, 1, …]``.

Verification feeds ``[root] + nodes`` in one forward. Row 0 of its output is the target
distribution after the root (over depth-1 candidates); row ``i + 1`` is the distribution
after node ``i``. Each fed token attends to the whole cached prefix and to its own
ancestors (the root included), never to siblings or cousins.

Worked example — prefix of 3 cached tokens, root ``r`` and the tree::

        r ── a(0) ── c(2)
        └─── b(1)

    tokens  = [a, b, c]      parents = [-1, -1, 0]      depths = [1, 1, 2]
    position_ids (prefix_len=3) = [3, 4, 4, 5]          # root at 3, then 3 + depth
    attention (1 = may attend), columns = 3 cached | r a b c:
        r  1 1 1 | 1 0 0 0
        a  1 1 1 | 1 1 0 0
        b  1 1 1 | 1 0 1 0
        c  1 1 1 | 1 1 0 1
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenTree:
    """Draft tokens in a tree (see the module docstring for the conventions).

    ``draft_probs[i]`` is the draft distribution node ``i`` was *sampled* from (already
    warped by temperature / top-k / top-p); ``None`` for deterministic proposals (greedy
    drafts, top-k heads, beams, n-grams), which acceptance treats as point masses.
    ``without_replacement`` says siblings were drawn without replacement from one p.
    """

    tokens: torch.Tensor  # [n] long
    parents: torch.Tensor  # [n] long, -1 = child of the root
    depths: torch.Tensor  # [n] long, ≥ 1
    draft_probs: torch.Tensor | None = None  # [n, V] float
    without_replacement: bool = False

    def __post_init__(self) -> None:
        n = self.tokens.numel()
        if self.parents.shape != (n,) or self.depths.shape != (n,):
            raise ValueError(
                f"tree shapes disagree: tokens {tuple(self.tokens.shape)}, parents "
                f"{tuple(self.parents.shape)}, depths {tuple(self.depths.shape)}"
            )
        for i, p in enumerate(self.parents.tolist()):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}; parents must come first (−1 = root)")
        if self.draft_probs is not None and self.draft_probs.shape[0] != n:
            raise ValueError(f"draft_probs has {self.draft_probs.shape[0]} rows for {n} nodes")

    @property
    def size(self) -> int:
        return self.tokens.numel()

    @property
    def max_depth(self) -> int:
        return int(self.depths.max()) if self.size else 0

    @classmethod
    def empty(cls) -> TokenTree:
        z = torch.zeros(0, dtype=torch.long)
        return cls(z, z.clone(), z.clone())

    @classmethod
    def chain(
        cls, tokens: list[int] | torch.Tensor, draft_probs: torch.Tensor | None = None
    ) -> TokenTree:
        t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        n = t.numel()
        return cls(t, torch.arange(-1, n - 1), torch.arange(1, n + 1), draft_probs)

    @classmethod
    def from_parents(
        cls,
        tokens: list[int],
        parents: list[int],
        draft_probs: torch.Tensor | None = None,
        without_replacement: bool = False,
    ) -> TokenTree:
        depths: list[int] = []
        for i, p in enumerate(parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}; parents must come first (−1 = root)")
            depths.append(1 if p < 0 else depths[p] + 1)
        return cls(
            torch.tensor(tokens, dtype=torch.long),
            torch.tensor(parents, dtype=torch.long),
            torch.tensor(depths, dtype=torch.long),
            draft_probs,
            without_replacement,
        )

    def children(self, node: int) -> list[int]:
        """Children of ``node`` (−1 = root), in proposal order."""
        return [i for i, p in enumerate(self.parents.tolist()) if p == node]

    def is_chain(self) -> bool:
        return bool(torch.equal(self.parents, torch.arange(-1, self.size - 1)))


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """[n, n] bool: ``A[i, j]`` iff node j is node i or one of its ancestors."""
    n = parents.numel()
    anc = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents.tolist()):
        if p >= 0:
            anc[i] |= anc[p]
    return anc


def tree_attention_mask(
    tree: TokenTree, prefix_len: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[1, 1, n + 1, prefix_len + n + 1] additive mask for feeding ``[root] + nodes``.

    0 where attention is allowed, the dtype's minimum elsewhere (what SDPA and eager
    attention add to the scores). See the module docstring for a worked example.
    """
    n = tree.size
    allowed = torch.zeros(n + 1, prefix_len + n + 1, dtype=torch.bool)
    allowed[:, : prefix_len + 1] = True  # cached prefix and the root
    allowed[1:, prefix_len + 1 :] = ancestor_matrix(tree.parents)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def tree_position_ids(tree: TokenTree, prefix_len: int) -> torch.Tensor:
    """[1, n + 1]: the root sits at ``prefix_len``, node i at ``prefix_len + depth_i``."""
    return (prefix_len + torch.cat([torch.zeros(1, dtype=torch.long), tree.depths]))[None]


def path_to(tree: TokenTree, node: int) -> list[int]:
    """Node indices from the root's child down to ``node`` (``[]`` for the root, −1)."""
    path = []
    parents = tree.parents.tolist()
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def tree_block(tree: TokenTree, t: int) -> torch.Tensor:
    """[t, t] bool: which of ``[root] + nodes`` (padded to ``t``) each one may attend to.

    The root and every node see the root; nodes see their ancestors and themselves;
    padding rows see only themselves (never empty). The tree part of the verify mask.

    >>> tree_block(TokenTree.from_parents([7, 8, 9], [-1, -1, 0]), 5).int().tolist()
    [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [0, 0, 0, 0, 1]]
    """
    n = tree.size
    block = torch.eye(t, dtype=torch.bool)
    block[: n + 1, 0] = True
    if n:
        block[1 : n + 1, 1 : n + 1] = ancestor_matrix(tree.parents)
    return block


def pad_trees(trees: list[TokenTree]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged trees: tokens ``[B, n_max]`` (padding 0) and parents ``[B, n_max]``
    (padding ``-2``, the marker of :mod:`osd.specdec.accept_batch`)."""
    n = max(tree.size for tree in trees)
    tokens = torch.zeros(len(trees), n, dtype=torch.long)
    parents = torch.full((len(trees), n), -2, dtype=torch.long)
    for i, tree in enumerate(trees):
        tokens[i, : tree.size] = tree.tokens
        parents[i, : tree.size] = tree.parents
    return tokens, parents
