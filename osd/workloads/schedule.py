"""Replay schedules: an arrival process × a domain mix over request indices, fully seeded.

A :class:`Schedule` turns ``(arrival, mix, n, seed)`` into ``n`` :class:`ScheduledRequest`
records. Request ``i`` gets

- an arrival time ``time_s`` from the arrival process (``None`` for a closed loop, where
  the driver sends the next request when the previous one finishes);
- a domain drawn from ``mix.probs(i)``;
- a query of that domain's *eval* split, walked in a seeded permutation (a fresh one
  each time the domain's queries are used up), so repeats are rare.

Three independent random streams are derived from the seed (arrivals, domains, and one
per domain for queries), so changing the arrival process leaves the sequence of domains
and queries unchanged, and the same seed always gives the identical schedule.

Worked example (the product owner's drift stream, Poisson arrivals at 4 requests/s)::

    >>> s = parse_schedule("drift:instruct@100,math@350,sql|poisson:4", n=600, seed=0)
    >>> s.describe()
    '600 requests: instruct → math@100 → sql@350; Poisson 4 req/s; seed 0'
    >>> s.mix.probs(99), s.mix.probs(100), s.mix.probs(599)
    ({'instruct': 1.0}, {'math': 1.0}, {'sql': 1.0})
    >>> reqs = s.build()            # loads the eval splits from the shared data
    >>> reqs[0].index, reqs[0].domain, reqs[100].domain
    (0, 'instruct', 'math')

Spec grammar (``parse_schedule``), mix first, then an optional ``|arrival``:

==========================================  =============================================
spec                                        meaning
==========================================  =============================================
``math``                                    every request is math (same as stationary)
``stationary:math=0.5,sql=0.5``             fixed mix; weights need not sum to 1
``stationary:all``                          equal weights over every domain
``switch:instruct>math@100``                instruct for [0, 100), math from 100 on
``gradual:prose>code@50-150``               prose up to 50, code from 150, linear between
``drift:instruct,math,sql@200``             a new phase every 200: [0,200) [200,400) [400,…)
``drift:instruct@100,math@350,sql``         phase *ends*: [0,100) [100,350) [350,…)
``…|closed``                                closed loop (the default)
``…|poisson:4``                             Poisson arrivals, 4 requests/s
``…|bursts:4x8``                            bursts of 8 simultaneous requests, 4 requests/s
==========================================  =============================================

The sides of ``switch`` and ``gradual`` may be mixes (``switch:math=0.5,sql=0.5>code@100``);
a drift phase that is a mix joins its parts with ``+`` (``drift:math=1+sql=1@100,code``),
since the comma separates phases. The last drift phase lasts to the end of the schedule.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from osd.workloads.datasets import DOMAINS, Query, load_domain

logger = logging.getLogger(__name__)

DEFAULT_DRIFT_SPEC = "drift:instruct,math,sql@200"

SPEC_EXAMPLES = (
    "'math', 'stationary:math=0.5,sql=0.5', 'switch:instruct>math@100', "
    "'gradual:prose>code@50-150', 'drift:instruct,math,sql@200', "
    "'drift:instruct@100,math@350,sql', optionally followed by '|closed', '|poisson:4' "
    "or '|bursts:4x8' (rate 4 requests/s, bursts of 8)"
)

MixSpec = str | Mapping[str, float]  # "math" or {"math": 0.5, "sql": 0.5}

# Stream ids for np.random.default_rng([seed, stream, ...]).
_ARRIVAL_STREAM, _DOMAIN_STREAM, _QUERY_STREAM = 0, 1, 2


# ----------------------------------------------------------------------------- helpers


def _num(x: float) -> str:
    """Shortest exact text of a number: ``4.0`` → ``"4"``, ``0.25`` → ``"0.25"``."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**53 else repr(float(x))


