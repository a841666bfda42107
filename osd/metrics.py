"""Acceptance over sets of requests (DESIGN §7): pooled α, and α per window of requests.

α over a set of requests is **pooled**: Σ accepted ÷ Σ proposed draft tokens, not the mean
of per-request ratios (a request that proposed 30 tokens weighs three times one that
proposed 10). A **window** is ``size`` consecutive requests in index order; its domain is
the most common one in it (the first seen on ties). ``osd online`` and the replay driver
(``actors/replay.py``) both report α per window through :func:`alpha_windows`.

Worked example (three requests, windows of two)::

    >>> from types import SimpleNamespace as R
    >>> rows = [R(domain="math", accepted=2, proposed=10),
    ...         R(domain="math", accepted=8, proposed=30),
    ...         R(domain="sql", accepted=5, proposed=10)]
    >>> pooled_alpha(rows[:2])  # (2 + 8) / (10 + 30), not (0.2 + 0.27) / 2
    0.25
    >>> [(w.start, w.domain, w.alpha, len(w.rows)) for w in alpha_windows(rows, 2)]
    [(0, 'math', 0.25, 2), (2, 'sql', 0.5, 1)]
    >>> pooled_alpha([]) is None  # nothing proposed: no α
    True
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["Window", "accepted_proposed", "alpha_windows", "pooled_alpha", "time_to_recover"]

T = TypeVar("T")
Counts = Callable[[Any], tuple[int, int]]


def accepted_proposed(row: Any) -> tuple[int, int]:
    """The default counts of a row: its ``accepted`` and ``proposed`` attributes."""
    return row.accepted, row.proposed


def pooled_alpha(rows: Iterable[T], counts: Counts = accepted_proposed) -> float | None:
    """Σ accepted ÷ Σ proposed over ``rows`` (``counts(row) -> (accepted, proposed)``);
    ``None`` when nothing was proposed."""
    accepted = proposed = 0
    for row in rows:
        a, p = counts(row)
        accepted += a
        proposed += p
    return accepted / proposed if proposed else None


@dataclass(frozen=True)
class Window(Generic[T]):
    """``size`` consecutive requests (fewer in the last window)."""

    start: int  # index of the first row
    rows: Sequence[T]
    domain: str | None  # the most common domain, the first seen on ties
    alpha: float | None  # pooled over the rows


def alpha_windows(
    rows: Sequence[T], size: int, counts: Counts = accepted_proposed
) -> list[Window[T]]:
    """α per window of ``size`` rows, in order; callers add their own per-window figures
    from :attr:`Window.rows` (latency, version, a second drafter's α …)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"window size must be an int >= 1, got {size!r}")
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        domains = Counter(getattr(r, "domain", None) for r in chunk)
        out.append(Window(start, chunk, domains.most_common(1)[0][0], pooled_alpha(chunk, counts)))
    return out


def time_to_recover(
    rows: Sequence[T],
    shift: int,
    counts: Counts = accepted_proposed,
    window: int = 20,
    before: int = 30,
    tol: float = 0.05,
) -> int | None:
    """Requests after a shift (at row ``shift``) until α is back within ``tol`` of its
    pre-shift level: the pooled α of the ``before`` rows before the shift against that of
    a trailing ``window`` of post-shift rows; the answer counts the whole window, so
    ``window`` is the fastest recovery it can see. ``None``: never within ``rows`` (or no
    α before the shift).

    >>> from types import SimpleNamespace as R
    >>> rows = [R(accepted=a, proposed=10) for a in [8] * 4 + [2, 3, 5, 7, 8, 8]]
    >>> time_to_recover(rows, shift=4, window=2, before=4)  # rows 7-8: α 0.75 >= 0.8 - 0.05
    5
    >>> time_to_recover(rows[:7], shift=4, window=2, before=4) is None
    True
    """
    pre = pooled_alpha(rows[max(0, shift - before) : shift], counts)
    if pre is None:
        return None
    for end in range(shift + window, len(rows) + 1):
        a = pooled_alpha(rows[end - window : end], counts)
        if a is not None and a >= pre - tol:
            return end - shift
    return None
