"""``osd bench --serving``: what continuous batching buys, measured on the serving loop.

One :class:`~osd.serving.ServingLoop` (in process: no HTTP, no Ray) serves every
concurrency level of one run with the same target, drafter and prompts. At level ``c``,
``c`` client threads each submit a request, wait for its final :class:`~osd.serving.Delta`
and submit the next (a closed loop), until the level's requests are done: the eval prompts
cycled to ``requests`` (default: every prompt once, and at least 4 requests per client of
the highest level, so the batch runs full rather than draining — a level of ``c`` requests
at concurrency ``c`` measures one batch's tail, not serving). Every level serves the same
list. EOS is ignored (as in vLLM's benchmarks and ``osd bench``), so every request
generates exactly ``max_new_tokens``. Per level (DESIGN §7, serving throughput):

- ``tokens_per_s``: completion tokens ÷ the level's wall time (first submit → last result);
- ``p50_s``, ``p99_s``: request latency, submitted → finished (queueing included);
- ``ratio_vs_c1``: ``tokens_per_s`` ÷ the concurrency-1 level's (same run);
- ``tokens_per_s_rounds``, ``ratio_vs_c1_rounds``: the same per round (``rounds`` > 1 runs
  the levels in turn, 1, 8, 32, 1, 8, 32, …, and pools each level's requests: on a shared
  machine whose speed drifts over minutes, no level gets all of a slow stretch);
- ``mean_batch``: sequences per engine step — how full the batch actually ran;
- ``alpha``, ``tau``: acceptance over the level;
- ``matches_c1``: requests whose tokens equal the same prompt's at concurrency 1 (greedy:
  what a request is batched with must not change its output).

Worked example of the closed loop: 5 prompts at ``c = 2``: clients A and B take prompts 0
and 1; whichever finishes first takes prompt 2, and so on; the level ends when prompt 4's
result is in, with 5 × ``max_new_tokens`` tokens served.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from osd.drafters import build_drafter, drafter_spec
from osd.models import load_model, load_tokenizer
from osd.serving import Delta, RequestResult, ServeRequest, ServingLoop
from osd.specdec import threads
from osd.specdec.controller import SpeculationController
from osd.specdec.engine import DecodeStats, SpeculativeDecoder
from osd.workloads.datasets import load_domain, parse_domains

__all__ = ["ServingBenchConfig", "parse_levels", "run_serving_bench"]

log = logging.getLogger(__name__)

WARMUP_TOKENS = 4


@dataclass(frozen=True)
class ServingBenchConfig:
    """One serving benchmark: the levels, the requests and the drafter (the same for all)."""

    concurrency: tuple[int, ...] = (1, 8, 32)
    n: int = 4  # eval prompts per domain
    requests: int | None = None  # per level (prompts cycled); None: max(prompts, 4 × max c)
    max_new_tokens: int = 32
    domains: str | None = None  # comma-separated, or None / "all"
    drafter: str = "draft_model"  # by name (osd.drafters.DRAFTERS)
    k: int = 4
    tree: str | None = None
    target: str = "zoo:target"
    draft: str = "zoo:draft"
    max_batch: int | None = None  # the loop's max batch; None: the highest concurrency
    adaptive: bool = False  # the load-aware controller picks the depth each step (0 = off)
    prompt_tokens: int = 128  # prompts are cut to their last this many tokens
    ignore_eos: bool = True
    device: str | None = None  # None: CUDA when there is one, else the CPU
    timeout_s: float = 600.0  # per request: a hung loop fails the run instead of hanging
    rounds: int = 1  # the levels run this many times in turn (1, 8, 32, 1, 8, 32, …), pooled

    def validate(self) -> ServingBenchConfig:
        levels = self.concurrency
        if not levels or any(isinstance(c, bool) or not isinstance(c, int) for c in levels):
            raise ValueError(f"concurrency must be ints >= 1, e.g. 1,8,32; got {levels!r}")
        if min(levels) < 1:
            raise ValueError(f"concurrency must be ints >= 1, got {levels!r}")
        if len(set(levels)) != len(levels):
            raise ValueError(f"concurrency levels repeat ({levels!r}); --rounds runs them again")
        if self.n <= 0 or self.max_new_tokens <= 0:
            raise ValueError(
                f"n and max_new_tokens must be positive, got {self.n}, {self.max_new_tokens}"
            )
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an int >= 1, got {self.rounds!r}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        drafter_spec(self.drafter)  # an unknown name lists the known ones
        return self


def parse_levels(spec: str) -> tuple[int, ...]:
    """``"1,8,32"`` → ``(1, 8, 32)``.

    >>> parse_levels("1, 8,32")
    (1, 8, 32)
    """
    try:
        levels = tuple(int(s) for s in spec.split(",") if s.strip())
    except ValueError:
        raise ValueError(
            f"concurrency {spec!r} must be comma-separated ints, e.g. 1,8,32"
        ) from None
    if not levels or min(levels) < 1:
        raise ValueError(f"concurrency {spec!r} must be ints >= 1, e.g. 1,8,32")
    return levels


def _percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _request(
    loop: ServingLoop, rid: str, ids: list[int], max_new: int, timeout_s: float
) -> Delta | None:
    """Submit one request and wait for its final event (``None``: none in ``timeout_s``)."""
    done, final = threading.Event(), []

    def on_event(delta: Delta) -> None:
        if delta.final:
            final.append(delta)
            done.set()

    loop.submit(ServeRequest(rid, ids, max_new), on_event)
    return final[0] if done.wait(timeout_s) else None


def _serve_level(
    loop: ServingLoop,
    prompts: list[list[int]],
    concurrency: int,
    max_new: int,
    timeout_s: float,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[RequestResult], float]:
    """Every prompt once, by ``concurrency`` closed-loop clients; (results, wall seconds)."""
    results: list[RequestResult | None] = [None] * len(prompts)
    errors: list[BaseException] = []
    lock = threading.Lock()
    taken = 0

    def client() -> None:
        nonlocal taken
        while not errors:
            with lock:
                i, taken = taken, taken + 1
            if i >= len(prompts):
                return
            final = _request(loop, f"c{concurrency}-{i}", prompts[i], max_new, timeout_s)
            if final is None or final.error is not None:
                errors.append(final.error if final else TimeoutError(f"request {i} timed out"))
                return
            results[i] = final.result
            if progress is not None:
                with lock:
                    progress(sum(r is not None for r in results))

    clients = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"serving at concurrency {concurrency} failed: {errors[0]}")
    return [r for r in results if r is not None], wall


def _load_prompts(cfg: ServingBenchConfig, tok, data_dir) -> list[list[int]]:
    prompts = []
    for d in parse_domains(cfg.domains):
        for q in load_domain(d, "eval", data_dir)[: cfg.n]:
            prompts.append(tok(q.prompt, add_special_tokens=False).input_ids[-cfg.prompt_tokens :])
    if not prompts:
        raise ValueError(f"no eval prompts in {cfg.domains or 'all domains'}")
    total = cfg.requests or max(len(prompts), 4 * max(cfg.concurrency))
    return [prompts[i % len(prompts)] for i in range(total)]


def _build(cfg: ServingBenchConfig) -> SpeculativeDecoder:
    device = torch.device(cfg.device) if cfg.device else None
    target, tok = load_model(cfg.target, device), load_tokenizer(cfg.target)
    draft = load_model(cfg.draft, device) if drafter_spec(cfg.drafter).needs_draft else None
    drafter = build_drafter(cfg.drafter, target, draft, lenient=True, k=cfg.k, tree=cfg.tree)
    controller = SpeculationController(k_max=cfg.k) if cfg.adaptive else None
    return SpeculativeDecoder(target, drafter, tok, controller=controller)


def run_serving_bench(
    cfg: ServingBenchConfig,
    data_dir=None,
    progress: Callable[[int, int, int], None] | None = None,
) -> dict:
    """Serve every prompt at each concurrency level of ``cfg``; return the JSON-able report.

    ``progress(concurrency, done, total)`` is called when a level starts (``done = 0``)
    and as its requests finish.
    """
    cfg.validate()
    decoder = threads.apart(_build, cfg)  # the loop's thread alone computes (threads.py)
    target, tok = decoder.target, decoder.tokenizer
    if cfg.ignore_eos:
        decoder.eos = set()
    prompts = _load_prompts(cfg, tok, data_dir)
    loop = ServingLoop(decoder, max_batch=cfg.max_batch or max(cfg.concurrency)).start()
    try:
        warm = min(loop.max_batch, len(prompts))  # first-call allocations, batched shapes
        _serve_level(loop, prompts[:warm], warm, WARMUP_TOKENS, cfg.timeout_s)
        runs: dict[int, list[tuple[list[RequestResult], float, int, int]]] = {}
        for _ in range(cfg.rounds):  # interleaved: a machine slowing mid-run biases no level
            for c in cfg.concurrency:
                steps, stepped = loop.steps, loop.stepped
                tick = (
                    None if progress is None else lambda done, c=c: progress(c, done, len(prompts))
                )
                if tick is not None:
                    tick(0)  # the level starts
                results, wall = _serve_level(
                    loop, prompts, c, cfg.max_new_tokens, cfg.timeout_s, tick
                )
                runs.setdefault(c, []).append(
                    (results, wall, loop.steps - steps, loop.stepped - stepped)
                )
    finally:
        loop.stop()
    levels = [_pooled(c, runs[c]) for c in cfg.concurrency]
    base = next((lv for lv in levels if lv["concurrency"] == 1), None)
    ref = {r.request_id.split("-", 1)[1]: r.token_ids for r in runs[1][0][0]} if base else {}
    for lv in levels:
        got = [
            (r.request_id.split("-", 1)[1], r.token_ids)
            for results, _, _, _ in runs[lv["concurrency"]]
            for r in results
        ]
        lv["matches_c1"] = sum(ids == ref[i] for i, ids in got) if base else None
        lv["ratio_vs_c1"] = lv["tokens_per_s"] / base["tokens_per_s"] if base else None
        lv["ratio_vs_c1_rounds"] = (
            [
                x / y
                for x, y in zip(lv["tokens_per_s_rounds"], base["tokens_per_s_rounds"], strict=True)
            ]
            if base
            else None
        )
    return {
        "serving": levels,
        "requests_per_level": len(prompts),
        "max_new_tokens": cfg.max_new_tokens,
        "drafter": cfg.drafter,
        "k": cfg.k,
        "tree": cfg.tree,
        "adaptive": cfg.adaptive,
        "rounds": cfg.rounds,
        "max_batch": loop.max_batch,
        "engine_max_batch": getattr(decoder, "max_batch", None),
        "device": str(target.device),
        "ignore_eos": cfg.ignore_eos,
        "greedy": True,
    }


def _level(c: int, results: list[RequestResult], wall: float, steps: int, stepped: int) -> dict:
    tokens = sum(r.completion_tokens for r in results)
    latency = [r.latency_s for r in results]
    stats = DecodeStats()
    for r in results:
        stats.merge(r.stats)
    return {
        "concurrency": c,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(latency),
        "p99_s": _percentile(latency, 99),
        "mean_batch": stepped / steps if steps else 0.0,
        "alpha": stats.alpha,
        "tau": stats.tau,
        "mean_depth": stats.proposed / stats.steps if stats.steps else 0.0,
    }


def _pooled(c: int, runs: list[tuple[list[RequestResult], float, int, int]]) -> dict:
    """One level over all its rounds: their requests pooled, their walls summed."""
    results = [r for res, _, _, _ in runs for r in res]
    level = _level(
        c,
        results,
        sum(w for _, w, _, _ in runs),
        sum(s for _, _, s, _ in runs),
        sum(x for _, _, _, x in runs),
    )
    level["tokens_per_s_rounds"] = [
        sum(r.completion_tokens for r in res) / wall for res, wall, _, _ in runs
    ]
    return level
