"""``osd bench``: target-only vs Hugging Face assisted generation vs our drafters.

Everything runs **in one process on the same eval prompts**, greedy. For each prompt every
method runs once, in an order rotated per prompt, so machine noise hits all alike.
Per method it reports (DESIGN §7):

- ``tokens_per_s`` and ``speedup`` = tokens/s ÷ target-only tokens/s (same run);
- ``alpha``, ``alpha_per_pos``, ``tau`` (ours; HF assisted exposes no counters);
- ``speed_of_light``: achieved tokens/s ÷ the bound τ / (c_verify + c_draft), with the
  mean per-step verify and draft costs from the ledger — how much of the step goes to
  anything but drafting and verifying; ``sol_speedup`` = τ · c(1) / (c_verify + c_draft),
  with c(1) the engine's own target-only step cost, is the speedup those costs allow;
- ``ledger``: the time split per stage;
- ``matches_target``: prompts whose output equals target-only greedy decoding.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from osd.drafters import build_drafter, drafter_spec
from osd.models import load_model, load_tokenizer
from osd.specdec.controller import SpeculationController
from osd.specdec.engine import DecodeStats, SpeculativeDecoder
from osd.specdec.ledger import Ledger
from osd.workloads.datasets import load_domain, parse_domains

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """One way to decode. ``kind``: ``hf`` (target only), ``hf_assisted`` or ``ours``."""

    name: str
    kind: str
    drafter: str = "none"
    k: int = 4
    tree: str | None = None
    adaptive: bool = False
    shortlist: bool = False  # draft over the draft's frequent-token shortlist (FR-Spec)
    early_stop: float | None = None  # the online decision model's threshold (chains)
    options: tuple[tuple[str, int], ...] = ()  # more drafter options, as (name, value)


DEFAULT_DRAFTERS = ("draft_model", "ngram")
SHORTLIST_VARIANT = "draft_model+shortlist"
# the n-gram suffix tree's bench variants: depth, node budget, history (tokens) kept
NGRAM_TREE_DEPTH = 8
NGRAM_TREE = (("nodes", 10),)
NGRAM_HISTORY = 1 << 16


def _drafter_methods(name: str, k: int) -> list[Method]:
    """The variants of one drafter that ``osd bench`` runs; one chain of ``k`` for a
    drafter with no variants listed here, so every registered drafter can be benched."""
    if name == "none":
        return []  # "ours target_only" is always run
    if name == SHORTLIST_VARIANT:  # a draft with a shortlist.json (osd zoo build --target)
        return [
            Method(f"ours draft chain k={k} shortlist", "ours", "draft_model", k=k, shortlist=True),
            Method(
                "ours draft tree 2,2,1 shortlist",
                "ours",
                "draft_model",
                tree="2,2,1",
                shortlist=True,
            ),
        ]
    if name == "draft_model":
        return [
            Method(f"ours draft chain k={k}", "ours", "draft_model", k=k),
            Method("ours draft chain adaptive", "ours", "draft_model", k=8, adaptive=True),
            Method("ours draft chain k=8 early-stop", "ours", "draft_model", k=8, early_stop=0.3),
            Method("ours draft tree 2,2,1", "ours", "draft_model", tree="2,2,1"),
            Method("ours draft tree 4,2,2", "ours", "draft_model", tree="4,2,2"),
        ]
    if name == "ngram":
        return [
            Method(f"ours ngram k={k}", "ours", "ngram", k=k),
            Method("ours ngram tree", "ours", "ngram", k=NGRAM_TREE_DEPTH, options=NGRAM_TREE),
            Method(
                "ours ngram tree+history",
                "ours",
                "ngram",
                k=NGRAM_TREE_DEPTH,
                options=(*NGRAM_TREE, ("history", NGRAM_HISTORY)),
            ),
        ]
    spec = drafter_spec(name)
    if "k" not in spec.options():  # head drafters: their own tree, row = name
        nodes = inspect.signature(spec.build).parameters.get("nodes")
        if nodes is not None and nodes.default == "auto":  # Medusa's: the 32-node tree too
            fixed = Method(f"{name} 32 nodes", "ours", name, options=(("nodes", 32),))
            return [Method(name, "ours", name), fixed]
        return [Method(name, "ours", name)]
    return [Method(f"ours {name} k={k}", "ours", name, k=k)]


def default_methods(k: int = 4, drafters: Sequence[str] = DEFAULT_DRAFTERS) -> list[Method]:
    """HF target-only (the reference), our engine with no drafter, and the variants of each
    drafter named in ``drafters`` (HF assisted generation too when ``draft_model`` is one:
    the peer of our draft chain)."""
    for name in drafters:
        drafter_spec(name.removesuffix("+shortlist"))  # an unknown name lists the known ones
    methods = [Method("target_only (HF)", "hf")]
    if "draft_model" in drafters:
        methods.append(Method(f"hf_assisted k={k}", "hf_assisted", k=k))
    methods.append(Method("ours target_only", "ours"))
    for name in dict.fromkeys(drafters):  # in order, once each
        methods += _drafter_methods(name, k)
    return methods


@dataclass
class _Tally:
    tokens: int = 0
    seconds: float = 0.0
    matches: int = 0
    stats: DecodeStats = field(default_factory=DecodeStats)
    ledger: Ledger = field(default_factory=Ledger)


def _runner(
    method: Method, target, draft, tok, max_new: int, ignore_eos: bool
) -> Callable[[list[int]], tuple[list[int], DecodeStats | None, Ledger | None]]:
    # ignore_eos (as vLLM's benchmarks): every prompt generates exactly max_new tokens
    hf_eos = {"eos_token_id": None, "min_new_tokens": max_new} if ignore_eos else {}
    if method.kind == "hf":

        def run(ids):
            out = target.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                **hf_eos,
            )
            return out[0, len(ids) :].tolist(), None, None

        return run
    if method.kind == "hf_assisted":
        draft.generation_config.num_assistant_tokens = method.k
        draft.generation_config.num_assistant_tokens_schedule = "constant"
        draft.generation_config.assistant_confidence_threshold = 0.0

        def run(ids):
            out = target.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new,
                do_sample=False,
                assistant_model=draft,
                pad_token_id=tok.pad_token_id,
                **hf_eos,
            )
            return out[0, len(ids) :].tolist(), None, None

        return run
    extra = {"shortlist": True} if method.shortlist else {}
    extra.update(method.options)
    if method.early_stop is not None:
        extra["early_stop"] = method.early_stop
    drafter = build_drafter(
        method.drafter, target, draft, lenient=True, k=method.k, tree=method.tree, **extra
    )
    controller = SpeculationController(k_max=method.k) if method.adaptive else None
    dec = SpeculativeDecoder(target, drafter, tok, controller=controller)
    if ignore_eos:
        dec.eos = set()

    def run(ids):
        out = dec.generate(ids, max_new_tokens=max_new)
        return out.tokens, out.stats, out.ledger

    run.reset = drafter.reset  # after the warm-up: a history must not hold its output
    return run


def run_bench(
    target: str = "zoo:target",
    draft: str = "zoo:draft",
    domains: str | None = None,
    n: int = 10,
    max_new_tokens: int = 64,
    k: int = 4,
    methods: list[Method] | None = None,
    data_dir=None,
    prompt_tokens: int = 128,
    ignore_eos: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run every method on ``n`` eval prompts per domain; return the JSON-able report."""
    methods = methods or default_methods(k)
    if n <= 0 or max_new_tokens <= 0:
        raise ValueError(f"n and max_new_tokens must be positive, got {n}, {max_new_tokens}")
    t_model, d_model, tok = (
        load_model(target, "cpu"),
        load_model(draft, "cpu"),
        load_tokenizer(target),
    )
    prompts = []
    for d in parse_domains(domains):
        for q in load_domain(d, "eval", data_dir)[:n]:
            prompts.append(tok(q.prompt, add_special_tokens=False).input_ids[-prompt_tokens:])
    runners = {
        m.name: _runner(m, t_model, d_model, tok, max_new_tokens, ignore_eos) for m in methods
    }
    tallies = {m.name: _Tally() for m in methods}
    warm = prompts[0][:8]
    for run in runners.values():  # warm-up: first-call allocations, lazy imports
        run(warm)
        getattr(run, "reset", lambda: None)()
    for i, ids in enumerate(prompts):
        order = methods[i % len(methods) :] + methods[: i % len(methods)]
        outputs = {}
        for m in order:
            start = time.perf_counter()
            new, stats, ledger = runners[m.name](ids)
            tally = tallies[m.name]
            tally.seconds += time.perf_counter() - start
            tally.tokens += len(new)
            outputs[m.name] = new
            if stats is not None:
                tally.stats.merge(stats)
                tally.ledger.merge(ledger)
        ref = outputs[methods[0].name]
        for name, new in outputs.items():
            tallies[name].matches += new == ref
        if progress:
            progress(i + 1, len(prompts))
    rep = _report(methods, tallies, len(prompts), max_new_tokens)
    rep["ignore_eos"] = ignore_eos
    return rep


