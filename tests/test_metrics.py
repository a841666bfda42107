"""osd.metrics: pooled α and α per window, the one definition osd online and the replay use."""

import doctest

import pytest
from osd.actors.replay import ReplayRecord, windows

import osd.metrics
from osd.metrics import alpha_windows, pooled_alpha
from osd.online import OnlineConfig, OnlineResult, RequestLog


def test_doctests():
    assert doctest.testmod(osd.metrics).failed == 0


def test_windows_are_pooled_and_take_the_first_seen_domain_on_ties():
    counts = [(2, 10), (8, 30), (5, 10), (0, 0)]
    rows = [RequestLog(i, d, 0, 0.0, 0.0, p, a, p, 0) for i, ((a, p), d) in
            enumerate(zip(counts, ["sql", "math", "math", "sql"], strict=True))]  # fmt: skip
    online = lambda r: (r.accepted_online, r.proposed_online)  # noqa: E731
    wins = alpha_windows(rows, 2, online)
    assert [(w.start, w.domain, w.alpha) for w in wins] == [(0, "sql", 0.25), (2, "math", 0.5)]
    assert pooled_alpha(rows[3:], online) is None
    with pytest.raises(ValueError, match="window size"):
        alpha_windows(rows, 0)

    # osd online and the replay driver report the same α per window for the same counts
    result = OnlineResult(OnlineConfig(window=2), requests=rows)
    assert [w["alpha_online"] for w in result.windows()] == [0.25, 0.5]
    assert [w["alpha_frozen"] for w in result.windows()] == [0.0, 0.0]  # nothing accepted
    replayed = [ReplayRecord(r.index, r.domain, None, 0.0, 0.1, 200, proposed=p, accepted=a)
                for r, (a, p) in zip(rows, counts, strict=True)]  # fmt: skip
    assert [w["alpha"] for w in windows(replayed, 2)] == [0.25, 0.5]
    assert [w["domain"] for w in windows(replayed, 2)] == ["sql", "math"]
