"""The post-swap watch: a version that passed the gate but serves worse is rolled back.

The gate scores a candidate on held-out records offline; what counts is acceptance on live
traffic after the swap (drafts can collapse after a weight update that looked fine). The
watch counts, per version, the draft tokens proposed and accepted on live requests
(:meth:`PostSwapWatch.observe`, fed from the records replicas log: each carries the
version that served it and, in ``meta``, its ``proposed`` / ``accepted`` counts). After a
promotion (:meth:`PostSwapWatch.start`) it waits for ``min_tokens`` proposed tokens of the
new version, then compares its acceptance rate α with the previous version's (measured
while that one was live): α fell by more than ``margin`` (absolute) → roll back. Either way
the verdict is final for that promotion; :class:`~osd.registry.Promoter` records it in the
registry's history (a rollback ``by="post-swap watch"``).

Worked example::

    >>> w = PostSwapWatch(margin=0.1, min_tokens=100)
    >>> w.observe(1, proposed=400, accepted=240)   # v1 live: α 0.60
    >>> w.start(2, previous=1)
    >>> w.observe(2, proposed=50, accepted=10)
    >>> w.check(live=2) is None                     # not enough evidence yet
    True
    >>> w.observe(2, proposed=50, accepted=10)
    >>> v = w.check(live=2); v.rollback, round(v.live_alpha, 2), round(v.previous_alpha, 2)
    (True, 0.2, 0.6)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PostSwapWatch", "WatchVerdict"]


@dataclass(frozen=True)
class WatchVerdict:
    """The watch's decision about one promotion."""

    version: int
    previous: int
    rollback: bool
    live_alpha: float
    previous_alpha: float | None  # None: no baseline measured for the previous version
    live_tokens: int
    previous_tokens: int
    margin: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PostSwapWatch:
    """Per-version live acceptance and the verdict on the latest promotion."""

    def __init__(self, margin: float = 0.05, min_tokens: int = 256, max_versions: int = 16):
        if not 0 <= margin < 1:
            raise ValueError(f"watch margin must be in [0, 1), got {margin!r}")
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
            raise ValueError(f"watch min_tokens must be an int >= 1, got {min_tokens!r}")
        self.margin = float(margin)
        self.min_tokens = min_tokens
        self.max_versions = max_versions
        self._counts: OrderedDict[int, list[int]] = OrderedDict()  # version → [proposed, acc]
        self.watching: tuple[int, int] | None = None  # (version, previous)

    def observe(self, version: int, proposed: int, accepted: int) -> None:
        if proposed <= 0 or accepted < 0 or accepted > proposed:
            return
        row = self._counts.setdefault(int(version), [0, 0])
        row[0] += int(proposed)
        row[1] += int(accepted)
        self._counts.move_to_end(int(version))
        while len(self._counts) > self.max_versions:
            self._counts.popitem(last=False)

    def alpha(self, version: int) -> tuple[float | None, int]:
        proposed, accepted = self._counts.get(version, (0, 0))
        return (accepted / proposed if proposed else None), proposed

    def start(self, version: int, previous: int) -> None:
        """Watch ``version``, just promoted over ``previous``."""
        self._counts.pop(version, None)  # only traffic served after it went live counts
        self.watching = (version, previous)

    def reset(self) -> None:
        """Forget everything (a new registry epoch: version numbers start over)."""
        self._counts.clear()
        self.watching = None

    def check(self, live: int) -> WatchVerdict | None:
        """The verdict once there is enough evidence, else ``None``; final per promotion.
        A watched version that is no longer live (rolled back, superseded) is dropped."""
        if self.watching is None:
            return None
        version, previous = self.watching
        if live != version:
            self.watching = None
            return None
        live_alpha, live_tokens = self.alpha(version)
        prev_alpha, prev_tokens = self.alpha(previous)
        if live_alpha is None or live_tokens < self.min_tokens:
            return None
        if prev_alpha is None or prev_tokens < self.min_tokens:
            if live_tokens < 4 * self.min_tokens:  # the baseline may still be arriving
                return None
            self.watching = None
            reason = f"no baseline: v{previous} served {prev_tokens} draft tokens; kept"
            return WatchVerdict(
                version, previous, False, live_alpha, prev_alpha, live_tokens, prev_tokens,
                self.margin, reason,
            )  # fmt: skip
        self.watching = None
        fell = prev_alpha - live_alpha
        rollback = fell > self.margin
        reason = (
            f"live acceptance of v{version} {live_alpha:.3f} vs v{previous} {prev_alpha:.3f} "
            f"({live_tokens} / {prev_tokens} draft tokens): "
            + (f"fell {fell:.3f} > margin {self.margin}" if rollback else "kept")
        )
        return WatchVerdict(
            version, previous, rollback, live_alpha, prev_alpha, live_tokens, prev_tokens,
            self.margin, reason,
        )  # fmt: skip
