"""A step ledger: where decoding time goes, stage by stage.

>>> ledger = Ledger()
>>> with ledger.time("verify"):
...     pass
>>> ledger.counts["verify"]
1
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class Ledger:
    """Accumulated wall time and call count per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start
            self.counts[stage] += 1

    def merge(self, other: Ledger) -> None:
        for k, v in other.seconds.items():
            self.seconds[k] += v
            self.counts[k] += other.counts[k]

    def mean_ms(self, stage: str) -> float:
        return 1000 * self.seconds[stage] / self.counts[stage] if self.counts[stage] else 0.0

    def split(self) -> dict[str, float]:
        """Fraction of the total time per stage."""
        total = sum(self.seconds.values()) or 1.0
        return {k: v / total for k, v in self.seconds.items()}

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {
            k: {"seconds": self.seconds[k], "calls": self.counts[k], "mean_ms": self.mean_ms(k)}
            for k in self.seconds
        }
