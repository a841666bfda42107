import random

import pytest

from osd.specdec.controller import SpeculationController, expected_tokens
from osd.specdec.ledger import Ledger


def test_expected_tokens():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 1) == pytest.approx(1.5)


def simulate(
    alpha: float, c_draft: float, v0: float, v1: float, steps: int = 400, seed: int = 0
) -> SpeculationController:
    """Drive the controller with a fake ledger whose costs follow the given model."""
    rng = random.Random(seed)
    ctl, ledger = SpeculationController(k_max=8), Ledger()
    for _ in range(steps):
        k = ctl.depth()
        accepted = 0
        while accepted < k and rng.random() < alpha:
            accepted += 1
        ledger.seconds["propose"] += k * c_draft / 1000
        ledger.seconds["verify"] += (v0 + v1 * k) / 1000
        ctl.observe(k, accepted, ledger)
    return ctl


def test_worked_example_from_the_docstring_picks_k4():
    ctl = simulate(alpha=0.8, c_draft=1.0, v0=6.0, v1=0.25)
    assert ctl.alpha == pytest.approx(0.8, abs=0.06)
    c_draft, v0, v1 = ctl.costs()
    assert c_draft == pytest.approx(1.0, rel=1e-6)
    assert v0 == pytest.approx(6.0, rel=0.05) and v1 == pytest.approx(0.25, rel=0.2)
    assert ctl.best_k() in (3, 4, 5)


def test_high_acceptance_and_cheap_draft_drafts_long():
    assert simulate(alpha=0.95, c_draft=0.2, v0=6.0, v1=0.1).best_k() == 8


def test_low_acceptance_or_expensive_draft_drafts_short_or_not_at_all():
    assert simulate(alpha=0.2, c_draft=1.0, v0=6.0, v1=0.25).best_k() <= 1
    assert simulate(alpha=0.6, c_draft=5.0, v0=6.0, v1=0.25).best_k() == 0


def test_follows_drift_in_acceptance():
    ctl = simulate(alpha=0.95, c_draft=0.5, v0=6.0, v1=0.1)
    assert ctl.best_k() >= 6
    ledger = Ledger()
    ledger.seconds.update(ctl._last)
    for _ in range(400):  # acceptance collapses
        k = ctl.depth()
        ledger.seconds["propose"] += k * 0.5 / 1000
        ledger.seconds["verify"] += (6.0 + 0.1 * k) / 1000
        ctl.observe(k, 0, ledger)
    assert ctl.alpha < 0.1 and ctl.best_k() <= 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="k_min"):
        SpeculationController(k_min=-1)
    with pytest.raises(ValueError, match="k_min"):
        SpeculationController(k_min=3, k_max=2)
    with pytest.raises(ValueError, match="alpha_prior"):
        SpeculationController(alpha_prior=1.0)


class _Step:
    """What the controller reads of a StepResult."""

    def __init__(self, depth: int, accepted: int) -> None:
        self.proposed_depth, self.accepted = depth, accepted
        self.tree = type("T", (), {"size": depth})()


def simulate_load(batch: int, alpha: float = 0.33, steps: int = 400) -> SpeculationController:
    """A synthetic ledger where verification is compute-bound: its cost grows with the
    tokens verified (B · (k + 1)) on top of a fixed launch cost, drafting with the batch."""
    rng = random.Random(batch)
    ctl, ledger = SpeculationController(k_max=6), Ledger()
    for _ in range(steps):
        k = ctl.depth(batch)
        accepted = []
        for _ in range(batch):
            a = 0
            while a < k and rng.random() < alpha:
                a += 1
            accepted.append(a)
        ledger.seconds["propose"] += k * (1.0 + 0.05 * batch) / 1000
        ledger.seconds["verify"] += (5.75 + 0.25 * batch * (k + 1)) / 1000
        ctl.on_batch([None] * batch, [_Step(k, a) for a in accepted], ledger)
    return ctl


