"""A separate draft model (classic speculative decoding, OSD): a chain or an MCSD k-config tree.

``tree=(4, 2, 2)`` drafts 4 children of the root, 2 under each of those, 2 under each of
those (4 + 8 + 16 = 28 nodes, depth 3); ``k=4`` is the chain ``(1, 1, 1, 1)``. The draft
decodes the tree level by level, one draft forward per level, each level attending to the
committed prefix and its own ancestors (the same tree mask as verification).

Greedy (temperature 0): children are the draft's top-c tokens (point masses). Sampling:
children are drawn from the draft's warped distribution ``p`` — iid (with replacement) or
one after another without replacement — and ``p`` is handed to acceptance, which keeps the
output distributed exactly as the target's.

The draft's KV cache holds the committed tokens plus the fed tree levels; after acceptance
it keeps the committed prefix and the accepted nodes it already holds (compaction), and
the next ``propose`` feeds whatever committed tokens it lacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from osd.drafters.base import DecodeState, Drafter, StepResult
from osd.specdec.kvcache import cache_len, compact
from osd.specdec.sampling import SamplingParams, warp_probs
from osd.specdec.tree import TokenTree, ancestor_matrix
from osd.specdec.verify import cached_forward


@dataclass
class _DraftSeq:
    cache: DynamicCache
    committed: int = 0  # committed tokens in the cache when the last tree was drafted
    fed_nodes: int = 0  # tree nodes fed into the cache after them


def parse_tree(spec: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``"4,2,2"`` → ``(4, 2, 2)``, validated."""
    if isinstance(spec, str):
        try:
            spec = tuple(int(s) for s in spec.split(",") if s.strip())
        except ValueError:
            raise ValueError(f"tree {spec!r} must be comma-separated ints, e.g. 4,2,2") from None
    spec = tuple(spec)
    if not spec or any(not isinstance(c, int) or c <= 0 for c in spec):
        raise ValueError(f"tree {spec!r} needs ≥ 1 level, each with ≥ 1 child, e.g. (4, 2, 2)")
    return spec


class DraftModelDrafter(Drafter):
    name = "draft_model"

    def __init__(
        self,
        model,
        k: int = 4,
        tree: str | tuple[int, ...] | None = None,
        without_replacement: bool = True,
    ) -> None:
        super().__init__()
        if tree is None:
            if not isinstance(k, int) or k <= 0:
                raise ValueError(f"k (draft length) must be a positive int, got {k!r}")
            tree = (1,) * k
        self.branching = parse_tree(tree)
        self.model = model.eval()
        self.without_replacement = without_replacement
        self.context = int(getattr(model.config, "max_position_embeddings", 1 << 30))

    @property
    def k(self) -> int:
        return len(self.branching)

    def start(self, state: DecodeState) -> None:
        state.draft = _DraftSeq(cache=DynamicCache())

    def _children(
        self, logits: torch.Tensor, c: int, sampling: SamplingParams, gen: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        """c child tokens of one node and the distribution they were drawn from."""
        if sampling.greedy:
            return logits.topk(c).indices.tolist(), None
        p = warp_probs(logits, sampling)  # [V]
        replace = not self.without_replacement
        if not replace:
            c = min(c, int((p > 0).sum()))
        return torch.multinomial(p, c, replacement=replace, generator=gen).tolist(), p

    @torch.inference_mode()
    def propose(self, state: DecodeState, max_depth: int) -> TokenTree:
        ds: _DraftSeq = state.draft
        depth = min(self.k, max_depth, self.context - len(state.tokens))
        if depth <= 0:
            return TokenTree.empty()
        tail = state.tokens[cache_len(ds.cache) :]
        logits, _ = cached_forward(self.model, ds.cache, torch.tensor(tail, dtype=torch.long))
        committed = len(state.tokens)  # the root is now in the draft cache too
        tokens: list[int] = []
        parents: list[int] = []
        probs: list[torch.Tensor] = []
        frontier = [(-1, logits[-1])]
        level_start = 0
        for d in range(depth):
            for node, lg in frontier:
                kids, p = self._children(lg, self.branching[d], state.sampling, state.generator)
                tokens.extend(kids)
                parents.extend([node] * len(kids))
                if p is not None:
                    probs.extend([p] * len(kids))
            if d == depth - 1:
                break
            lo, hi = level_start, len(tokens)
            logits = self._feed_level(ds.cache, committed, tokens, parents, lo, hi)
            frontier = [(lo + r, logits[r]) for r in range(hi - lo)]
            level_start = hi
        ds.committed, ds.fed_nodes = committed, level_start
        return TokenTree.from_parents(
            tokens, parents, torch.stack(probs) if probs else None, self.without_replacement
        )

    def _feed_level(
        self,
        cache: DynamicCache,
        committed: int,
        tokens: list[int],
        parents: list[int],
        lo: int,
        hi: int,
    ) -> torch.Tensor:
        """Draft logits [hi - lo, V] after the nodes lo..hi-1 (earlier levels are cached)."""
        ids = torch.tensor(tokens[lo:hi], dtype=torch.long)
        if hi - lo == 1 and all(p == i - 1 for i, p in enumerate(parents[:hi])):
            return cached_forward(self.model, cache, ids)[0]  # chain: plain causal step
        anc = ancestor_matrix(torch.tensor(parents[:hi]))  # [hi, hi]
        allowed = torch.ones(hi - lo, committed + hi, dtype=torch.bool)
        allowed[:, committed:] = anc[lo:hi]
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )
        depths = [0] * hi
        for i, p in enumerate(parents[:hi]):
            depths[i] = 1 if p < 0 else depths[p] + 1
        pos = torch.tensor([committed - 1 + depths[i] for i in range(lo, hi)])[None]
        return cached_forward(self.model, cache, ids, pos, mask[None, None])[0]

    def observe(self, state: DecodeState, result: StepResult) -> None:
        ds: _DraftSeq = state.draft
        kept = [ds.committed + i for i in result.accept.path if i < ds.fed_nodes]
        keep = torch.cat([torch.arange(ds.committed), torch.tensor(kept, dtype=torch.long)])
        compact(ds.cache, keep)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.model.load_state_dict(state_dict, strict=True)
        self.version = version
