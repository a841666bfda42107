"""Adaptive, load-aware speculation length (OSD's cost model, batched), for any drafter.

With per-position acceptance α (i.i.d. model), a chain of k draft tokens emits on average

    E[tokens](k) = (1 − α^(k+1)) / (1 − α)            (bonus included)

per sequence. A step of ``B`` sequences drafting depth ``k`` costs

    c(B, k) = k · (d0 + d1 · B)  +  a + b · N,        N = B · (1 + r · k)

— drafting is one draft forward per level (its cost grows with the batch), verification is
one target forward over the ``N`` tokens of every sequence's root and tree (``r`` = tree
nodes per level: 1 for a chain). The controller drafts the ``k`` in ``[k_min, k_max]`` that
maximises **goodput** ``B · E[tokens](k) / c(B, k)``, with ``k = 0`` (plain decoding, one
token per sequence for ``a + b · B``) allowed when ``k_min = 0``. The lines are fitted from
the ledger's measured stage times (exponentially decayed least squares, so they follow
drift and load); nothing is a fixed threshold. Why it matters: at batch 1 verification of
a few extra tokens is nearly free (``a`` dominates), so speculation pays; at a large batch
the target forward is compute-bound (``b · N`` dominates), verifying ``k + 1`` tokens per
sequence costs ~``k + 1`` times plain decoding, and speculation is switched off or
shortened — users of other engines report speculation slowing them down under load.

Worked example (chain, ``a = 5.75``, ``b = 0.25``, ``d0 = 1``, ``d1 = 0.05`` ms): at batch 1
with α = 0.8, tokens/ms are 0.167 (k=0), 0.248 (k=1), 0.303 (k=3), 0.306 (k=4), 0.301 (k=5),
0.271 (k=8) → k = 4; at batch 32 they are 2.33 (k=0), 2.37 (k=1), 2.23 (k=2), 1.92 (k=4)
→ k = 1; and with α = 0.33 at batch 32: 2.33 (k=0), 1.75 (k=1) → speculation off.

Row padding. The engine runs a verification at the cheapest row count at least the one it
needs (:mod:`osd.specdec.rowcost`: on a CPU 2–4 rows cost more than 5–6), so it gives the
controller its padding (``rows(B, t)``, set by ``SpeculativeDecoder``) and ``N`` counts the
rows actually run, ``B · rows(B, 1 + r · k)``: depths 1–4 then cost one verification of 5–6
rows each, and a line fitted through depth 0 and depth 1 no longer prices depth 4 as four
times depth 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from osd.specdec.ledger import Ledger


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per step for a k-chain under i.i.d. acceptance α (bonus token included)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


@dataclass
class _Decayed:
    """Exponentially decayed sums for a running mean and a 1-D least-squares line."""

    decay: float
    n: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.n = d * self.n + 1
        self.sx = d * self.sx + x
        self.sy = d * self.sy + y
        self.sxx = d * self.sxx + x * x
        self.sxy = d * self.sxy + x * y

    def mean(self, default: float) -> float:
        return self.sy / self.n if self.n else default

    def line(self, default: tuple[float, float]) -> tuple[float, float]:
        """(intercept, slope) of y over x; the mean with zero slope if x never varied."""
        if self.n < 2:
            return default
        var = self.sxx / self.n - (self.sx / self.n) ** 2
        if var < 1e-9:
            return self.mean(default[0]) - default[1] * self.sx / self.n, default[1]
        slope = max(0.0, (self.sxy / self.n - self.sx * self.sy / self.n**2) / var)
        return self.sy / self.n - slope * self.sx / self.n, slope


class SpeculationController:
    """Chooses the draft depth of each engine step from measured costs, acceptance and the
    batch size (module docstring). An engine step observer: ``SpeculativeDecoder(controller=
    ...)`` registers it; the engine asks :meth:`depth` with the batch size before a step and
    reports the step with :meth:`on_batch`."""

    wants_logits = False
    wants_hidden = False

    def __init__(
        self,
        k_min: int = 0,
        k_max: int = 8,
        alpha_prior: float = 0.6,
        decay: float = 0.98,
        explore_every: int = 16,
        explore_max: int = 256,
    ) -> None:
        if not 0 <= k_min <= k_max or k_max < 1:
            raise ValueError(f"need 0 ≤ k_min ≤ k_max, k_max ≥ 1; got k_min={k_min}, k_max={k_max}")
        if not 0 < alpha_prior < 1:
            raise ValueError(f"alpha_prior must be in (0, 1), got {alpha_prior}")
        self.k_min, self.k_max = k_min, k_max
        self.explore_every = explore_every
        self.explore_max = max(explore_every, explore_max)
        self._gap = explore_every  # steps until the next exploration (backs off)
        self._next = explore_every
        self._explored_best: int | None = None
        self._again: int | None = None  # an exploration from depth 0: its depth, drafted again
        self.explored = 0  # steps that drafted a neighbour of the best depth
        self._drafted = False  # did the last observed step draft?
        self._acc = _Decayed(decay)  # y = accepted per sequence step
        self._trials = _Decayed(decay)  # y = positions reached
        self._draft = _Decayed(decay)  # ms per draft level vs batch size
        self._verify = _Decayed(decay)  # ms per verification vs tokens verified
        self._ratio = _Decayed(decay)  # tree nodes per level
        self._alpha_prior = alpha_prior
        self._last: dict[str, float] = {}
        self._steps = 0
        self.k = min(max(4, k_min), k_max)
        self.batch = 1  # the batch size of the last depth() call
        # the engine's row padding: t tokens per sequence at batch B run rows(B, t) rows each
        self.rows: Callable[[int, int], int] | None = None

    def _verified(self, batch: int, per_seq: float) -> float:
        """Tokens (rows) a verification of ``per_seq`` tokens per sequence runs."""
        if self.rows is None:
            return batch * per_seq
        return float(batch * self.rows(batch, max(1, math.ceil(per_seq - 1e-9))))

    @property
    def alpha(self) -> float:
        """Decayed accepted ÷ reached draft positions (prior until data arrives)."""
        if self._trials.sy <= 0:
            return self._alpha_prior
        return min(self._acc.sy / self._trials.sy, 0.999)

    def _lines(self) -> tuple[float, float, float, float, float]:
        """(d0, d1, a, b, r): ms per draft level = d0 + d1·B, ms per verify = a + b·N."""
        d0, d1 = self._draft.line((1.0, 0.0))
        a, b = self._verify.line((4.0 * d0, 0.0))
        r = self._ratio.mean(1.0)
        return d0, d1, a, b, r

    def costs(self, batch: int = 1) -> tuple[float, float, float]:
        """At ``batch``: (ms per draft level, verify intercept ms, verify ms per draft level)
        — i.e. a step of depth k costs ``k · c_draft + v0 + v1 · k``."""
        d0, d1, a, b, r = self._lines()
        return d0 + d1 * batch, a + b * batch, b * batch * r

    def goodput(self, k: int, batch: int = 1) -> float:
        """Expected tokens per ms over the batch when drafting depth ``k``."""
        d0, d1, a, b, r = self._lines()
        cost = k * (d0 + d1 * batch) + a + b * self._verified(batch, 1 + r * k)
        return batch * expected_tokens(self.alpha, k) / max(cost, 1e-9)

    def best_k(self, batch: int = 1) -> int:
        rate = {k: self.goodput(k, batch) for k in range(self.k_min, self.k_max + 1)}
        return max(rate, key=rate.get)

    def depth(self, batch: int = 1) -> int:
        """The depth to draft this step, for ``batch`` sequences."""
        self._steps += 1
        self.batch = batch
        if self._again is not None:  # an exploration's second step
            self.k, self._again = self._again, None
            self.explored += 1
            return self.k
        best = self.best_k(batch)
        # now and then try a neighbour so the cost lines see more than one point; back off
        # (double the gap, up to explore_max) while each exploration finds the same best
        # depth — a settled regime, where an explored step is pure cost (at batch 32 one
        # speculating step verifies 2–5 tokens per sequence and the draft catches up on
        # everything since it last ran) — and start over when the best depth moves
        if self.explore_every and self._steps >= self._next:
            same = best == self._explored_best
            self._gap = min(2 * self._gap, self.explore_max) if same else self.explore_every
            self._explored_best = best
            self._next = self._steps + self._gap
            best = min(self.k_max, best + 1) if best < self.k_max else best - 1
            self.explored += 1
            if self._drafted != (best > 0):  # from depth 0 or to it: two steps (see below)
                self._again = max(self.k_min, best)
        self.k = max(self.k_min, best)
        return self.k

    # -- observing ---------------------------------------------------------------------
    def on_step(self, state, step, ledger: Ledger) -> None:
        """Per sequence: nothing (the step is observed once, in :meth:`on_batch`)."""

    def on_release(self, state) -> None:
        pass

    def on_batch(self, states: Sequence, steps: Sequence, ledger: Ledger) -> None:
        """One engine step of ``len(steps)`` sequences."""
        depth = max((s.proposed_depth for s in steps), default=0)
        nodes = sum(s.tree.size for s in steps)
        widest = 1 + max((s.tree.size for s in steps), default=0)
        ran = None if self.rows is None else self._verified(len(steps), widest)
        self.observe_batch(depth, [s.accepted for s in steps], nodes, ledger, ran)

    def observe(self, depth: int, accepted: int, ledger: Ledger) -> None:
        """One batch-1 chain step (kept for callers that step one sequence)."""
        self.observe_batch(depth, [accepted], depth, ledger)

    def observe_batch(
        self,
        depth: int,
        accepted: Sequence[int],
        nodes: int,
        ledger: Ledger,
        verified: float | None = None,
    ) -> None:
        """Feed one step: its depth, each sequence's accepted count, the tree nodes over the
        batch (``verified``: the rows the verification ran, when padded); stage times are
        read as deltas of ``ledger``."""
        dt = {s: ledger.seconds.get(s, 0.0) - self._last.get(s, 0.0) for s in ("propose", "verify")}
        self._last = {s: ledger.seconds.get(s, 0.0) for s in ("propose", "verify")}
        batch = len(accepted)
        if batch == 0:
            return
        self._verify.add(
            float(batch + nodes if verified is None else verified), 1000 * dt["verify"]
        )
        drafted_before, self._drafted = self._drafted, depth > 0
        if depth <= 0:
            return
        # after steps that did not draft, the draft's catch-up over every token since is in
        # this step's propose time: not the cost of a level (a controller that priced it so
        # would find drafting too dear at every exploration from depth 0, and stay there);
        # an exploration from depth 0 therefore drafts two steps, the second one measured
        if drafted_before:
            self._draft.add(float(batch), 1000 * dt["propose"] / depth)
        self._ratio.add(0.0, nodes / (batch * depth))
        for acc in accepted:
            self._acc.add(0.0, float(acc))
            self._trials.add(0.0, float(min(acc + 1, depth)))
