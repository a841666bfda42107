"""Medusa heads (Cai et al., 2024): K heads on the target's last hidden state, one static tree.

Head ``i`` reads the target's hidden state of the token before the pending root and
proposes the token ``i`` positions after the root (``osd.drafters.heads``). The tree is
**static**: paths of candidate ranks ``(r_1, …, r_d)`` (node = the rank-``r_d`` token of
head ``d`` under the path ``(r_1, …, r_{d-1})``), chosen once from the heads' measured
top-k accuracies by Medusa's construction — grow the tree greedily by the node that adds
the most expected accepted length, ``Π_d acc[d][r_d]``, up to ``nodes`` nodes
(:func:`medusa_tree`). ``nodes="auto"`` (the registry's default) sizes the tree for this
machine: the count whose expected accepted length per millisecond of verification and
drafting is highest (:func:`choose_nodes`), with the target's verification costs measured
once per process.

Every candidate is a head's top-k token, a point mass (``draft_probs=None``): greedy is
exact, and sampling at T > 0 is exact by the point-mass rule of :mod:`osd.specdec.accept`.
Medusa's typical acceptance is the engine's opt-in, lossy ``typical=(ε, δ)``.

Batched: one head forward and one LM-head projection for all sequences of a step.
"""

from __future__ import annotations

import heapq
import logging
import time
import weakref
from collections.abc import Sequence

import torch

from osd.drafters.base import DecodeState, Drafter
from osd.drafters.heads import HeadConfig, MedusaHeads
from osd.specdec.packed import linear_module
from osd.specdec.tree import TokenTree

Path_ = tuple[int, ...]
log = logging.getLogger(__name__)
# target -> {(threads): {tokens: ms}}: verification costs measured once per process
_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _verify_ms(target) -> dict[int, float]:
    """c_verify(n + 1) of ``target`` at batch 1 for every ``n`` of :data:`AUTO_SIZES` (and
    one token), ms (:func:`osd.bench.costs.verify_costs`, 3 timed calls each)."""
    from osd.bench.costs import verify_costs

    per = _COSTS.setdefault(target, {})
    key = torch.get_num_threads()
    if key not in per:
        ns = sorted({1, *(n + 1 for n in AUTO_SIZES)})
        per[key] = verify_costs(target, context=128, ns=ns, reps=3, warmup=1)["ms"]
    return per[key]


def best_first(accuracy: Sequence[Sequence[float]], nodes: int) -> list[tuple[float, Path_]]:
    """Up to ``nodes`` (value, rank path) pairs in decreasing value, the value of a path
    being ``Π_d accuracy[d][r_d]``: the probability that all of it is accepted.

    Greedy best-first growth: a node's value never exceeds its parent's (accuracies ≤ 1)
    nor its elder sibling's (accuracies sorted by rank), so every prefix of the list is a
    tree, and ``1 + Σ values`` of a prefix is its expected accepted length plus the bonus.

    >>> [(round(v, 2), p) for v, p in best_first([[0.6, 0.2], [0.4, 0.1]], 4)]
    [(0.6, (0,)), (0.24, (0, 0)), (0.2, (1,)), (0.08, (1, 0))]
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
    return chosen


def medusa_tree(accuracy: Sequence[Sequence[float]], nodes: int) -> list[Path_]:
    """The ``nodes`` rank paths of largest ``Π_d accuracy[d][r_d]``, parents first.

    >>> medusa_tree([[0.6, 0.2], [0.4, 0.1]], 4)
    [(0,), (1,), (0, 0), (1, 0)]
    """
    return sorted((p for _, p in best_first(accuracy, nodes)), key=lambda p: (len(p), p))


AUTO_SIZES = (2, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # node counts ``nodes="auto"`` weighs


def choose_nodes(values: Sequence[float], verify_ms: dict[int, float], draft_ms: float) -> int:
    """The node count ``n`` (a key of ``verify_ms`` less one) of most expected tokens per
    millisecond, ``(1 + Σ_{j<n} values[j]) / (verify_ms[n + 1] + draft_ms)``: the tree
    size that this machine's verification costs pay for (Medusa-2 sizes its tree for its
    hardware the same way). ``values``: :func:`best_first`'s, in its order.

    >>> vals = [0.6, 0.3, 0.2, 0.1, 0.05, 0.05, 0.02, 0.02]
    >>> choose_nodes(vals, {3: 1.2, 5: 1.5, 9: 3.0}, 0.1)  # 1.9/1.3, 2.2/1.6, 2.34/3.1
    2
    >>> choose_nodes(vals, {3: 1.0, 5: 1.0, 9: 1.05}, 0.1)  # flat costs: the biggest tree
    8
    """
    best, best_rate = 0, 0.0
    for tokens, ms in sorted(verify_ms.items()):
        n = min(tokens - 1, len(values))
        if n <= 0:
            continue
        rate = (1.0 + sum(values[:n])) / (ms + draft_ms)
        if rate > best_rate:
            best, best_rate = n, rate
    return best


class MedusaDrafter(Drafter):
    name = "medusa"
    needs_hidden_states = True

    def __init__(
        self,
        target,
        heads: MedusaHeads,
        config: HeadConfig,
        nodes: int | str = 32,
        topk: int = 8,
    ) -> None:
        super().__init__()
        self.target = target
        self.heads = heads.eval()
        self.config = config
        self.lm_head = target.get_output_embeddings()
        acc = config.accuracy or [
            [0.5**d / (r + 1) for r in range(topk)] for d in range(1, heads.num_heads + 1)
        ]
        acc = [row[:topk] for row in acc[: heads.num_heads]]
        if nodes == "auto":  # the size this machine's verification pays for
            nodes = self._auto_nodes(acc)
        elif isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 0:
            raise ValueError(f"nodes must be an int >= 0 or 'auto', got {nodes!r}")
        self.nodes = nodes
        self.paths = medusa_tree(acc, nodes)
        index = {p: i for i, p in enumerate(self.paths)}
        self.parents = [index.get(p[:-1], -1) for p in self.paths]
        self.depth = [len(p) for p in self.paths]
        self.rank = torch.tensor([p[-1] for p in self.paths], dtype=torch.long)
        self.head_of = torch.tensor([len(p) - 1 for p in self.paths], dtype=torch.long)
        self.topk = 1 + max((p[-1] for p in self.paths), default=0)

    def _auto_nodes(self, acc: list[list[float]]) -> int:
        """:func:`choose_nodes` over :data:`AUTO_SIZES`, with the target's verification
        costs measured here (once per process per target and thread count) and the heads'
        own forward timed."""
        values = [v for v, _ in best_first(acc, max(AUTO_SIZES))]
        costs = _verify_ms(self.target)
        h = torch.zeros(1, self.target.config.hidden_size, dtype=self.lm_head.weight.dtype)
        h = h.to(self.lm_head.weight.device)
        with torch.inference_mode():
            times = []
            for _ in range(6):
                start = time.perf_counter()
                linear_module(self.lm_head, self.heads(h)).topk(8, dim=-1)
                times.append(1e3 * (time.perf_counter() - start))
        draft_ms = sorted(times[1:])[2]
        n = choose_nodes(values, costs, draft_ms) or min(AUTO_SIZES)
        log.info(
            "medusa: %d nodes (expected tau %.2f; verify %s ms; heads %.2f ms)",
            n,
            1 + sum(values[:n]),
            {k: round(v, 2) for k, v in costs.items()},
            draft_ms,
        )
        return n

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