def _weights(mix: MixSpec, what: str) -> dict[str, float]:
    """Check a mix and return it as ``{domain: weight}`` (weights as given, not normalised).

    ``"math"`` → ``{"math": 1.0}``; ``{"math": 1, "sql": 3}`` → ``{"math": 1.0, "sql": 3.0}``.
    """
    weights = {mix: 1.0} if isinstance(mix, str) else dict(mix)
    if not weights:
        raise ValueError(f"{what}: empty mix; give at least one domain, e.g. {{'math': 1.0}}")
    out: dict[str, float] = {}
    for name, w in weights.items():
        if name not in DOMAINS:
            raise ValueError(f"{what}: unknown domain {name!r}; choose from {', '.join(DOMAINS)}")
        w = float(w)
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"{what}: weight of {name!r} is {w}; weights must be finite and >= 0")
        out[name] = w
    if sum(out.values()) <= 0:
        raise ValueError(f"{what}: weights {out} sum to 0; give at least one positive weight")
    return out


def _normalise(weights: Mapping[str, float]) -> dict[str, float]:
    """Probabilities of the domains with positive weight, in ``DOMAINS`` order."""
    total = sum(weights.values())
    return {d: weights[d] / total for d in DOMAINS if weights.get(d, 0.0) > 0}


def _mix_text(weights: Mapping[str, float], sep: str = ",") -> str:
    """Spec text of a mix: ``{"math": 1.0}`` → ``"math"``, else ``"math=1,sql=3"``."""
    if len(weights) == 1 and next(iter(weights.values())) == 1.0:
        return next(iter(weights))
    return sep.join(f"{d}={_num(w)}" for d, w in weights.items())


def _mix_words(weights: Mapping[str, float]) -> str:
    """Human text of a mix: ``"math"`` or ``"math 50% + sql 50%"``."""
    probs = _normalise(weights)
    if len(probs) == 1:
        return next(iter(probs))
    return " + ".join(f"{d} {p:.0%}" for d, p in probs.items())