def test_load_aware_switches_speculation_off_when_verification_grows_with_the_batch():
    """The same acceptance and costs: speculate at batch 1, not at batch 32."""
    assert simulate_load(1, alpha=0.8).best_k(1) >= 3
    big = simulate_load(32, alpha=0.33)
    assert big.best_k(32) == 0
    assert big.goodput(0, 32) > big.goodput(4, 32)
    _, v0, v1 = big.costs(32)
    assert v0 == pytest.approx(5.75 + 0.25 * 32, rel=0.1) and v1 == pytest.approx(8.0, rel=0.2)


def test_exploration_backs_off_in_a_settled_regime_and_restarts_when_it_moves():
    """At batch 32 with speculation off, exploring a neighbour every 16 steps was the whole
    gap to plain decoding (issue 11); the gap doubles while the best depth stays put."""
    big = simulate_load(32, alpha=0.33, steps=1000)
    assert big.best_k(32) == 0
    # 16, 32, 64, 128, 256, 256, 256 (each from depth 0: two steps): not 1000 / 16 = 62
    assert big.explored <= 16
    ctl = SpeculationController(k_max=6)
    ctl._explored_best, ctl._gap = 0, 128  # settled at depth 0 ...
    ctl._next = 1
    ctl.best_k = lambda batch=1: 3  # ... then the best depth moves
    ctl.depth()
    assert ctl._gap == ctl.explore_every  # exploring often again


def test_prices_depths_by_the_padded_rows_the_engine_runs():
    """With the engine's row padding (2–5 tokens verified as 5 rows, one cost), depth 3–4
    costs one padded verification, not 3–4 times depth 1's extra: the controller that knows
    the padding fits its line over the rows run and drafts deep."""

    def run(rows) -> SpeculationController:
        rng = random.Random(0)
        ctl, ledger = SpeculationController(k_max=4), Ledger()
        ctl.rows = rows
        for _ in range(600):
            k = ctl.depth()
            accepted = 0
            while accepted < k and rng.random() < 0.8:
                accepted += 1
            ledger.seconds["propose"] += k * 1.3 / 1000
            ledger.seconds["verify"] += (7.7 if k == 0 else 11.0) / 1000
            ctl.observe_batch(k, [accepted], k, ledger, ctl._verified(1, 1 + k) if rows else None)
        return ctl

    padded = run(lambda b, t: t if t == 1 else max(t, 5))
    assert padded.best_k() >= 3
    assert padded.goodput(padded.best_k()) > 1.05 * padded.goodput(0)
    _, _, a, b, _ = padded._lines()  # the line through (1 row, 7.7 ms) and (5 rows, 11 ms)
    assert a + b == pytest.approx(7.7, abs=0.3) and a + 5 * b == pytest.approx(11.0, abs=0.3)


def test_a_catch_up_after_plain_steps_is_not_priced_as_a_draft_level():
    """After steps that did not draft, the draft model catches up on every token since in
    its next propose; priced as a level's cost, an exploration from depth 0 found drafting
    20x too dear and the controller never drafted again, though acceptance had recovered
    (the adaptive chain stuck at depth 0 while the fixed k=4 chain ran 1.3x faster)."""
    rng = random.Random(0)
    ctl, ledger = SpeculationController(k_max=8), Ledger()
    since = 0  # tokens since the draft last ran
    for step in range(1500):
        alpha = 0.05 if step < 300 else 0.8  # acceptance collapses, then recovers
        k = ctl.depth()
        accepted = 0
        while accepted < k and rng.random() < alpha:
            accepted += 1
        catch_up = 0.2 * since if k else 0.0
        since = 0 if k else since + 1
        ledger.seconds["propose"] += (k * 1.0 + catch_up) / 1000
        ledger.seconds["verify"] += (6.0 + 0.25 * k) / 1000
        ctl.observe(k, accepted, ledger)
        if step == 299:
            assert ctl.best_k() == 0  # speculation off while nothing is accepted
    assert ctl.costs()[0] < 1.5  # ms per level: the level's cost, not the catch-up's
    assert ctl.best_k() >= 3
