"""Tests for osd.workloads: the real-domain loaders and the replay schedules."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy import stats

from osd.workloads import (
    DEFAULT_DRIFT_SPEC,
    DOMAINS,
    Bursts,
    ClosedLoop,
    Drift,
    Gradual,
    Poisson,
    Query,
    Schedule,
    Stationary,
    Switch,
    load_domain,
    parse_schedule,
)

# ------------------------------------------------------------------------------ loaders


@pytest.mark.parametrize("domain", DOMAINS)
def test_domain_loads_with_nonempty_prompts(data_dir, domain):
    queries = load_domain(domain, "eval", data_dir)
    assert queries, f"{domain}: empty eval split"
    assert all(q.domain == domain for q in queries)
    assert all(q.prompt.strip() for q in queries), f"{domain}: a query has an empty prompt"
    assert all(q.id.startswith(f"{domain}/") for q in queries)


@pytest.mark.parametrize("domain", DOMAINS)
def test_splits_partition_all_by_id(data_dir, domain):
    train = load_domain(domain, "train", data_dir)
    eval_ = load_domain(domain, "eval", data_dir)
    every = load_domain(domain, "all", data_dir)
    train_ids, eval_ids = {q.id for q in train}, {q.id for q in eval_}
    assert len(train_ids) == len(train) and len(eval_ids) == len(eval_), "duplicate ids"
    assert not train_ids & eval_ids
    assert train_ids | eval_ids == {q.id for q in every}
    assert len(train) + len(eval_) == len(every)
    assert 0.05 <= len(eval_) / len(every) <= 0.15


@pytest.mark.parametrize("domain", DOMAINS)
def test_eval_prompts_not_seen_in_train(data_dir, domain):
    train_prompts = {q.prompt for q in load_domain(domain, "train", data_dir)}
    leaked = [q.id for q in load_domain(domain, "eval", data_dir) if q.prompt in train_prompts]
    assert not leaked, f"{domain}: {len(leaked)} eval prompts also in train, e.g. {leaked[:3]}"


def test_missing_data_dir_names_the_path(tmp_path):
    missing = tmp_path / "no-such-data"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_domain("math", "eval", missing)


def test_unknown_domain_and_split():
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        load_domain("poetry")
    with pytest.raises(ValueError, match="unknown split"):
        load_domain("math", "test")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- schedules


def _synthetic(per_domain: int = 50) -> dict[str, list[Query]]:
    return {
        d: [Query(f"{d}/{i}", d, f"{d} prompt {i}", f" ref {i}") for i in range(per_domain)]
        for d in DOMAINS
    }


QUERIES = _synthetic()


def test_stationary_matches_weights_chisquare():
    weights = {"math": 0.5, "sql": 0.3, "code": 0.2}
    reqs = Schedule(ClosedLoop(), Stationary(weights), n=20_000, seed=7).build(QUERIES)
    counts = Counter(r.domain for r in reqs)
    assert set(counts) == set(weights)
    observed = [counts[d] for d in weights]
    expected = [w * len(reqs) for w in weights.values()]
    assert stats.chisquare(observed, expected).pvalue > 0.001


def test_stationary_weights_need_not_sum_to_one():
    assert Stationary({"math": 1, "sql": 3}).probs(0) == {"math": 0.25, "sql": 0.75}


def test_switch_only_before_then_only_after():
    reqs = Schedule(ClosedLoop(), Switch("instruct", "math", 100), n=300, seed=1).build(QUERIES)
    assert {r.domain for r in reqs[:100]} == {"instruct"}
    assert {r.domain for r in reqs[100:]} == {"math"}
    assert all(r.time_s is None for r in reqs)
    assert [r.index for r in reqs] == list(range(300))


def test_gradual_probabilities_at_start_middle_end():
    mix = Gradual("prose", "code", begin=50, end_index=150)
    assert mix.probs(0) == mix.probs(50) == {"prose": 1.0}
    assert mix.probs(100) == pytest.approx({"prose": 0.5, "code": 0.5})
    assert mix.probs(75) == pytest.approx({"prose": 0.75, "code": 0.25})
    assert mix.probs(150) == mix.probs(10_000) == {"code": 1.0}


def test_gradual_between_mixes():
    mix = Gradual({"math": 1, "sql": 1}, "sql", begin=0, end_index=10)
    assert mix.probs(5) == pytest.approx({"math": 0.25, "sql": 0.75})


def test_drift_uneven_segments():
    reqs = Schedule(ClosedLoop(), Drift(("instruct", "math", "sql"), (100, 350)), 600, 3).build(
        QUERIES
    )
    domains = [r.domain for r in reqs]
    assert domains == ["instruct"] * 100 + ["math"] * 250 + ["sql"] * 250


def test_poisson_mean_and_exponential_gaps():
    rate = 4.0
    reqs = Schedule(Poisson(rate), Stationary({"math": 1}), n=20_000, seed=11).build(QUERIES)
    times = np.array([r.time_s for r in reqs])
    gaps = np.diff(times, prepend=0.0)
    assert np.all(gaps > 0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    assert stats.kstest(gaps, "expon", args=(0, 1 / rate)).pvalue > 0.001


def test_bursts_share_times_and_keep_mean_rate():
    rate, size = 4.0, 8
    reqs = Schedule(Bursts(rate, size), Stationary({"sql": 1}), n=20_000, seed=5).build(QUERIES)
    times = np.array([r.time_s for r in reqs]).reshape(-1, size)  # [bursts, size]
    assert np.all(times == times[:, :1]), "requests of one burst must share a time"
    starts = times[:, 0]
    assert np.all(np.diff(starts) > 0), "bursts must be at distinct, increasing times"
    assert len(reqs) / starts[-1] == pytest.approx(rate, rel=0.1)
    assert stats.kstest(np.diff(starts, prepend=0.0), "expon", args=(0, size / rate)).pvalue > 1e-3


def test_short_last_burst():
    reqs = Schedule(Bursts(2, 4), Stationary({"sql": 1}), n=10, seed=0).build(QUERIES)
    times = [r.time_s for r in reqs]
    assert len(set(times[:4])) == len(set(times[4:8])) == len(set(times[8:])) == 1
    assert len(set(times)) == 3


def test_same_seed_same_schedule_different_seed_differs():
    def build(seed: int):
        return parse_schedule("stationary:all|poisson:3", n=200, seed=seed).build(QUERIES)

    assert build(0) == build(0)
    assert [(r.domain, r.query.id) for r in build(0)] != [(r.domain, r.query.id) for r in build(1)]
    assert [r.time_s for r in build(0)] != [r.time_s for r in build(1)]


def test_arrival_process_does_not_change_requests():
    a = parse_schedule("stationary:all|closed", n=100, seed=4).build(QUERIES)
    b = parse_schedule("stationary:all|bursts:2x5", n=100, seed=4).build(QUERIES)
    assert [(r.domain, r.query) for r in a] == [(r.domain, r.query) for r in b]


def test_queries_cycle_through_permutation_without_early_repeats():
    queries = {"math": QUERIES["math"][:10]}
    reqs = Schedule(ClosedLoop(), Stationary({"math": 1}), n=25, seed=2).build(queries)
    ids = [r.query.id for r in reqs]
    assert len(set(ids[:10])) == len(set(ids[10:20])) == 10  # each pass is a permutation
    assert len(set(ids[20:])) == 5
    assert ids[:10] != sorted(ids[:10], key=lambda s: int(s.split("/")[1])), "not shuffled"


def test_missing_or_empty_domain_queries_raise():
    schedule = Schedule(ClosedLoop(), Switch("math", "sql", 5), n=10, seed=0)
    with pytest.raises(ValueError, match="'sql'"):
        schedule.build({"math": QUERIES["math"]})
    with pytest.raises(ValueError, match="no queries"):
        schedule.build({"math": QUERIES["math"], "sql": []})


def test_build_loads_real_eval_split(data_dir):
    reqs = parse_schedule("switch:instruct>sql@5", n=10, seed=0).build(data_dir=data_dir)
    eval_ids = {q.id for d in ("instruct", "sql") for q in load_domain(d, "eval", data_dir)}
    assert all(r.query.id in eval_ids for r in reqs)
    assert [r.domain for r in reqs] == ["instruct"] * 5 + ["sql"] * 5


# ---------------------------------------------------------------------------- spec parser

EXAMPLES = {
    "switch:instruct>math@100": Schedule(ClosedLoop(), Switch("instruct", "math", 100), 600, 0),
    "stationary:math=0.5,sql=0.5": Schedule(
        ClosedLoop(), Stationary({"math": 0.5, "sql": 0.5}), 600, 0
    ),
    "gradual:prose>code@50-150": Schedule(ClosedLoop(), Gradual("prose", "code", 50, 150), 600, 0),
    "drift:instruct,math,sql@200": Schedule(
        ClosedLoop(), Drift(("instruct", "math", "sql"), (200, 400)), 600, 0
    ),
    "drift:instruct@100,math@350,sql|poisson:4": Schedule(
        Poisson(4), Drift(("instruct", "math", "sql"), (100, 350)), 600, 0
    ),
    "switch:math=0.5,sql=0.5>code@100|bursts:4x8": Schedule(
        Bursts(4, 8), Switch({"math": 0.5, "sql": 0.5}, "code", 100), 600, 0
    ),
    "drift:math=1+sql=1@100,code|closed": Schedule(
        ClosedLoop(), Drift(({"math": 1, "sql": 1}, "code"), (100,)), 600, 0
    ),
    "math": Schedule(ClosedLoop(), Stationary("math"), 600, 0),
}


@pytest.mark.parametrize("spec", list(EXAMPLES))
def test_parse_schedule_examples_round_trip(spec):
    schedule = parse_schedule(spec, n=600, seed=0)
    assert schedule == EXAMPLES[spec]
    assert parse_schedule(schedule.spec(), n=600, seed=0) == schedule
    assert schedule.describe().startswith("600 requests: ")


def test_drift_forms_agree_and_default_spec():
    uniform = parse_schedule("drift:instruct,math,sql@200", 600, 0)
    explicit = parse_schedule("drift:instruct@200,math@400,sql", 600, 0)
    assert uniform == explicit == parse_schedule(DEFAULT_DRIFT_SPEC, 600, 0)
    assert uniform.mix.probs(199) == {"instruct": 1.0}
    assert uniform.mix.probs(400) == uniform.mix.probs(10_000) == {"sql": 1.0}


def test_describe():
    s = parse_schedule("drift:instruct@100,math@350,sql|poisson:4", n=600, seed=0)
    assert s.describe() == "600 requests: instruct → math@100 → sql@350; Poisson 4 req/s; seed 0"


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "poetry",
        "stationary:poetry=1",
        "stationary:math=-1",
        "stationary:math=0",
        "stationary:math=x",
        "switch:math>sql",
        "switch:math@10",
        "gradual:math>sql@10",
        "gradual:math>sql@10-5",
        "drift:math",
        "drift:math,sql",
        "drift:math@10,sql@20",
        "drift:math@20,sql@10,code",
        "drift:math@10,sql,code@5",
        "math|poisson:0",
        "math|poisson:-2",
        "math|bursts:4",
        "math|bursts:4x0",
        "math|uniform:3",
        "math|closed|poisson:1",
        "wobble:math",
    ],
)
def test_bad_specs_raise_with_example(spec):
    with pytest.raises(ValueError, match=r"bad schedule spec.*Valid specs: 'math'"):
        parse_schedule(spec, n=10, seed=0)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Poisson(0), "rate must be"),
        (lambda: Poisson(float("nan")), "rate must be"),
        (lambda: Bursts(-1, 4), "rate must be"),
        (lambda: Bursts(4, 0), "burst_size must be >= 1"),
        (lambda: Bursts(4, 2.5), "burst_size must be an integer"),
        (lambda: Stationary({}), "empty mix"),
        (lambda: Stationary({"math": 0.0}), "sum to 0"),
        (lambda: Stationary({"poetry": 1.0}), "unknown domain 'poetry'"),
        (lambda: Switch("math", "sql", -1), "Switch.at must be"),
        (lambda: Gradual("math", "sql", 10, 10), "must be > begin"),
        (lambda: Drift(("math", "sql"), (0,)), "Drift switch index"),
        (lambda: Drift(("math", "sql", "code"), (10,)), "need 2 switch indexes"),
        (lambda: Schedule(ClosedLoop(), Stationary("math"), n=0, seed=0), "Schedule.n"),
        (lambda: Schedule(ClosedLoop(), Stationary("math"), n=5, seed=-1), "Schedule.seed"),
        (lambda: Schedule("poisson", Stationary("math"), n=5, seed=0), "arrival must be"),
    ],
)
def test_bad_parameters_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()