def _report(
    methods: list[Method], tallies: dict[str, _Tally], n_prompts: int, max_new: int
) -> dict:
    base = tallies[methods[0].name]
    base_tps = base.tokens / base.seconds
    engine_base = next(
        (tallies[m.name] for m in methods if m.kind == "ours" and m.drafter == "none"), None
    )
    c1 = engine_base.ledger.mean_ms("verify") if engine_base else None
    rows = {}
    for m in methods:
        t = tallies[m.name]
        tps = t.tokens / t.seconds
        row = {
            "kind": m.kind,
            "drafter": m.drafter,
            "k": m.k,
            "tree": m.tree,
            "adaptive": m.adaptive,
            "shortlist": m.shortlist,
            "options": dict(m.options),
            "tokens_per_s": tps,
            "speedup": tps / base_tps,
            "matches_target": t.matches,
            "prompts": n_prompts,
        }
        if t.stats.steps:
            s = t.stats
            c_verify = t.ledger.mean_ms("verify")
            c_draft = t.ledger.seconds["propose"] * 1000 / s.steps
            bound_tps = s.tau / (c_verify + c_draft) * 1000
            row.update(
                {
                    "alpha": s.alpha,
                    "alpha_per_pos": s.alpha_per_pos,
                    "tau": s.tau,
                    "c_verify_ms": c_verify,
                    "c_draft_ms": c_draft,
                    "speed_of_light": tps / bound_tps,
                    "sol_speedup": s.tau * c1 / (c_verify + c_draft) if c1 else None,
                    "ledger": {k: round(v, 4) for k, v in t.ledger.split().items()},
                }
            )
        rows[m.name] = row
    return {
        "prompts": n_prompts,
        "max_new_tokens": max_new,
        "baseline": methods[0].name,
        "c1_ms": c1,
        "methods": rows,
    }
