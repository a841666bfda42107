"""Prompt lookup: the model-free baseline drafter.

Find the most recent earlier occurrence of the sequence's last ``n`` tokens (``n`` from
``max_ngram`` down to ``min_ngram``) and propose the ``k`` tokens that followed it, as a
deterministic chain (point masses for acceptance).

Worked example — tokens ``[5, 6, 7, 9, 5, 6]``, ``max_ngram=2``, ``k=3``: the suffix ``[5, 6]``
occurred at 0..1, followed by ``[7, 9, 5]``, so the proposal is the chain ``7 → 9 → 5``.
"""

from __future__ import annotations

from osd.drafters.base import DecodeState, Drafter
from osd.specdec.tree import TokenTree


def lookup(tokens: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier match of the longest suffix."""
    n_tok = len(tokens)
    for n in range(min(max_ngram, n_tok - 1), min_ngram - 1, -1):
        suffix = tokens[n_tok - n :]
        for start in range(n_tok - n - 1, -1, -1):  # latest match first
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, k: int = 4, max_ngram: int = 3, min_ngram: int = 1) -> None:
        super().__init__()
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"k (draft length) must be a positive int, got {k!r}")
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 ≤ min_ngram ≤ max_ngram, got {min_ngram}, {max_ngram}")
        self.k, self.max_ngram, self.min_ngram = k, max_ngram, min_ngram

    def propose(self, state: DecodeState, max_depth: int) -> TokenTree:
        return TokenTree.chain(
            lookup(state.tokens, min(self.k, max_depth), self.max_ngram, self.min_ngram)
        )
