"""The mixture's router: which domain adapter drafts a request.

Two ways, one class (:class:`Router`):

- **explicit tag** (``mode="tag"``): a request that names its domain (``"domain": "sql"``
  in the API) is drafted by that domain's adapter; a tag that names no adapter is an error
  (the server answers 400). Requests without a tag fall back to the learned rule.
- **learned** (``mode="learned"``, and the fallback above), in two steps:

  1. **which kind of prompt** — the prompt's feature is its **hashed token histogram**
     (unigram and bigram counts of its token ids hashed into ``dim`` buckets, square-
     rooted, L2-normalised: :func:`prompt_features`), centred on the mean feature of the
     first ``warmup`` prompts (what all prompts share — spaces, punctuation — says nothing
     of their kind) and normalised again. The router keeps one centroid per adapter:
     k-means over the first ``warmup`` prompts (seeded farthest-point: the first prompt,
     then the one least like those chosen, …), then moved towards each prompt nearest to it
     (online k-means). A prompt's **cluster** is its nearest centroid (cosine).
  2. **which adapter accepts best on that kind** — per cluster and adapter, the mean α of
     the requests that adapter drafted there (an exponential average, so it follows the
     adapters as they learn). Cluster ``j`` starts at **home** on adapter ``j``; another
     adapter takes it over only if its mean beats the home adapter's by more than
     ``home`` (an adapter never tried there counts as ``prior``, so each is tried once,
     and ``explore / sqrt(1 + n)`` keeps trying the rarely tried).

  Feedback is the α the served adapter got (:meth:`Router.update`); **every** served
  request teaches the router, tagged ones too.

Why homes: without tags the adapters start identical and learn from what the router sends
them, so a router that only follows acceptance sends more to whichever adapter is ahead by
chance, which then learns more and stays ahead — the stream collapses onto one adapter (the
mixture-of-experts failure; a LinUCB router did exactly that in ``experiments/mixture.py``).
Giving each prompt kind its own adapter first breaks that symmetry; acceptance then decides
whether it stays there (e.g. when two clusters are one domain, or an adapter is bad).

Worked example — adapters ``a`` and ``b``; prompts ``[1, 2, 1, 2]`` (kind A) and
``[7, 8, 7, 8]`` (kind B):

>>> r = Router(["a", "b"], mode="learned", explore=0.0, prior=0.6)
>>> A, B = [1, 2, 1, 2], [7, 8, 7, 8]
>>> r.route(A), r.route(B)  # two kinds, two clusters: each at its home adapter
('a', 'b')
>>> r.update(A, "a", 0.4); r.update(B, "b", 0.3)
>>> r.route(A), r.route(B)  # the other adapter was never tried there: prior 0.6 > 0.4 + 0.1
('b', 'a')
>>> r.update(A, "b", 0.2); r.update(B, "a", 0.9)
>>> r.route(A), r.route(B)  # A stays home; B moves: a beats its home b by more than 0.1
('a', 'a')
>>> r.route(B, tag="b")  # learned mode ignores tags (they stay record labels)
'a'
>>> Router(["a", "b"]).route(B, tag="c")
Traceback (most recent call last):
    ...
ValueError: domain 'c' names no adapter of this mixture; choose from a, b (or send no domain)

No torch here: numpy, one ``dim``-vector per adapter and a table of means.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

__all__ = ["ROUTER_MODES", "Router", "prompt_features"]

ROUTER_MODES = ("tag", "learned")
_GOLDEN = 2654435761  # Knuth's multiplicative hash


def prompt_features(tokens: Sequence[int], dim: int = 256) -> np.ndarray:
    """``[dim]``: the hashed unigram + bigram histogram of ``tokens``, square-rooted (a
    token repeated 9 times weighs 3), L2-normalised.

    >>> x = prompt_features([3, 3], dim=8)
    >>> x.shape, round(float(np.linalg.norm(x)), 6)
    ((8,), 1.0)
    """
    h = np.zeros(dim)
    ids = [int(t) for t in tokens]
    for t in ids:
        h[(t * _GOLDEN) % dim] += 1.0
    for a, b in itertools.pairwise(ids):
        h[((a * 1_000_003 + b + 1) * _GOLDEN) % dim] += 1.0
    return _unit(np.sqrt(h))


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)


class Router:
    """Explicit tag, else (or always, ``mode="learned"``) the learned rule; see the module
    docstring."""

    def __init__(
        self,
        adapters: Sequence[str],
        mode: str = "tag",
        dim: int = 256,
        explore: float = 0.05,
        prior: float = 1.0,
        home: float = 0.1,
        warmup: int = 30,
        rate: float = 0.1,
    ) -> None:
        adapters = list(adapters)
        if not adapters or len(set(adapters)) != len(adapters):
            raise ValueError(f"a router needs distinct adapter names, got {adapters}")
        if mode not in ROUTER_MODES:
            raise ValueError(f"router mode {mode!r}: choose from {', '.join(ROUTER_MODES)}")
        if not isinstance(dim, int) or dim < 1 or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"router dim and warmup must be ints >= 1, got {dim!r}, {warmup!r}")
        if not (explore >= 0 and home >= 0 and 0 < rate <= 1):
            raise ValueError(f"router explore, home must be >= 0, rate in (0, 1]: {rate!r}")
        self.adapters, self.mode, self.dim = adapters, mode, dim
        self.explore, self.prior, self.home = float(explore), float(prior), float(home)
        self.warmup, self.rate = warmup, float(rate)
        n = len(adapters)
        self.centroids = np.zeros((0, dim))  # [c, dim], c <= n clusters (unit vectors)
        self.center = np.zeros(dim)  # the mean feature of the warm-up prompts
        self._seen: list[np.ndarray] = []  # the first `warmup` prompts' features
        self.sizes = np.zeros(n, dtype=int)  # prompts per cluster
        self.mean = np.zeros((n, n))  # [cluster, adapter] mean α
        self.tries = np.zeros((n, n), dtype=int)  # [cluster, adapter] requests with feedback
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

    def cluster(self, x: np.ndarray) -> int:
        """The nearest centroid (cosine) of feature ``x``, centred."""
        return int(np.argmax(self.centroids @ _unit(x - self.center)))

    def scores(self, j: int) -> dict[str, float]:
        """Per adapter, its score in cluster ``j`` (the route takes the largest)."""
        out = {}
        for i, a in enumerate(self.adapters):
            n = self.tries[j, i]
            est = self.mean[j, i] if n else self.prior
            out[a] = est + self.explore / np.sqrt(1 + n) + (self.home if i == j else 0.0)
        return out

    def route(self, tokens: Sequence[int] | np.ndarray, tag: str | None = None) -> str:
        """The adapter for a prompt (token ids, or its :meth:`features`)."""
        self.check(tag)
        x = self._x(tokens)
        j = self._observe(x)
        if self.mode == "tag" and tag is not None:
            choice = tag
        else:
            scores = self.scores(j)
            choice = max(self.adapters, key=scores.get)
        self.routed[choice] += 1
        return choice

    def update(self, tokens: Sequence[int] | np.ndarray, adapter: str, alpha: float) -> None:
        """Adapter ``adapter`` drafted a prompt and got acceptance rate ``alpha``."""
        if adapter not in self.routed:
            raise ValueError(f"unknown adapter {adapter!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        x = self._x(tokens)
        if not len(self.centroids):
            self._observe(x)
        j, i = self.cluster(x), self.adapters.index(adapter)
        self.tries[j, i] += 1
        step = max(1.0 / self.tries[j, i], self.rate)  # the mean, then an exponential average
        self.mean[j, i] += step * (alpha - self.mean[j, i])
        self.updates += 1

    def _observe(self, x: np.ndarray) -> int:
        """Warm-up: k-means over the prompts so far; then move the nearest centroid
        towards ``x`` (online k-means). Returns ``x``'s cluster."""
        if len(self._seen) < self.warmup:
            self._seen.append(x)
            self.center = np.mean(self._seen, axis=0)
            z = _unit(np.stack(self._seen) - self.center)  # [m, dim]
            c = self.centroids
            if len(c) < len(self.adapters):  # seed: first prompt, then the least like any
                seeds = [0]
                while len(seeds) < min(len(self.adapters), len(z)):
                    seeds.append(int(np.argmin((z[seeds] @ z.T).max(0))))
                c = z[seeds]
            for _ in range(10):  # Lloyd's iterations from the current centroids
                label = np.argmax(z @ c.T, axis=1)
                c = np.stack(
                    [
                        _unit(z[label == j].mean(0)) if (label == j).any() else c[j]
                        for j in range(len(c))
                    ]
                )
            self.centroids = c
            return self.cluster(x)
        j = self.cluster(x)
        self.sizes[j] += 1
        z = _unit(x - self.center)
        c = self.centroids[j] + max(1.0 / self.sizes[j], 0.02) * (z - self.centroids[j])
        self.centroids[j] = _unit(c)
        return j

    def _x(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(tokens, np.ndarray) and tokens.shape == (self.dim,):
            return tokens
        return self.features(tokens)

    def summary(self) -> dict:
        return {"mode": self.mode, "routed": dict(self.routed), "updates": self.updates}
