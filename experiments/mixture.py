"""Does a mixture of drafts beat one shared online draft on a mixed stream? (issue 15)

Every variant is the in-process online loop (``osd online``: engine → records → buffer →
trainer → gate → hot-swap, ``osd.online.run_online``) on the same mixed stream of the
zoo target, each request decoded greedily by the online drafter and replayed by the frozen
one on the same tokens:

- ``shared`` — one draft for every domain, full fine-tune (``osd online``'s defaults);
- ``shared-lora`` — one draft, one LoRA adapter (the capacity of one mixture adapter);
- ``mixture-tag`` — drafter ``mixture``: a LoRA adapter of the draft per domain, each
  request drafted by its domain's adapter (the request's tag), each adapter trained on the
  records it drafted;
- ``mixture-learned`` — the same adapters, but requests carry **no** tag: the router
  learns online which adapter accepts best for a prompt, and the adapters specialise on
  what it sends them (prompts clustered by their token histogram, each cluster at its own
  adapter until another accepts clearly better: :mod:`osd.drafters.router`);
- ``mixture-tag-full`` / ``mixture-learned-full`` — as ``mixture-tag`` / ``-learned``
  with a full copy of the draft per domain instead of a LoRA adapter (a mixture of drafts
  proper).

Same compute for all: 2 trainer steps of 8 records after each request. The figure of
merit is α (accepted ÷ proposed draft tokens, pooled) over the **last third** of the
stream, overall and per domain; the goal is mixture − shared ≥ +0.05. For the learned
router, the JSON has its routing table (domain × adapter, over the training records).

    python experiments/mixture.py --json docs/mixture.json --plot docs/mixture.png
    python experiments/mixture.py --quick --json /tmp/m.json --plot /tmp/m.png  # minutes
    python experiments/mixture.py --append --variants mixture-learned --json … --plot …

Runs are sequential (one torch thread); on this 2-core machine one run of 360 requests
takes 2 min when the machine is quiet, 6–8 min beside other work (``shared-lora`` is not
run by default). ``--lr`` sets the learning rate of every variant.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

VARIANTS = {
    "shared": {"drafter": "draft_model", "lora": False, "router": None},
    "shared-lora": {"drafter": "draft_model", "lora": True, "router": None},
    "mixture-tag": {"drafter": "mixture", "lora": True, "router": "tag"},
    "mixture-learned": {"drafter": "mixture", "lora": True, "router": "learned"},
    "mixture-tag-full": {"drafter": "mixture", "lora": False, "router": "tag"},
    "mixture-learned-full": {"drafter": "mixture", "lora": False, "router": "learned"},
}
DEFAULT_VARIANTS = "shared,mixture-tag,mixture-learned,mixture-tag-full,mixture-learned-full"
DOMAINS = "math,sql,code"
GOAL = 0.05
WINDOW = 30


class RoutingLog:
    """A buffer wrapper that notes (domain, adapter) of every record put into it."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.routes: list[tuple[str | None, str | None]] = []

    def put(self, drafter_id: str, data: bytes) -> str:
        from osd.distill.record import decode

        rec = decode(data)
        self.routes.append((rec.domain, rec.meta.get("adapter")))
        return self.inner.put(drafter_id, data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def summarise(rows, domains: list[str]) -> dict:
    """α online / frozen over the last third, overall and per domain; α per request."""
    from osd.metrics import pooled_alpha
    from osd.online import frozen_counts, online_counts

    tail = rows[len(rows) - len(rows) // 3 :]
    out: dict = {"last_requests": len(tail)}
    for name, counts in (("online", online_counts), ("frozen", frozen_counts)):
        out[f"alpha_{name}"] = pooled_alpha(tail, counts) or 0.0
        out[f"alpha_{name}_by_domain"] = {
            d: pooled_alpha([r for r in tail if r.domain == d], counts) or 0.0 for d in domains
        }
        out[f"alpha_{name}_all"] = pooled_alpha(rows, counts) or 0.0
        out[f"per_request_{name}"] = [
            (r.accepted_online, r.proposed_online)
            if name == "online"
            else (r.accepted_frozen, r.proposed_frozen)
            for r in rows
        ]
    out["domains"] = [r.domain for r in rows]
    return out


def routing_table(routes, domains: list[str]) -> dict:
    """{domain: {adapter: records}}; each domain's ``top`` adapter; the purity (the share
    of records whose adapter is their domain's top one) and whether the domains' top
    adapters are all different (``specialised``: no two domains share one)."""
    table: dict = {d: {} for d in domains}
    for d, a in routes:
        if d in table and a is not None:
            table[d][a] = table[d].get(a, 0) + 1
    top = {d: max(t, key=t.get) for d, t in table.items() if t}
    hits = sum(table[d][a] for d, a in top.items())
    total = sum(sum(t.values()) for t in table.values())
    return {
        "table": table,
        "top": top,
        "purity": hits / total if total else None,
        "specialised": len(set(top.values())) == len(top) == len(domains),
    }


def run_one(name: str, args) -> dict:
    import torch

    from osd.buffer import MemoryBuffer
    from osd.models import load_model, load_tokenizer
    from osd.online import REPLAY_DISTILL, OnlineConfig, run_online

    v = VARIANTS[name]
    torch.manual_seed(args.seed)
    target, draft = load_model("zoo:target", "cpu"), load_model("zoo:draft", "cpu")
    tok = load_tokenizer("zoo:target")
    options = {}
    if v["drafter"] == "mixture":
        options = {"domains": args.domains, "router": v["router"]}
    cfg = OnlineConfig(
        drafter=v["drafter"],
        drafter_options=options,
        schedule=args.schedule,
        n=args.n,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        steps_per_request=args.steps_per_request,
        distill=replace(REPLAY_DISTILL, lora=v["lora"], lr=args.lr),
    )
    buffer = RoutingLog(MemoryBuffer())
    t0 = time.perf_counter()
    result = run_online(target, draft, tok, buffer, cfg, data_dir=args.data_dir)
    domains = list(dict.fromkeys(r.domain for r in result.requests))
    run = summarise(result.requests, domains)
    run.update(
        wall_s=time.perf_counter() - t0,
        published=len(result.versions),
        promoted=sum(bool(x["promoted"]) for x in result.versions),
        trainer_steps=result.trainer_steps,
        lora=v["lora"],
        drafter=v["drafter"],
        router=v["router"],
    )
    if v["drafter"] == "mixture":
        run["routing"] = routing_table(buffer.routes, domains)
    return run


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = doc["runs"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    for i, (name, run) in enumerate(runs.items()):
        acc = np.array([a for a, _ in run["per_request_online"]], float)
        prop = np.array([p for _, p in run["per_request_online"]], float)
        k = np.ones(WINDOW)
        alpha = np.convolve(acc, k, "valid") / np.maximum(np.convolve(prop, k, "valid"), 1)
        ax.plot(np.arange(WINDOW - 1, len(acc)), alpha, color=f"C{i}", label=name, lw=1.3)
        if i == 0:
            acc = np.array([a for a, _ in run["per_request_frozen"]], float)
            prop = np.array([p for _, p in run["per_request_frozen"]], float)
            alpha = np.convolve(acc, k, "valid") / np.maximum(np.convolve(prop, k, "valid"), 1)
            ax.plot(np.arange(WINDOW - 1, len(acc)), alpha, color="C7", ls="--", label="frozen")
    n = len(next(iter(runs.values()))["domains"])
    ax.axvspan(n - n // 3, n, color="k", alpha=0.06, label="last third (scored)")
    ax.set(
        xlabel="request",
        ylabel=f"α (trailing {WINDOW})",
        ylim=(0, 1),
        title=f"mixed stream {doc['config']['schedule']}",
    )
    ax.legend(fontsize=8, loc="lower right")
    domains = list(next(iter(runs.values()))["alpha_online_by_domain"])
    groups = [*domains, "all"]
    width = 0.8 / max(len(runs), 1)
    for i, (name, run) in enumerate(runs.items()):
        vals = [run["alpha_online_by_domain"][d] for d in domains] + [run["alpha_online"]]
        bx.bar(np.arange(len(groups)) + i * width, vals, width, color=f"C{i}", label=name)
    bx.set_xticks(np.arange(len(groups)) + width * (len(runs) - 1) / 2, groups)
    bx.set(ylabel="α, last third", ylim=(0, 1), title="α over the last third")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(runs: dict) -> dict:
    """Best mixture − shared (the goal: ≥ +0.05), each mixture variant against ``shared``."""
    base = runs.get("shared")
    out = {}
    if base is None:
        return out
    for name, run in runs.items():
        if name.startswith("mixture"):
            out[name] = run["alpha_online"] - base["alpha_online"]
    if out:
        out["ci95"] = {name: paired_ci(runs[name], base) for name in out}
        best = max((k for k in out if k != "ci95"), key=out.get)
        out["best"] = best
        out["goal_met"] = out[best] >= GOAL
    return out


def paired_ci(run: dict, base: dict, n: int = 2000, seed: int = 0) -> list[float]:
    """95 % interval of α(run) − α(base) over the last third, resampling the scored
    requests in pairs (a greedy stream: both runs served the same requests, same output)."""
    import numpy as np

    def tail(r):
        pr = np.array(r["per_request_online"], float)  # [n, 2] accepted, proposed
        return pr[len(pr) - len(pr) // 3 :]

    x, y = tail(run), tail(base)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        b = rng.integers(0, len(x), len(x))
        diffs.append(x[b, 0].sum() / max(x[b, 1].sum(), 1) - y[b, 0].sum() / max(y[b, 1].sum(), 1))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return [float(lo), float(hi)]


def print_summary(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    runs = doc["runs"]
    domains = list(next(iter(runs.values()))["alpha_online_by_domain"])
    table = Table(title="α over the last third of the mixed stream (online; frozen below)")
    for col in ("variant", *domains, "all", "vs shared", "promoted", "min"):
        table.add_column(col, justify="left" if col == "variant" else "right", no_wrap=True)
    base = runs.get("shared", {}).get("alpha_online")
    for name, r in runs.items():
        diff = "–" if base is None else f"{r['alpha_online'] - base:+.3f}"
        table.add_row(
            name,
            *(f"{r['alpha_online_by_domain'][d]:.3f}" for d in domains),
            f"{r['alpha_online']:.3f}",
            diff,
            f"{r['promoted']}/{r['published']}",
            f"{r['wall_s'] / 60:.1f}",
        )
    first = next(iter(runs.values()))
    table.add_row(
        "frozen",
        *(f"{first['alpha_frozen_by_domain'][d]:.3f}" for d in domains),
        f"{first['alpha_frozen']:.3f}",
        "",
        "",
        "",
    )
    con = Console(width=120)
    con.print(table)
    for name, r in runs.items():
        if "routing" in r:
            con.print(f"{name} routing (domain → adapter: records): {r['routing']['table']}")
            con.print(
                f"  top adapter by domain {r['routing']['top']}, purity "
                f"{r['routing']['purity']:.3f}, specialised: {r['routing']['specialised']}"
            )
    v = doc.get("verdict", {})
    if "best" in v:
        lo, hi = v["ci95"][v["best"]]
        con.print(
            f"best mixture {v['best']}: {v[v['best']]:+.3f} [{lo:+.3f}, {hi:+.3f}] vs shared "
            f"— goal ≥ +{GOAL}: {'met' if v['goal_met'] else 'NOT met'}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=", ".join(VARIANTS))
    ap.add_argument("--domains", default=DOMAINS, help="the mixture's adapters (and stream)")
    ap.add_argument("--schedule", default=None, help="default: stationary over --domains")
    ap.add_argument("--n", type=int, default=360, help="requests per run")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--steps-per-request", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: 3e-4 full, 1e-3 LoRA)"
    )
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="60 requests a run")
    ap.add_argument(
        "--append", action="store_true", help="keep the runs already in --json, (re)run these"
    )
    ap.add_argument("--json", type=Path, required=True, help="results (rewritten after each run)")
    ap.add_argument("--plot", type=Path, required=True)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.lr is not None and not args.lr > 0:
        ap.error(f"--lr must be > 0, got {args.lr}")
    if args.quick:
        args.n = 60
    if args.schedule is None:
        args.schedule = "stationary:" + ",".join(f"{d}=1" for d in args.domains.split(","))
    names = [v for v in args.variants.split(",") if v]
    for v in names:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    doc: dict = {"runs": {}, "config": config}
    if args.append and args.json.is_file():
        old = json.loads(args.json.read_text())
        doc["runs"] = {k: v for k, v in old["runs"].items() if k not in names}
        for run in doc["runs"].values():  # tables written before `top` was reported
            if "routing" in run and "top" not in run["routing"]:
                table = run["routing"]["table"]
                routes = [
                    (d, a) for d, row in table.items() for a, n in row.items() for _ in range(n)
                ]
                run["routing"] = routing_table(routes, list(table))
        earlier = old["config"].get("appended", [])
        earlier = [earlier] if isinstance(earlier, dict) else earlier
        appended = [*earlier, {**config, "variants": names}]
        doc["config"] = {**old["config"], "appended": appended}
    for name in names:
        print(f"· {name} ({args.n} requests) …", flush=True)
        doc["runs"][name] = run_one(name, args)
        doc["verdict"] = verdict(doc["runs"])
        args.json.write_text(json.dumps(doc) + "\n")
        plot(doc, args.plot)
    doc["verdict"] = verdict(doc["runs"])
    args.json.write_text(json.dumps(doc) + "\n")
    plot(doc, args.plot)
    print_summary(doc)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
