"""A separate draft model (classic speculative decoding, OSD): a chain or an MCSD k-config tree.

``tree=(4, 2, 2)`` drafts 4 children of the root, 2 under each of those, 2 under each of
those (4 + 8 + 16 = 28 nodes, depth 3); ``k=4`` is the chain ``(1, 1, 1, 1)``. The draft
decodes the tree level by level, one draft forward per level, each level attending to the
committed prefix and its own ancestors (the same tree mask as verification).

Greedy (temperature 0): children are the draft's top-c tokens (point masses). Sampling:
children are drawn from the draft's warped distribution ``p`` — iid (with replacement) or
one after another without replacement — and ``p`` is handed to acceptance, which keeps the
output distributed exactly as the target's.

Batched: :meth:`DraftModelDrafter.propose_batch` drafts for all sequences at once — one
draft forward to catch up (each sequence feeds the committed tokens its cache lacks:
ragged), then one forward per tree level. The draft has its own slot-per-sequence
position-indexed cache (:mod:`osd.specdec.kvcache`) and the same lean forward as the
target (:mod:`osd.specdec.lean`). The cache holds the committed tokens plus the fed tree
levels; after acceptance the accepted nodes it holds move next to the root (a chain's are
already there) and the rest is past the length, i.e. gone.

Target-initialised trees (improved MCSD, ``target_init=True``): the engine then does not
draw a step's last token (bonus or recovered) but keeps its target distribution in
``DecodeState.pending``; the next tree's first level is that distribution's top-c — point
masses, which acceptance samples exactly — and every branch below is drafted as usual.
The first level costs no draft forward: it is fed together with the catch-up. Worked
example, greedy, ``tree=(2, 2)``: the target's row after the last accepted token ranks
tokens 17 > 4 > …; the first level is ``[17, 4]``, the draft's top-2 after ``17`` and after
``4`` the second (parents ``[-1, -1, 0, 0, 1, 1]``); the engine's greedy walk accepts 17
(the target's argmax, as its bonus would have been) and continues below it. A sequence
with nothing pending (just admitted, or its last step accepted nothing and drew the token)
gets the configuration less its first level, drafted below the token the engine drew —
which is the target's own, as the first level would have been.

Frequent-token shortlist (FR-Spec, ``shortlist=ids``): a small draft's cost is mostly its
LM head over the whole vocabulary; with a shortlist the head runs over those rows only and
the chosen rows map back to target ids (sampling: the draft's distribution is zero outside
the shortlist). Acceptance is unchanged, so the output stays exactly the target's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from osd.drafters.base import DecodeState, Drafter, StepResult
from osd.specdec.decision import AcceptPredictor
from osd.specdec.kvcache import moves
from osd.specdec.lean import LeanLM, causal_mask, prefill
from osd.specdec.sampling import SamplingParams, warp_probs
from osd.specdec.tree import TokenTree, ancestor_matrix


@dataclass
class _DraftSeq:
    slot: int = -1
    cached: int = 0  # tokens of state.tokens whose K/V the draft cache holds
    committed: int = 0  # len(state.tokens) when the last tree was drafted (root included)
    fed: int = 0  # tree nodes of that tree fed into the cache after them

    @property
    def cache_extent(self) -> int:
        """Positions of its slot that hold K/V worth keeping (``KVCache.free`` copies these)."""
        return max(self.cached, self.committed + self.fed)


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


@dataclass(frozen=True)
class _Shape:
    """The full k-config tree: node parents (parents first, level by level), level bounds,
    and which fed node is an ancestor-or-self of which — built once per configuration;
    a step that drafts fewer levels (the controller's depth, the decision model's stop, the
    tokens left) uses its leading block, which *is* the shallower tree's (MCSD's sliced,
    topology-aware mask: no per-step rebuild):

    >>> full, short = _Shape.of((2, 2, 1)), _Shape.of((2, 2))
    >>> hi = full.levels[1][1]  # nodes of the first two levels
    >>> full.parents[:hi] == short.parents and full.levels[:2] == short.levels
    True
    >>> bool((full.anc[:hi, :hi] == short.anc).all())
    True
    >>> for row in full.anc[:hi, :hi].int().tolist():  # 0, 1: level 1; 2, 3 under 0; 4, 5 under 1
    ...     print(row)
    [1, 0, 0, 0, 0, 0]
    [0, 1, 0, 0, 0, 0]
    [1, 0, 1, 0, 0, 0]
    [1, 0, 0, 1, 0, 0]
    [0, 1, 0, 0, 1, 0]
    [0, 1, 0, 0, 0, 1]
    """

    parents: list[int]
    levels: list[tuple[int, int]]  # [lo, hi) node range of each level
    anc: torch.Tensor  # [n, n] bool
    branching: tuple[int, ...] = ()  # children per node, level by level

    @classmethod
    def of(cls, branching: tuple[int, ...]) -> _Shape:
        parents: list[int] = []
        levels = []
        frontier = [-1]
        for c in branching:
            lo = len(parents)
            for node in frontier:
                parents.extend([node] * c)
            levels.append((lo, len(parents)))
            frontier = list(range(lo, len(parents)))
        return cls(parents, levels, ancestor_matrix(torch.tensor(parents)), tuple(branching))


SHORTLIST_FILE = "shortlist.json"


def draft_shortlist(draft) -> list[int]:
    """The frequent-token shortlist saved beside a draft (``shortlist.json``, target ids;
    written by ``osd zoo build --target NAME``)."""
    folder = Path(getattr(draft, "name_or_path", "") or draft.config.name_or_path or ".")
    path = folder / SHORTLIST_FILE
    if not path.is_file():
        raise ValueError(
            f"the draft at {folder} has no {SHORTLIST_FILE}; `osd zoo build --target smollm2` "
            "writes one with its draft"
        )
    return [int(t) for t in json.loads(path.read_text())]


class _ShortlistHead(torch.nn.Module):
    """The draft seen through the rows of its LM head that a shortlist keeps (FR-Spec):
    the same decoder modules, a head over ``ids`` only; refreshed on every weight load."""

    def __init__(self, model, ids: torch.Tensor) -> None:
        super().__init__()
        self.model, self.config, self.ids = model.model, model.config, ids
        self.full_head = model.lm_head
        w = model.lm_head.weight
        self.lm_head = torch.nn.Linear(w.shape[1], len(ids), bias=False, device=w.device)
        self.lm_head.to(w.dtype)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        self.lm_head.weight.copy_(self.full_head.weight[self.ids.to(self.full_head.weight.device)])


class DraftModelDrafter(Drafter):
    name = "draft_model"

    def __init__(
        self,
        model,
        k: int = 4,
        tree: str | tuple[int, ...] | None = None,
        without_replacement: bool = True,
        shortlist: Sequence[int] | None = None,
        early_stop: float | None = None,
        target_init: bool = False,
    ) -> None:
        """``shortlist``: target token ids the draft may propose (FR-Spec); its LM head
        then runs over those rows only, and its choices map back to the target's ids.
        ``early_stop``: drafting stops for a sequence where the online decision model
        (:mod:`osd.specdec.decision`) predicts acceptance below this threshold (on a tree,
        from the draft distribution of each level's first open node).
        ``target_init``: the first level is the target's top-c (module docstring)."""
        super().__init__()
        if tree is None:
            if not isinstance(k, int) or k <= 0:
                raise ValueError(f"k (draft length) must be a positive int, got {k!r}")
            tree = (1,) * k
        self.branching = parse_tree(tree)
        self.stop = None
        if early_stop is not None:
            self.stop = AcceptPredictor(threshold=float(early_stop))
        self.target_init = self.defers_bonus = bool(target_init)
        self.shape = _Shape.of(self.branching)
        # target-initialised, nothing pending: the engine drew the last token itself (the
        # target's own), so the draft's tree below it is the configuration less its first level
        self.rest = _Shape.of(self.branching[1:] or self.branching)
        self.model = model.eval()
        self.vocab = int(model.config.vocab_size)
        self.short = None
        if shortlist is not None:
            ids = torch.tensor(sorted(set(int(t) for t in shortlist)), dtype=torch.long)
            if len(ids) == 0 or int(ids[0]) < 0 or int(ids[-1]) >= self.vocab:
                raise ValueError(f"shortlist ids must lie in [0, {self.vocab}) and be non-empty")
            self.short = _ShortlistHead(model, ids)
        self.lm = LeanLM(self.short if self.short is not None else model)
        self.without_replacement = without_replacement
        self.context = self.lm.context
        self.cache = self.lm.new_cache(extra=len(self.shape.parents) + 1)

    @property
    def k(self) -> int:
        return len(self.branching)

    # -- per sequence ------------------------------------------------------------------
    def start(self, state: DecodeState) -> None:
        self.start_batch([state])

    def start_batch(self, states: Sequence[DecodeState]) -> None:
        """A slot per sequence, prefilled with the prompt but its last token (as the
        target's), all prompts together: at the first step the catch-up then feeds the root
        only, instead of the whole prompt padded across the batch it joins."""
        seqs = []
        self.cache.reserve_slots(self.cache.used + len(states))
        for state in states:
            ds = _DraftSeq()
            ds.slot = self.cache.alloc(ds)
            state.draft = ds
            ds.cached = max(0, min(len(state.tokens) - 1, self.context - 1))
            seqs.append(state.tokens[: ds.cached])
        longest = max(len(x) for x in seqs)
        if longest == 0:
            return
        self.cache.reserve(longest + len(self.shape.parents) + 2)
        with torch.inference_mode():
            prefill(self.lm, self.cache, [s.draft.slot for s in states], seqs)

    def release(self, state: DecodeState) -> None:
        ds: _DraftSeq | None = state.draft
        if ds is None or ds.slot < 0:
            return
        self.cache.free(ds.slot)
        ds.slot = -1

    def propose(self, state: DecodeState, max_depth: int) -> TokenTree:
        return self.propose_batch([state], [max_depth])[0]

    def observe(self, state: DecodeState, result: StepResult) -> None:
        self.observe_batch([state], [result])

    # -- batched -----------------------------------------------------------------------
    def _children(
        self, logits: torch.Tensor, c: int, sampling: SamplingParams, gen: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        """c child tokens of one node and the distribution they were drawn from."""
        if sampling.greedy:
            return self._ids(logits.topk(c).indices).tolist(), None
        p = warp_probs(logits, sampling)  # [V] (or [shortlist])
        replace = not self.without_replacement
        if not replace:
            c = min(c, int((p > 0).sum()))
        kids = torch.multinomial(p, c, replacement=replace, generator=gen)
        if self.short is not None:  # the draft's distribution over the target's vocabulary
            p = p.new_zeros(self.vocab).index_copy_(0, self.short.ids.to(p.device), p)
        return self._ids(kids).tolist(), p

    def _ids(self, idx: torch.Tensor) -> torch.Tensor:
        """Draft head rows → target token ids (the identity without a shortlist)."""
        return idx if self.short is None else self.short.ids.to(idx.device)[idx]

    def _catch_up(self, states: Sequence[DecodeState]) -> torch.Tensor:
        """Feed each sequence the committed tokens its cache lacks (the root at least);
        returns the draft logits after each root ``[a, V]``."""
        seqs = [s.draft for s in states]
        for s, d in zip(states, seqs, strict=True):  # the root at least (it may be cached)
            d.cached = min(d.cached, len(s.tokens) - 1)
        starts = torch.tensor([d.cached for d in seqs])
        tails = [s.tokens[d.cached :] for s, d in zip(states, seqs, strict=True)]
        counts = torch.tensor([len(t) for t in tails])
        t = int(counts.max())
        ids = torch.zeros(len(states), t, dtype=torch.long)
        for i, tail in enumerate(tails):
            ids[i, : len(tail)] = torch.tensor(tail)
        pos = starts[:, None] + torch.arange(t)[None]
        length = int((starts + t).max())
        self.cache.reserve(length + len(self.shape.parents) + 1)
        mask = causal_mask(starts, counts, length)
        slots = torch.tensor([d.slot for d in seqs])
        logits, _ = self.lm.forward(self.cache, slots, ids, pos, pos, mask, logits_at=counts - 1)
        for s, d in zip(states, seqs, strict=True):
            d.cached = d.committed = len(s.tokens)
            d.fed = 0
        return logits

    def _catch_up_first(self, states: Sequence[DecodeState], first: torch.Tensor) -> torch.Tensor:
        """Target-initialised: feed each sequence the committed tokens its cache lacks (maybe
        none) **and** the first level ``first`` ``[a, c]`` in one forward; returns the draft
        logits after each first-level node ``[a, c, V]``.

        Row layout ``[tail (padded to t) | c nodes]``: a tail token at its position
        (causal), node j at position ``len(tokens)`` (depth 1), written at
        ``len(tokens) + j`` and seeing the committed tokens and itself; padding writes past
        the first level (overwritten by the next level) and sees position 0 only."""
        seqs = [s.draft for s in states]
        a, c = first.shape
        starts = torch.tensor([d.cached for d in seqs])  # [a]
        committed = torch.tensor([len(s.tokens) for s in states])  # [a]
        tails = [s.tokens[d.cached :] for s, d in zip(states, seqs, strict=True)]
        counts = torch.tensor([len(t) for t in tails])  # [a]
        t = int(counts.max())
        ids = torch.zeros(a, t + c, dtype=torch.long)
        for i, tail in enumerate(tails):
            ids[i, : len(tail)] = torch.tensor(tail, dtype=torch.long)
        ids[:, t:] = first
        row = torch.arange(t)[None]  # [1, t]
        real = row < counts[:, None]  # [a, t]
        pos = torch.cat([starts[:, None] + row, committed[:, None].expand(a, c)], 1)  # [a, t+c]
        scratch = committed[:, None] + c + row  # padding writes past the first level
        at = torch.cat(
            [
                torch.where(real, starts[:, None] + row, scratch),
                committed[:, None] + torch.arange(c),
            ],
            1,
        )
        length = int(committed.max()) + c + t
        self.cache.reserve(length + len(self.shape.parents) + 1)
        col = torch.arange(length)[None, None, :]  # [1, 1, L]
        tail_mask = (col <= pos[:, :t, None]) & (real[:, :, None] | (col == 0))  # [a, t, L]
        node_mask = (col < committed[:, None, None]) | (col == at[:, t:, None])  # [a, c, L]
        mask = torch.cat([tail_mask, node_mask], 1)
        slots = torch.tensor([d.slot for d in seqs])
        logits, _ = self.lm.forward(self.cache, slots, ids, pos, at, mask)
        for s, d in zip(states, seqs, strict=True):
            d.cached = d.committed = len(s.tokens)
            d.fed = c
        return logits[:, t:]

    def _first_level(
        self, states: Sequence[DecodeState], c: int
    ) -> tuple[torch.Tensor, list[list[torch.Tensor | None]]]:
        """The target's top-c of each pending distribution ``[a, c]`` (target ids) and, per
        sequence, the rows acceptance reads them from: point masses — ``None`` for greedy,
        one-hot rows where the deeper levels are sampled (a one-hot ``d`` is the point-mass
        rule). Fewer than c tokens of positive probability: the last one repeats (a
        sibling that can never be accepted)."""
        rows, probs = [], []
        for s in states:
            pend = s.pending.float()  # [V]
            top = pend.topk(min(c, pend.numel())).indices.tolist()
            if not s.sampling.greedy:
                top = [x for x in top if pend[x] > 0] or top[:1]
            top += [top[-1]] * (c - len(top))
            rows.append(top)
            if s.sampling.greedy:
                probs.append([None] * c)
            else:
                one = torch.eye(1, self.vocab, device=pend.device)[0]  # [V] one-hot at 0
                probs.append([one.roll(x) for x in top])
        return torch.tensor(rows, dtype=torch.long), probs

    def _feed(
        self, states: Sequence[DecodeState], ids: torch.Tensor, lo: int, hi: int, shape: _Shape
    ):
        """Feed the level's nodes ``lo..hi-1`` (ids ``[a, hi - lo]``) after the earlier
        levels; returns their draft logits ``[a, hi - lo, V]``."""
        seqs = [s.draft for s in states]
        committed = torch.tensor([d.committed for d in seqs])  # [a]
        a, w = ids.shape
        depth = int(shape.levels.index((lo, hi))) + 1
        pos = (committed - 1 + depth)[:, None].expand(a, w)
        at = committed[:, None] + torch.arange(lo, hi)[None]  # [a, w]
        length = int(committed.max()) + hi
        col = torch.arange(length)[None, None, :]
        mask = (col < committed[:, None, None]).expand(a, w, length).clone()
        anc = shape.anc[lo:hi, :hi]  # [w, hi]
        node_cols = committed[:, None, None] + torch.arange(hi)[None, None, :]  # [a, 1, hi]
        mask.scatter_(2, node_cols.expand(a, w, hi), anc[None].expand(a, w, hi))
        slots = torch.tensor([d.slot for d in seqs])
        logits, _ = self.lm.forward(self.cache, slots, ids, pos, at, mask)
        for d in seqs:
            d.fed = hi
        return logits

    @torch.inference_mode()
    def propose_batch(self, states: Sequence[DecodeState], depths: list[int]) -> list[TokenTree]:
        limit = [
            min(self.k, d, self.context - len(s.tokens))
            for s, d in zip(states, depths, strict=True)
        ]
        trees = [TokenTree.empty() for _ in states]
        active = [i for i, d in enumerate(limit) if d > 0]
        init = [i for i in active if self.target_init and states[i].pending is not None]
        rest = [i for i in active if i not in set(init)]
        for group, from_target in ((init, True), (rest, False)):
            if group:
                shape = self.rest if self.target_init and not from_target else self.shape
                for i in group:
                    limit[i] = min(limit[i], len(shape.levels))
                self._propose(states, group, limit, trees, shape, from_target)
        return trees

    def _propose(
        self,
        states: Sequence[DecodeState],
        active: list[int],
        limit: list[int],
        trees: list[TokenTree],
        shape: _Shape,
        from_target: bool,
    ) -> None:
        """Draft the trees of ``states[active]`` into ``trees``: level by level, one draft
        forward each; the first level from the target's pending distribution when
        ``from_target`` (fed with the catch-up), else from the draft."""
        act = [states[i] for i in active]
        toks: list[list[int]] = [[] for _ in act]
        probs: list[list[torch.Tensor | None]] = [[] for _ in act]
        feats: list[torch.Tensor] = []
        first = 0
        if from_target:
            kids, probs = self._first_level(act, shape.branching[0])  # [a, c]
            toks = kids.tolist()
            if self.stop is not None:  # the target's distribution there (a label, no stop)
                pend = torch.stack([s.pending.float() for s in act])
                pend = pend if all(s.sampling.greedy for s in act) else pend.clamp_min(1e-30).log()
                feats.append(self.stop.features(pend, 0))
            frontier = self._catch_up_first(act, kids)  # [a, c, V]
            first = 1
        else:
            frontier = self._catch_up(act)[:, None]  # [a, 1, V] logits of the open nodes
        greedy = all(s.sampling.greedy for s in act)
        deepest = max(limit[i] for i in active)
        for d in range(first, deepest):
            c = shape.branching[d]
            if self.stop is not None:  # from each sequence's first open node
                f, cut = self.stop.cut(frontier[:, 0], d, [limit[j] for j in active])
                feats.append(f)
                for j, lim in zip(active, cut, strict=True):
                    limit[j] = lim
                if all(d >= limit[j] for j in active):
                    break
            if greedy:  # one top-c for every open node of every sequence
                kids = self._ids(frontier.topk(c, dim=-1).indices).reshape(len(act), -1)
            else:
                rows = []
                for i, s in enumerate(act):
                    row: list[int] = []
                    if d >= limit[active[i]]:  # this tree is complete: draw nothing more
                        rows.append([0] * (frontier.shape[1] * c))
                        continue
                    for lg in frontier[i]:
                        k, p = self._children(lg, c, s.sampling, s.generator)
                        # support exhausted without replacement: repeat the last token;
                        # acceptance treats a sibling that could not be drawn as a point
                        # mass (lossless for any proposal fixed by the history)
                        k += [k[-1]] * (c - len(k))
                        row += k
                        probs[i] += [p] * c
                    rows.append(row)
                kids = torch.tensor(rows)
            for i in range(len(act)):
                if d < limit[active[i]]:
                    toks[i] += kids[i].tolist()
            if d == deepest - 1:
                break
            lo, hi = shape.levels[d]
            frontier = self._feed(act, kids, lo, hi, shape)
        for i, s in enumerate(act):
            if feats:
                s.stop_feats = torch.stack([f[i] for f in feats[: limit[active[i]]]])
            n = shape.levels[limit[active[i]] - 1][1]
            greedy_row = all(x is None for x in probs[i][:n])  # point masses
            p = None if greedy_row else torch.stack(probs[i][:n])
            tree = TokenTree.from_parents(
                toks[i][:n], shape.parents[:n], p, self.without_replacement
            )
            s.draft.fed = min(s.draft.fed, n)  # nodes of this tree whose K/V it holds
            trees[active[i]] = tree

    def observe_batch(self, states: Sequence[DecodeState], results: Sequence[StepResult]) -> None:
        slots, src, dst = [], [], []
        for s, r in zip(states, results, strict=True):
            ds: _DraftSeq = s.draft
            if r.tree.size == 0:
                continue
            kept = [i for i in r.accept.path if i < ds.fed]  # accepted nodes it holds
            a, b = moves(ds.committed, kept)
            slots += [ds.slot] * len(a)
            src += a
            dst += b
            ds.cached = ds.committed + len(kept)
        self.cache.move(torch.tensor(slots), torch.tensor(src), torch.tensor(dst))

    # -- weights -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.model.load_state_dict(state_dict, strict=True)
        if self.short is not None:
            self.short.refresh()
        self.version = version
