"""The mixture's router: which domain adapter drafts a request.

Two ways, one class (:class:`Router`):

- **explicit tag** (``mode="tag"``): a request that names its domain (``"domain": "sql"``
  in the API) is drafted by that domain's adapter; a tag that names no adapter is an error
  (the server answers 400). Requests without a tag fall back to the learned rule.
- **learned** (``mode="learned"``, and the fallback above): a contextual bandit on a cheap
  feature of the prompt. The feature is the prompt's **hashed token histogram** —
  unigram and bigram counts of its token ids hashed into ``dim`` buckets, L2-normalised,
  plus a constant 1 (:func:`prompt_features`). Per adapter ``a`` a ridge regression
  predicts the **acceptance rate** α the adapter gets on a prompt from that feature
  (LinUCB, Li et al. 2010): ``θ_a = A_a⁻¹ b_a`` with ``A_a = I + Σ x xᵀ`` and
  ``b_a = θ₀ + Σ α x`` over the requests ``a`` drafted; a request goes to
  ``argmax_a θ_a·x + explore · sqrt(xᵀ A_a⁻¹ x)``. The prior ``θ₀`` predicts α =
  ``prior`` for every prompt (optimistic: each adapter is tried before it is written off);
  ``decay`` < 1 would forget old evidence geometrically (off by default).
  Feedback is the α the served adapter got (:meth:`Router.update`): **every** served
  request teaches the router, tagged ones too.

  **Load balance**: without tags the adapters start identical and learn from what the
  router sends them, so the adapter that happens to be ahead gets more traffic, learns
  more and stays ahead — the whole stream collapses onto one adapter (the mixture-of-
  experts failure; measured: ``experiments/mixture.py``). As MoE routers do, each score
  pays ``balance · (share_a − 1/N)``, ``share_a`` the adapter's recent share of requests
  (an exponential average, rate ``balance_rate``): an adapter may lead only where it is
  clearly better, so different prompt kinds settle on different adapters.

Worked example — two adapters, prompts ``[1, 2, 1, 2]`` (kind A) and ``[7, 8, 7, 8]``
(kind B); adapter ``a`` accepts well on A, ``b`` on B:

>>> r = Router(["a", "b"], mode="learned", explore=0.0)
>>> A, B = [1, 2, 1, 2], [7, 8, 7, 8]
>>> r.route(A), r.route(B)  # untrained: the prior ties; a's share now leads, so B goes to b
('a', 'b')
>>> for _ in range(20):
...     r.update(A, "a", 0.8); r.update(A, "b", 0.2); r.update(B, "a", 0.1); r.update(B, "b", 0.7)
>>> r.route(A), r.route(B)
('a', 'b')
>>> r.route(B, tag="a")  # learned mode ignores tags (they stay record labels)
'b'
>>> Router(["a", "b"]).route(B, tag="c")
Traceback (most recent call last):
    ...
ValueError: domain 'c' names no adapter of this mixture; choose from a, b (or send no domain)

No torch here: numpy, a few ``dim × dim`` matrices (256 × 256 by default) per adapter.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

__all__ = ["ROUTER_MODES", "Router", "prompt_features"]

ROUTER_MODES = ("tag", "learned")
_GOLDEN = 2654435761  # Knuth's multiplicative hash


def prompt_features(tokens: Sequence[int], dim: int = 256) -> np.ndarray:
    """``[dim + 1]``: the hashed unigram + bigram histogram of ``tokens``, L2-normalised,
    then a constant 1 (the bias).

    >>> x = prompt_features([3, 3], dim=8)
    >>> x.shape, float(x[-1]), round(float(np.linalg.norm(x[:-1])), 6)
    ((9,), 1.0, 1.0)
    """
    h = np.zeros(dim + 1)
    ids = [int(t) for t in tokens]
    for t in ids:
        h[(t * _GOLDEN) % dim] += 1.0
    for a, b in itertools.pairwise(ids):
        h[((a * 1_000_003 + b + 1) * _GOLDEN) % dim] += 1.0
    norm = np.linalg.norm(h[:dim])
    if norm > 0:
        h[:dim] /= norm
    h[dim] = 1.0
    return h


class Router:
    """Explicit tag, else (or always, ``mode="learned"``) the learned rule; see the module
    docstring."""

    def __init__(
        self,
        adapters: Sequence[str],
        mode: str = "tag",
        dim: int = 256,
        explore: float = 0.1,
        prior: float = 1.0,
        decay: float = 1.0,
        balance: float = 0.5,
        balance_rate: float = 0.02,
    ) -> None:
        adapters = list(adapters)
        if not adapters or len(set(adapters)) != len(adapters):
            raise ValueError(f"a router needs distinct adapter names, got {adapters}")
        if mode not in ROUTER_MODES:
            raise ValueError(f"router mode {mode!r}: choose from {', '.join(ROUTER_MODES)}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"router dim must be an int >= 1, got {dim!r}")
        if not explore >= 0 or not 0 < decay <= 1:
            raise ValueError(f"router explore must be >= 0 and decay in (0, 1]: {explore}, {decay}")
        self.adapters, self.mode, self.dim = adapters, mode, dim
        if not balance >= 0 or not 0 < balance_rate <= 1:
            raise ValueError(f"router balance must be >= 0, balance_rate in (0, 1]: {balance}")
        self.explore, self.decay = float(explore), float(decay)
        self.balance, self.balance_rate = float(balance), float(balance_rate)
        self.share = {a: 1.0 / len(adapters) for a in adapters}  # recent share of requests
        n = dim + 1
        self._a_inv = {a: np.eye(n) for a in adapters}  # A_a⁻¹, [n, n]
        self._b = {a: np.zeros(n) for a in adapters}  # b_a, [n]
        for a in adapters:
            self._b[a][dim] = prior  # θ₀ = prior · e_bias (A starts at I)
        self.routed = dict.fromkeys(adapters, 0)  # requests sent to each adapter
        self.updates = 0

    def check(self, tag: str | None) -> None:
        """A tag must name an adapter (mode ``tag``); ``ValueError`` says which exist."""
        if self.mode == "tag" and tag is not None and tag not in self.adapters:
            raise ValueError(
                f"domain {tag!r} names no adapter of this mixture; choose from "
                f"{', '.join(self.adapters)} (or send no domain)"
            )

    def features(self, tokens: Sequence[int]) -> np.ndarray:
        return prompt_features(tokens, self.dim)

    def scores(self, x: np.ndarray) -> dict[str, tuple[float, float]]:
        """Per adapter: (predicted α, exploration bonus) for feature ``x``."""
        out = {}
        for a in self.adapters:
            a_inv = self._a_inv[a]
            mean = float(x @ (a_inv @ self._b[a]))
            bonus = self.explore * float(np.sqrt(max(x @ a_inv @ x, 0.0)))
            out[a] = (mean, bonus)
        return out

    def route(self, tokens: Sequence[int] | np.ndarray, tag: str | None = None) -> str:
        """The adapter for a prompt (token ids, or its :meth:`features`)."""
        self.check(tag)
        if self.mode == "tag" and tag is not None:
            choice = tag
        else:
            x = self._x(tokens)
            scores = self.scores(x)
            even = 1.0 / len(self.adapters)
            choice = max(
                self.adapters,
                key=lambda a: sum(scores[a]) - self.balance * (self.share[a] - even),
            )
        self.routed[choice] += 1
        for a in self.adapters:  # exponential average of the routing decisions
            self.share[a] += self.balance_rate * (float(a == choice) - self.share[a])
        return choice

    def update(self, tokens: Sequence[int] | np.ndarray, adapter: str, alpha: float) -> None:
        """Adapter ``adapter`` drafted a prompt and got acceptance rate ``alpha``."""
        if adapter not in self._a_inv:
            raise ValueError(f"unknown adapter {adapter!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        x = self._x(tokens)
        a_inv = self._a_inv[adapter] / self.decay  # (γA)⁻¹
        ax = a_inv @ x
        self._a_inv[adapter] = a_inv - np.outer(ax, ax) / (1.0 + x @ ax)  # Sherman–Morrison
        self._b[adapter] = self.decay * self._b[adapter] + alpha * x
        self.updates += 1

    def _x(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(tokens, np.ndarray) and tokens.shape == (self.dim + 1,):
            return tokens
        return self.features(tokens)

    def summary(self) -> dict:
        share = {a: round(v, 3) for a, v in self.share.items()}
        return {
            "mode": self.mode,
            "routed": dict(self.routed),
            "share": share,
            "updates": self.updates,
        }
