"""Adaptive speculation length (OSD's cost model), for any chain drafter.

With per-position acceptance α (i.i.d. model), a chain of k draft tokens emits on average

    E[tokens](k) = (1 − α^(k+1)) / (1 − α)            (bonus included)

and a step costs ``k · c_draft + c_verify(k)``, with ``c_verify(k) ≈ v0 + v1 · k`` fitted from
the measured verification times. The controller drafts the k in ``[k_min, k_max]`` that
maximises expected tokens per second, re-estimating α and the costs as it goes
(exponentially decayed, so it follows drift).

Worked example: α = 0.8, c_draft = 1 ms, c_verify(k) = 6 + 0.25·k ms gives tokens/ms
0.248 (k=1), 0.303 (k=3), 0.305 (k=4), 0.301 (k=5), 0.271 (k=8) → k = 4.
"""

from __future__ import annotations

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
    """Chooses the draft depth before each step from measured costs and acceptance.

    A step observer of the engine (``SpeculativeDecoder(controller=...)`` registers it).
    """

    wants_logits = False
    wants_hidden = False

    def __init__(
        self,
        k_min: int = 1,
        k_max: int = 8,
        alpha_prior: float = 0.6,
        decay: float = 0.98,
        explore_every: int = 16,
    ) -> None:
        if not 1 <= k_min <= k_max:
            raise ValueError(f"need 1 ≤ k_min ≤ k_max, got k_min={k_min}, k_max={k_max}")
        if not 0 < alpha_prior < 1:
            raise ValueError(f"alpha_prior must be in (0, 1), got {alpha_prior}")
        self.k_min, self.k_max = k_min, k_max
        self.explore_every = explore_every
        self._acc = _Decayed(decay)  # x unused; y = accepted, n via weights below
        self._trials = _Decayed(decay)
        self._draft = _Decayed(decay)  # ms per drafted token
        self._verify = _Decayed(decay)  # ms per verify vs k
        self._alpha_prior = alpha_prior
        self._last: dict[str, float] = {}
        self._steps = 0
        self.k = min(max(4, k_min), k_max)

    @property
    def alpha(self) -> float:
        """Decayed accepted ÷ reached draft positions (prior until data arrives)."""
        if self._trials.sy <= 0:
            return self._alpha_prior
        return min(self._acc.sy / self._trials.sy, 0.999)

    def costs(self) -> tuple[float, float, float]:
        """(ms per draft token, verify intercept ms, verify slope ms per token)."""
        c_draft = self._draft.mean(1.0)
        v0, v1 = self._verify.line((c_draft * 4, 0.0))
        return c_draft, v0, v1

    def best_k(self) -> int:
        alpha = self.alpha
        c_draft, v0, v1 = self.costs()
        rate = {
            k: expected_tokens(alpha, k) / (k * c_draft + v0 + v1 * k)
            for k in range(self.k_min, self.k_max + 1)
        }
        return max(rate, key=rate.get)

    def depth(self) -> int:
        self._steps += 1
        best = self.best_k()
        # now and then try a neighbour so the verify-cost line sees more than one k
        if self.explore_every and self._steps % self.explore_every == 0:
            best = min(self.k_max, best + 1) if best < self.k_max else best - 1
        self.k = max(self.k_min, best)
        return self.k

    def on_step(self, state, step, ledger: Ledger) -> None:
        self.observe(step.proposed_depth, step.accepted, ledger)

    def on_release(self, state) -> None:
        pass

    def observe(self, depth: int, accepted: int, ledger: Ledger) -> None:
        """Feed one step's outcome; stage times are read as deltas of ``ledger``."""
        dt = {s: ledger.seconds.get(s, 0.0) - self._last.get(s, 0.0) for s in ("propose", "verify")}
        self._last = {s: ledger.seconds.get(s, 0.0) for s in ("propose", "verify")}
        if depth <= 0:
            return
        reached = min(accepted + 1, depth)
        self._acc.add(0.0, float(accepted))
        self._trials.add(0.0, float(reached))
        self._draft.add(float(depth), 1000 * dt["propose"] / depth)
        self._verify.add(float(depth), 1000 * dt["verify"])