def _check_index(value: int, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_rate(rate: float, what: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < math.inf:
        raise ValueError(f"{what}: rate must be a finite number > 0 requests/s, got {rate!r}")
    return float(rate)


# ------------------------------------------------------------------- arrival processes


@dataclass(frozen=True)
class ClosedLoop:
    """No arrival times: the driver sends request ``i + 1`` when request ``i`` finishes."""

    def times(self, n: int, rng: np.random.Generator) -> None:
        return None

    def spec(self) -> str:
        return "closed"

    def describe(self) -> str:
        return "closed loop"


@dataclass(frozen=True)
class Poisson:
    """Open loop, exponential inter-arrival times with mean ``1 / rate`` seconds.

    Arrival ``i`` is at the sum of ``i + 1`` gaps, so every difference of consecutive
    times (with 0 before the first) is an independent Exp(rate) draw.
    """

    rate: float  # requests/s

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate", _check_rate(self.rate, "Poisson"))

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.cumsum(rng.exponential(1.0 / self.rate, size=n))  # [n] seconds

    def spec(self) -> str:
        return f"poisson:{_num(self.rate)}"

    def describe(self) -> str:
        return f"Poisson {_num(self.rate)} req/s"


@dataclass(frozen=True)
class Bursts:
    """Bursts of ``burst_size`` requests that arrive at the same instant.

    Bursts form a Poisson process at ``rate / burst_size`` bursts/s, so the mean request
    rate is ``rate``. Example: ``Bursts(4, 8)`` sends 8 requests at once, on average every
    2 s; requests 0–7 share one time, 8–15 the next, and so on (the last burst may be short).
    """

    rate: float  # requests/s, averaged over bursts
    burst_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate", _check_rate(self.rate, "Bursts"))
        if isinstance(self.burst_size, bool) or not isinstance(self.burst_size, (int, np.integer)):
            raise ValueError(f"Bursts: burst_size must be an integer, got {self.burst_size!r}")
        if self.burst_size < 1:
            raise ValueError(f"Bursts: burst_size must be >= 1, got {self.burst_size}")
        object.__setattr__(self, "burst_size", int(self.burst_size))

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        n_bursts = -(-n // self.burst_size)
        starts = np.cumsum(rng.exponential(self.burst_size / self.rate, size=n_bursts))
        return np.repeat(starts, self.burst_size)[:n]  # [n] seconds

    def spec(self) -> str:
        return f"bursts:{_num(self.rate)}x{self.burst_size}"

    def describe(self) -> str:
        return f"bursts of {self.burst_size} at {_num(self.rate)} req/s"


Arrival = ClosedLoop | Poisson | Bursts


# ------------------------------------------------------------------------- domain mixes


@dataclass(frozen=True)
class Stationary:
    """The same mix for every request: ``Stationary({"math": 1, "sql": 3}).probs(i)`` is
    ``{"math": 0.25, "sql": 0.75}`` for all ``i``."""

    weights: MixSpec  # stored as dict[str, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", _weights(self.weights, "Stationary"))

    def probs(self, i: int) -> dict[str, float]:
        return _normalise(self.weights)

    def spec(self) -> str:
        return f"stationary:{_mix_text(self.weights)}"

    def describe(self) -> str:
        return _mix_words(self.weights)


@dataclass(frozen=True)
class Switch:
    """Abrupt drift: ``before`` for requests ``[0, at)``, ``after`` from request ``at`` on.

    ``Switch("instruct", "math", 100)``: ``probs(99) == {"instruct": 1.0}``,
    ``probs(100) == {"math": 1.0}``.
    """

    before: MixSpec
    after: MixSpec
    at: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "before", _weights(self.before, "Switch.before"))
        object.__setattr__(self, "after", _weights(self.after, "Switch.after"))
        object.__setattr__(self, "at", _check_index(self.at, "Switch.at"))

    def probs(self, i: int) -> dict[str, float]:
        return _normalise(self.before if i < self.at else self.after)

    def spec(self) -> str:
        return f"switch:{_mix_text(self.before)}>{_mix_text(self.after)}@{self.at}"

    def describe(self) -> str:
        return f"{_mix_words(self.before)} → {_mix_words(self.after)}@{self.at}"


@dataclass(frozen=True)
class Gradual:
    """Gradual drift: the mix moves linearly from ``start`` to ``end`` over requests
    ``[begin, end_index]``; before ``begin`` it is ``start``, after ``end_index`` ``end``.

    ``Gradual("prose", "code", 50, 150)``: ``probs(50) == {"prose": 1.0}``,
    ``probs(100) == {"prose": 0.5, "code": 0.5}``, ``probs(150) == {"code": 1.0}``.
    Mixes interpolate after normalising each side, so the weights' scale does not matter.
    """

    start: MixSpec
    end: MixSpec
    begin: int
    end_index: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _weights(self.start, "Gradual.start"))
        object.__setattr__(self, "end", _weights(self.end, "Gradual.end"))
        begin = _check_index(self.begin, "Gradual.begin")
        end_index = _check_index(self.end_index, "Gradual.end_index")
        if end_index <= begin:
            raise ValueError(
                f"Gradual: end_index ({end_index}) must be > begin ({begin}); "
                "for an abrupt change use Switch"
            )
        object.__setattr__(self, "begin", begin)
        object.__setattr__(self, "end_index", end_index)

    def probs(self, i: int) -> dict[str, float]:
        w = min(max((i - self.begin) / (self.end_index - self.begin), 0.0), 1.0)
        a, b = _normalise(self.start), _normalise(self.end)
        mixed = {d: (1 - w) * a.get(d, 0.0) + w * b.get(d, 0.0) for d in DOMAINS}
        return {d: p for d, p in mixed.items() if p > 0}

    def spec(self) -> str:
        return (
            f"gradual:{_mix_text(self.start)}>{_mix_text(self.end)}@{self.begin}-{self.end_index}"
        )

    def describe(self) -> str:
        return (
            f"{_mix_words(self.start)} → {_mix_words(self.end)} "
            f"gradually over {self.begin}-{self.end_index}"
        )


@dataclass(frozen=True)
class Drift:
    """A sequence of abrupt switches: phase ``k`` runs from ``at[k-1]`` (0 for the first)
    up to ``at[k]``; the last phase lasts to the end.

    ``Drift(("instruct", "math", "sql"), at=(100, 350))``: instruct for ``[0, 100)``,
    math for ``[100, 350)``, sql from 350 on. ``Drift.every(("instruct", "math", "sql"), 200)``
    switches at 200 and 400.
    """

    phases: tuple[MixSpec, ...]
    at: tuple[int, ...]  # len(phases) - 1 strictly increasing indexes, each > 0

    def __post_init__(self) -> None:
        phases = tuple(_weights(p, f"Drift phase {k}") for k, p in enumerate(self.phases))
        at = tuple(_check_index(a, "Drift switch index", minimum=1) for a in self.at)
        if len(phases) < 2:
            raise ValueError(f"Drift needs at least 2 phases, got {len(phases)}; use Stationary")
        if len(at) != len(phases) - 1:
            raise ValueError(
                f"Drift: {len(phases)} phases need {len(phases) - 1} switch indexes, got {len(at)}"
            )
        if any(b <= a for a, b in itertools.pairwise(at)):
            raise ValueError(f"Drift: switch indexes {list(at)} must be strictly increasing")
        object.__setattr__(self, "phases", phases)
        object.__setattr__(self, "at", at)

    @classmethod
    def every(cls, phases: Sequence[MixSpec], every: int) -> Drift:
        """Phases of equal length ``every``: ``every(("a", "b", "c"), 200)`` switches at 200, 400."""
        every = _check_index(every, "Drift phase length", minimum=1)
        return cls(tuple(phases), tuple(every * k for k in range(1, len(phases))))

    def phase(self, i: int) -> int:
        """Index of the phase that request ``i`` falls in."""
        return int(np.searchsorted(self.at, i, side="right"))

    def probs(self, i: int) -> dict[str, float]:
        return _normalise(self.phases[self.phase(i)])

    def spec(self) -> str:
        parts = [f"{_mix_text(p, '+')}@{a}" for p, a in zip(self.phases[:-1], self.at, strict=True)]
        return "drift:" + ",".join([*parts, _mix_text(self.phases[-1], "+")])

    def describe(self) -> str:
        words = [_mix_words(p) for p in self.phases]
        return " → ".join(
            [words[0], *(f"{w}@{a}" for w, a in zip(words[1:], self.at, strict=True))]
        )


Mix = Stationary | Switch | Gradual | Drift


# ----------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class ScheduledRequest:
    """One request of a replay: arrival time (``None`` in a closed loop), domain, query."""

    index: int
    time_s: float | None
    domain: str
    query: Query


def _draw_domains(mix: Mix, n: int, rng: np.random.Generator) -> list[str]:
    """Domain of each request: inverse-CDF of ``mix.probs(i)`` at one uniform draw each."""
    u = rng.random(n)  # [n]
    out: list[str] = []
    for i in range(n):
        probs = mix.probs(i)
        names = list(probs)
        cdf = list(itertools.accumulate(probs.values()))
        k = bisect.bisect_right(cdf, u[i] * cdf[-1])
        out.append(names[min(k, len(names) - 1)])
    return out


class _Cycler:
    """Walks a domain's queries in seeded permutations, a fresh one per pass."""

    def __init__(self, queries: Sequence[Query], rng: np.random.Generator) -> None:
        self.queries = sorted(queries, key=lambda q: q.id)  # independent of load order
        self.rng = rng
        self.order: np.ndarray = np.empty(0, dtype=np.int64)
        self.pos = 0

    def next(self) -> Query:
        if self.pos == len(self.order):
            self.order, self.pos = self.rng.permutation(len(self.queries)), 0
        q = self.queries[self.order[self.pos]]
        self.pos += 1
        return q


@dataclass(frozen=True)
class Schedule:
    """``n`` requests: arrivals from ``arrival``, domains from ``mix``, all from ``seed``."""

    arrival: Arrival
    mix: Mix
    n: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.arrival, (ClosedLoop, Poisson, Bursts)):
            raise ValueError(f"arrival must be ClosedLoop, Poisson or Bursts, got {self.arrival!r}")
        if not isinstance(self.mix, (Stationary, Switch, Gradual, Drift)):
            raise ValueError(f"mix must be Stationary, Switch, Gradual or Drift, got {self.mix!r}")
        object.__setattr__(self, "n", _check_index(self.n, "Schedule.n", minimum=1))
        object.__setattr__(self, "seed", _check_index(self.seed, "Schedule.seed"))

    def build(
        self,
        queries_by_domain: Mapping[str, Sequence[Query]] | None = None,
        data_dir: str | os.PathLike | None = None,
    ) -> list[ScheduledRequest]:
        """The requests, in index order.

        ``queries_by_domain`` supplies the queries (tests use small synthetic ones); when it
        is ``None`` each drawn domain's eval split is loaded from ``data_dir``.
        """
        times = self.arrival.times(self.n, np.random.default_rng([self.seed, _ARRIVAL_STREAM]))
        domains = _draw_domains(
            self.mix, self.n, np.random.default_rng([self.seed, _DOMAIN_STREAM])
        )
        cyclers: dict[str, _Cycler] = {}
        for d in dict.fromkeys(domains):
            if queries_by_domain is None:
                queries = load_domain(d, "eval", data_dir)
            elif d in queries_by_domain:
                queries = queries_by_domain[d]
            else:
                raise ValueError(
                    f"schedule draws domain {d!r} but queries_by_domain has only "
                    f"{sorted(queries_by_domain)}; add it or change the mix"
                )
            if not queries:
                raise ValueError(f"no queries for domain {d!r}; cannot schedule requests from it")
            rng = np.random.default_rng([self.seed, _QUERY_STREAM, DOMAINS.index(d)])
            cyclers[d] = _Cycler(queries, rng)
        logger.debug("built schedule %s", self.describe())
        return [
            ScheduledRequest(i, None if times is None else float(times[i]), d, cyclers[d].next())
            for i, d in enumerate(domains)
        ]

    def spec(self) -> str:
        """Canonical spec text: ``parse_schedule(s.spec(), s.n, s.seed) == s``."""
        return f"{self.mix.spec()}|{self.arrival.spec()}"

    def describe(self) -> str:
        return (
            f"{self.n} requests: {self.mix.describe()}; {self.arrival.describe()}; seed {self.seed}"
        )


