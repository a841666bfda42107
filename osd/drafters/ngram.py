"""Prompt lookup and suffix trees: the model-free drafters.

By default (``nodes=0``) the drafter is prompt lookup: find the most recent earlier
occurrence of the sequence's last ``n`` tokens (``n`` from ``max_ngram`` down to
``min_ngram``) and propose the ``k`` tokens that followed it, as a deterministic chain
(point masses for acceptance).

Worked example — tokens ``[5, 6, 7, 9, 5, 6]``, ``max_ngram=2``, ``k=3``: the suffix ``[5, 6]``
occurred at 0..1, followed by ``[7, 9, 5]``, so the proposal is the chain ``7 → 9 → 5``.

With ``nodes=N`` it proposes a **tree** of up to ``N`` nodes instead, as SuffixDecoding
does (Oliaro et al., 2024): every earlier occurrence of the longest suffix that occurs at
all (the ``MAX_MATCHES`` latest per source) contributes its continuation of up to ``k``
tokens to a trie; a node's score is the share of those continuations that pass through
it, and the ``N`` best-scored nodes are kept (a child never outscores its parent, so they
form a tree). With ``history=T`` the sequences this drafter finished before (the last
``T`` tokens of them, prompts included) are searched too, at ``HISTORY_WEIGHT`` the weight
of a match in the sequence itself: what earlier requests generated is drafted for later
ones, with no training. Candidates are point masses either way, so greedy decoding is
exact and sampling is exact by the point-mass rule.

Lookups use n-gram indexes that grow with the tokens (no rescan of the context per step).
"""

from __future__ import annotations

from osd.drafters.base import DecodeState, Drafter
from osd.specdec.tree import TokenTree

MAX_MATCHES = 32  # latest occurrences of a suffix used, per source (sequence, history)
HISTORY_WEIGHT = 0.5  # a history match's weight relative to one in the sequence itself
_SEP = -1  # between finished sequences in the history: no n-gram or continuation spans it


def lookup(tokens: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier match of the longest suffix."""
    n_tok = len(tokens)
    for n in range(min(max_ngram, n_tok - 1), min_ngram - 1, -1):
        suffix = tokens[n_tok - n :]
        for start in range(n_tok - n - 1, -1, -1):  # latest match first
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


class NgramIndex:
    """Where each n-gram (``lo ≤ n ≤ hi``) of a growing token list starts, for n-grams that
    have a following token; ``extend`` indexes only the new tokens.

    >>> ix = NgramIndex(1, 2)
    >>> ix.extend([5, 6, 7, 5, 6])
    >>> ix.continuations((5, 6), 3)
    [[7, 5, 6]]
    >>> ix.continuations((6,), 2)
    [[7, 5]]
    """

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.tokens: list[int] = []
        self.starts: dict[tuple[int, ...], list[int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, new: list[int]) -> None:
        toks = self.tokens
        for tok in new:
            end = len(toks)  # n-grams ending just before ``tok`` now have a continuation
            toks.append(tok)
            if tok == _SEP:
                continue
            for n in range(self.lo, min(self.hi, end) + 1):
                key = tuple(toks[end - n : end])
                if _SEP not in key:
                    self.starts.setdefault(key, []).append(end - n)

    def continuations(self, key: tuple[int, ...], depth: int) -> list[list[int]]:
        """What followed the latest ``MAX_MATCHES`` occurrences of ``key``, newest first,
        each up to ``depth`` tokens (cut at a sequence boundary)."""
        out = []
        n, toks = len(key), self.tokens
        for s in reversed(self.starts.get(key, ())[-MAX_MATCHES:]):
            cont = toks[s + n : s + n + depth]
            if _SEP in cont:
                cont = cont[: cont.index(_SEP)]
            out.append(cont)
        return out


def best_nodes(weighted: list[tuple[float, list[int]]], budget: int) -> TokenTree:
    """The trie of the weighted continuations, cut to its ``budget`` best-scored nodes
    (score: the weight share of the continuations through a node; ties: shallower first).

    >>> t = best_nodes([(1.0, [7, 8]), (1.0, [7, 9]), (1.0, [4])], 3)
    >>> t.tokens.tolist(), t.parents.tolist()
    ([7, 4, 8], [-1, -1, 0])
    """
    total = sum(w for w, _ in weighted)
    score: dict[tuple[int, ...], float] = {}
    for w, cont in weighted:
        for i in range(1, len(cont) + 1):
            path = tuple(cont[:i])
            score[path] = score.get(path, 0.0) + w / total
    chosen: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    for path, _ in sorted(score.items(), key=lambda kv: (-kv[1], len(kv[0]))):
        if len(tokens) >= budget:
            break
        parent = path[:-1]
        if parent and parent not in chosen:
            continue
        chosen[path] = len(tokens)
        tokens.append(path[-1])
        parents.append(chosen[parent] if parent else -1)
    return TokenTree.from_parents(tokens, parents)


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(
        self,
        k: int = 4,
        max_ngram: int = 3,
        min_ngram: int = 1,
        nodes: int = 0,
        history: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"k (draft length) must be a positive int, got {k!r}")
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 ≤ min_ngram ≤ max_ngram, got {min_ngram}, {max_ngram}")
        if not isinstance(nodes, int) or nodes < 0:
            raise ValueError(f"nodes (tree node budget; 0 = a chain) must be ≥ 0, got {nodes!r}")
        if not isinstance(history, int) or history < 0:
            raise ValueError(f"history (tokens kept; 0 = off) must be ≥ 0, got {history!r}")
        if history and not nodes:
            raise ValueError("history needs a tree (nodes > 0): matches are scored across sources")
        self.k, self.max_ngram, self.min_ngram = k, max_ngram, min_ngram
        self.nodes, self.history = nodes, history
        self._past = NgramIndex(min_ngram, max_ngram)

    def start(self, state: DecodeState) -> None:
        if self.nodes:
            state.draft = NgramIndex(self.min_ngram, self.max_ngram)

    def propose(self, state: DecodeState, max_depth: int) -> TokenTree:
        depth = min(self.k, max_depth)
        if not self.nodes:
            return TokenTree.chain(lookup(state.tokens, depth, self.max_ngram, self.min_ngram))
        index: NgramIndex = state.draft
        index.extend(state.tokens[len(index) :])
        toks = state.tokens
        for n in range(min(self.max_ngram, len(toks) - 1), self.min_ngram - 1, -1):
            key = tuple(toks[len(toks) - n :])
            weighted = [(1.0, c) for c in index.continuations(key, depth) if c]
            if self.history:
                past = self._past.continuations(key, depth)
                weighted += [(HISTORY_WEIGHT, c) for c in past if c]
            if weighted:
                return best_nodes(weighted, self.nodes)
        return TokenTree.empty()

    def release(self, state: DecodeState) -> None:
        if self.history:
            self._remember(state.tokens)
        state.draft = None

    def _remember(self, tokens: list[int]) -> None:
        self._past.extend([*tokens, _SEP])
        if len(self._past) > self.history:  # keep the newest half: rebuilt, amortised O(1)
            keep = self._past.tokens[len(self._past) - self.history // 2 :]
            self._past = NgramIndex(self.min_ngram, self.max_ngram)
            self._past.extend(keep)

    def reset(self) -> None:
        """Forget the history of finished sequences."""
        self._past = NgramIndex(self.min_ngram, self.max_ngram)
