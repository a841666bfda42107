"""Medusa heads (Cai et al., 2024): K heads on the target's last hidden state, one static tree.

Head ``i`` reads the target's hidden state of the token before the pending root and
proposes the token ``i`` positions after the root (``osd.drafters.heads``). The tree is
**static**: paths of candidate ranks ``(r_1, …, r_d)`` (node = the rank-``r_d`` token of
head ``d`` under the path ``(r_1, …, r_{d-1})``), chosen once from the heads' measured
top-k accuracies by Medusa's construction — grow the tree greedily by the node that adds
the most expected accepted length, ``Π_d acc[d][r_d]``, up to ``nodes`` nodes
(:func:`medusa_tree`).

Every candidate is a head's top-k token, a point mass (``draft_probs=None``): greedy is
exact, and sampling at T > 0 is exact by the point-mass rule of :mod:`osd.specdec.accept`.
Medusa's typical acceptance is the engine's opt-in, lossy ``typical=(ε, δ)``.

Batched: one head forward and one LM-head projection for all sequences of a step.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch

from osd.drafters.base import DecodeState, Drafter
from osd.drafters.heads import HeadConfig, MedusaHeads
from osd.specdec.packed import linear_module
from osd.specdec.tree import TokenTree

Path_ = tuple[int, ...]


def medusa_tree(accuracy: Sequence[Sequence[float]], nodes: int) -> list[Path_]:
    """The ``nodes`` rank paths of largest ``Π_d accuracy[d][r_d]``, parents first.

    Greedy best-first growth: a node's value never exceeds its parent's (accuracies ≤ 1)
    nor its elder sibling's (accuracies sorted by rank), so the best ``nodes`` paths form
    a tree.

    >>> medusa_tree([[0.6, 0.2], [0.4, 0.1]], 4)
    [(0,), (1,), (0, 0), (1, 0)]
    """
    acc = [sorted((float(a) for a in row), reverse=True) for row in accuracy]
    if not acc or nodes <= 0:
        return []
    chosen: list[tuple[float, Path_]] = []
    heap = [(-acc[0][0], (0,))]
    while heap and len(chosen) < nodes:
        neg, path = heapq.heappop(heap)
        chosen.append((-neg, path))
        d, r = len(path), path[-1]
        if r + 1 < len(acc[d - 1]):  # next sibling
            sib = (*path[:-1], r + 1)
            heapq.heappush(heap, (neg / max(acc[d - 1][r], 1e-12) * acc[d - 1][r + 1], sib))
        if d < len(acc):  # first child
            heapq.heappush(heap, (neg * acc[d][0], (*path, 0)))
    return sorted((p for _, p in chosen), key=lambda p: (len(p), p))


class MedusaDrafter(Drafter):
    name = "medusa"
    needs_hidden_states = True

    def __init__(
        self, target, heads: MedusaHeads, config: HeadConfig, nodes: int = 32, topk: int = 8
    ) -> None:
        super().__init__()
        self.target = target
        self.heads = heads.eval()
        self.config = config
        self.lm_head = target.get_output_embeddings()
        acc = config.accuracy or [
            [0.5**d / (r + 1) for r in range(topk)] for d in range(1, heads.num_heads + 1)
        ]
        self.paths = medusa_tree([row[:topk] for row in acc[: heads.num_heads]], nodes)
        index = {p: i for i, p in enumerate(self.paths)}
        self.parents = [index.get(p[:-1], -1) for p in self.paths]
        self.depth = [len(p) for p in self.paths]
        self.rank = torch.tensor([p[-1] for p in self.paths], dtype=torch.long)
        self.head_of = torch.tensor([len(p) - 1 for p in self.paths], dtype=torch.long)
        self.topk = 1 + max((p[-1] for p in self.paths), default=0)

    @property
    def k(self) -> int:
        return max(self.depth, default=0)

    def propose(self, state: DecodeState, max_depth: int) -> TokenTree:
        return self.propose_batch([state], [max_depth])[0]

    @torch.inference_mode()
    def propose_batch(self, states: Sequence[DecodeState], depths: list[int]) -> list[TokenTree]:
        trees = [TokenTree.empty() for _ in states]
        active = [
            i
            for i, (s, d) in enumerate(zip(states, depths, strict=True))
            if d > 0 and s.target_hidden is not None and len(s.target_hidden)
        ]
        if not active or not self.paths:
            return trees
        h = torch.stack([states[i].target_hidden[-1] for i in active])  # [a, H]
        logits = linear_module(self.lm_head, self.heads(h))  # [a, K, V]
        top = logits.topk(self.topk, dim=-1).indices  # [a, K, topk]
        tokens = top[:, self.head_of, self.rank].cpu()  # [a, n]: node j's token
        for row, i in enumerate(active):
            n = sum(1 for d in self.depth if d <= depths[i])  # parents first: a prefix
            trees[i] = TokenTree.from_parents(tokens[row, :n].tolist(), self.parents[:n])
        return trees

    # weights: the heads only (the LM head is the target's)
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.heads.state_dict().items()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.heads.load_state_dict(state_dict, strict=True)
        self.version = version