# -------------------------------------------------------------------------- spec parser


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"bad schedule spec {spec!r}: {why}. Valid specs: {SPEC_EXAMPLES}")


def _parse_int(text: str, spec: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _bad(spec, f"{what} {text!r} is not an integer") from None


def _parse_float(text: str, spec: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _bad(spec, f"{what} {text!r} is not a number") from None


def _parse_mix(text: str, spec: str, sep: str = ",") -> dict[str, float]:
    """``"math=0.5,sql=0.5"`` → ``{"math": 0.5, "sql": 0.5}``; a bare name has weight 1."""
    if text.strip() == "all":
        return dict.fromkeys(DOMAINS, 1.0)
    out: dict[str, float] = {}
    for part in text.split(sep):
        name, eq, w = part.strip().partition("=")
        if not name:
            raise _bad(spec, f"empty domain name in {text!r}")
        if name in out:
            raise _bad(spec, f"domain {name!r} given twice in {text!r}")
        out[name] = _parse_float(w, spec, f"weight of {name!r}") if eq else 1.0
    return out


def _parse_arrival(text: str, spec: str) -> Arrival:
    kind, _, body = text.strip().partition(":")
    if kind == "closed" and not body:
        return ClosedLoop()
    if kind == "poisson" and body:
        return Poisson(_parse_float(body, spec, "rate"))
    if kind == "bursts" and "x" in body:
        rate, _, size = body.partition("x")
        return Bursts(_parse_float(rate, spec, "rate"), _parse_int(size, spec, "burst size"))
    raise _bad(spec, f"unknown arrival {text!r}; use closed, poisson:RATE or bursts:RATExSIZE")


def _parse_drift(body: str, spec: str) -> Drift:
    items = [s.strip() for s in body.split(",")]
    has_at = ["@" in s for s in items]
    if len(items) < 2:
        raise _bad(spec, "a drift needs at least 2 phases")
    if has_at[-1] and not any(has_at[:-1]):  # uniform: a,b,c@200
        last, _, every = items[-1].rpartition("@")
        phases = [_parse_mix(s, spec, "+") for s in [*items[:-1], last]]
        return Drift.every(phases, _parse_int(every, spec, "phase length"))
    if all(has_at[:-1]) and not has_at[-1]:  # per-phase ends: a@100,b@350,c
        pairs = [s.rpartition("@") for s in items[:-1]]
        phases = [_parse_mix(p, spec, "+") for p, _, _ in pairs]
        ends = [_parse_int(a, spec, "phase end") for _, _, a in pairs]
        return Drift((*phases, _parse_mix(items[-1], spec, "+")), tuple(ends))
    raise _bad(spec, "put '@N' either once after the last phase or after every phase but the last")


def _parse_mix_spec(text: str, spec: str) -> Mix:
    kind, colon, body = text.strip().partition(":")
    if not colon:
        if kind in DOMAINS or kind == "all":
            return Stationary(_parse_mix(kind, spec))
        raise _bad(spec, f"{kind!r} is neither a domain nor KIND:ARGS")
    if kind == "stationary":
        return Stationary(_parse_mix(body, spec))
    if kind in ("switch", "gradual"):
        sides, at, where = body.rpartition("@")
        a, gt, b = sides.partition(">")
        if not at or not gt or ">" in b:
            raise _bad(spec, f"{kind} needs the form A>B@{'N' if kind == 'switch' else 'N-M'}")
        before, after = _parse_mix(a, spec), _parse_mix(b, spec)
        if kind == "switch":
            return Switch(before, after, _parse_int(where, spec, "switch index"))
        lo, dash, hi = where.partition("-")
        if not dash:
            raise _bad(spec, "gradual needs a range of indexes, e.g. gradual:prose>code@50-150")
        return Gradual(before, after, _parse_int(lo, spec, "begin"), _parse_int(hi, spec, "end"))
    if kind == "drift":
        return _parse_drift(body, spec)
    raise _bad(spec, f"unknown mix kind {kind!r}; use stationary, switch, gradual or drift")


def parse_schedule(spec: str, n: int, seed: int = 0) -> Schedule:
    """A :class:`Schedule` from CLI text (grammar in the module docstring).

    ``parse_schedule("switch:instruct>math@100|poisson:4", 300, 0)`` →
    ``Schedule(Poisson(4.0), Switch({"instruct": 1.0}, {"math": 1.0}, 100), 300, 0)``.
    Raises ``ValueError`` naming what is wrong, with examples of valid specs.
    """
    mix_text, bar, arrival_text = spec.partition("|")
    if bar and "|" in arrival_text:
        raise _bad(spec, "give at most one '|arrival'")
    try:
        mix = _parse_mix_spec(mix_text, spec)
        arrival = _parse_arrival(arrival_text, spec) if bar else ClosedLoop()
    except ValueError as e:
        if str(e).startswith("bad schedule spec"):
            raise
        raise _bad(spec, str(e)) from None
    return Schedule(arrival, mix, n, seed)
