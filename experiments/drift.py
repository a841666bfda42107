"""How fast does each drafter family recover from drift, online vs frozen?

Every drafter family on three drift schedules, through the in-process online loop
(``osd online``: the same engine, record collector, trainer, gate and promotion as the Ray
application), each request decoded by the online drafter and replayed by the frozen one
on the same tokens:

- ``abrupt``  — ``switch:instruct>sql@N/3``: one domain, then another at once;
- ``gradual`` — ``gradual:instruct>sql@N/4-N/2``: a linear mix between the two;
- ``return``  — ``drift:instruct@N/3,sql@2N/3,instruct``: away and back again.

Per run: α over time (online and frozen), **time to recover** (requests after a shift
until α is back within 0.05 of its pre-shift level, :func:`osd.metrics.time_to_recover`,
a trailing window of 20), the **final gain** (online − frozen α over the last 50
requests), τ over the last 50 (tokens per target step; the same tokens, so online vs frozen
is a speed-up) and, on ``return``, **forgetting** (α on instruct at the end of its first
phase minus its first 30 requests after the return; > 0 means the online drafter forgot).

α alone misleads where the tree depth is not fixed: improved MCSD's first level is the
target's own token (always accepted, greedy) and its decision model cuts a poor draft's
trees right after it, so a useless draft scores α ≈ 1 at τ ≈ 1.

A family is a registered trainable drafter (``osd.drafters``) or a named configuration of
one (:data:`VARIANTS`): ``mcsd`` is improved MCSD, the draft model with a
target-initialised tree and the early-stop decision model (``experiments/mcsd.py``'s
"improved + decision"), trained online exactly as ``draft_model``.

    python experiments/drift.py --json drift.json --plot drift.png
    python experiments/drift.py --drafters draft_model,medusa --n 180 --json d.json --plot d.png
    python experiments/drift.py --drafters mcsd --n 150 --merge docs/drift.json \
        --json docs/drift.json --plot docs/drift.png

Writes ``{"runs": {"<family>/<schedule>": {...}}, "config": {...}}`` and a grid of α
curves (rows: families, columns: schedules). ``--merge FILE`` (repeatable) keeps the runs
of earlier result files made at the same settings — this invocation's runs replace those
of the same key — so families can be run separately (or in parallel, each to its own
``--json``) and combined; with ``--drafters ''`` it only merges and redraws. Runs are
independent and sequential; on a 2-core CPU one run of 240 requests takes 5–15 min.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

SCHEDULES = {
    "abrupt": lambda n: (f"switch:instruct>sql@{n // 3}", [n // 3]),
    "gradual": lambda n: (f"gradual:instruct>sql@{n // 4}-{n // 2}", [n // 4]),
    "return": lambda n: (
        f"drift:instruct@{n // 3},sql@{2 * n // 3},instruct",
        [n // 3, 2 * n // 3],
    ),
}
# families that are a configuration of a registered drafter: name → (drafter, its options)
VARIANTS: dict[str, tuple[str, dict]] = {
    # improved MCSD (experiments/mcsd.py, "improved + decision"): the target's argmax as the
    # first level, the 4,2,2 k-config drafted below it, trees cut by the decision model
    "mcsd": ("draft_model", {"tree": "1,4,2,2", "target_init": True, "early_stop": 0.5}),
    # Medusa's tree fixed at 32 nodes, as in the runs in docs/: its default ("auto") is
    # sized from this machine's timings, which would make the rows machine-dependent
    "medusa": ("medusa", {"nodes": 32}),
    "koala-medusa": ("koala-medusa", {"nodes": 32}),
}
FAMILIES = "draft_model,mcsd,medusa,koala-medusa,eagle,koala-eagle,recurrent"
WINDOW, BEFORE, LAST = 20, 30, 50
# settings every merged run must share (else their rows are not comparable)
SHARED = ("n", "max_new_tokens", "steps_per_request", "lr", "seed", "data_dir", "replay", "heads")
DEFAULTS = {"replay": 0, "heads": None}  # settings older result files predate


def family(name: str) -> tuple[str, dict]:
    """The registered drafter a family runs and its options.

    >>> family("mcsd")[0], family("koala-eagle")
    ('draft_model', ('koala-eagle', {}))
    """
    drafter, options = VARIANTS.get(name, (name, {}))
    return drafter, dict(options)


def ordered(names) -> list[str]:
    """Families in :data:`FAMILIES` order, any others after them (first seen first)."""
    known = FAMILIES.split(",")
    return sorted(dict.fromkeys(names), key=lambda n: known.index(n) if n in known else len(known))


def merge(doc: dict, paths: list[Path], args) -> list[str]:
    """Add the runs of the result files ``paths`` to ``doc`` (keys it holds win); their
    :data:`SHARED` settings must be this invocation's. Returns the families merged."""
    families = []
    for path in paths:
        old = json.loads(path.read_text())
        cfg = old.get("config", {})
        for key in SHARED:
            mine = getattr(args, key)
            mine = str(mine) if isinstance(mine, Path) else mine
            theirs = cfg.get(key, DEFAULTS.get(key))
            if theirs != mine:
                raise SystemExit(
                    f"{path}: runs made with {key}={theirs!r}, this run has {mine!r}; "
                    "rows at different settings cannot share a table"
                )
        for key, run in old["runs"].items():
            doc["runs"].setdefault(key, run)
            families.append(key.split("/")[0])
    return families


def summarise_run(rows, shifts: list[int], schedule: str) -> dict:
    """The figures of one run from its per-request log (``osd.online.RequestLog`` rows)."""
    from osd.metrics import pooled_alpha, time_to_recover
    from osd.online import frozen_counts, online_counts

    out: dict = {"shifts": shifts}
    for name, counts in (("online", online_counts), ("frozen", frozen_counts)):
        ends = [*shifts[1:], len(rows)]  # a phase's recovery is looked for within it
        out[f"recover_{name}"] = [
            time_to_recover(rows[:end], s, counts, window=WINDOW, before=BEFORE)
            for s, end in zip(shifts, ends, strict=True)
        ]
        out[f"alpha_last_{name}"] = pooled_alpha(rows[-LAST:], counts)
        steps = sum(getattr(r, f"steps_{name}") for r in rows[-LAST:])
        if steps:  # τ: tokens per target step (rows logged before steps were: none)
            out[f"tau_last_{name}"] = sum(r.emitted for r in rows[-LAST:]) / steps
        out[f"alpha_{name}"] = [pooled_alpha([r], counts) for r in rows]
    out["final_gain"] = (out["alpha_last_online"] or 0.0) - (out["alpha_last_frozen"] or 0.0)
    if schedule == "return":
        first_end, back = shifts[0], shifts[1]
        for name, counts in (("online", online_counts), ("frozen", frozen_counts)):
            was = pooled_alpha(rows[first_end - BEFORE : first_end], counts) or 0.0
            now = pooled_alpha(rows[back : back + BEFORE], counts) or 0.0
            out[f"forgetting_{name}"] = was - now
    out["domains"] = [r.domain for r in rows]
    out["versions"] = [r.version for r in rows]
    return out


def run_one(name: str, schedule: str, args) -> dict:
    import torch

    from osd.buffer import MemoryBuffer
    from osd.drafters import drafter_spec
    from osd.models import load_model, load_tokenizer
    from osd.online import REPLAY_DISTILL, OnlineConfig, run_online

    spec, shifts = SCHEDULES[schedule](args.n)
    drafter, options = family(name)
    if args.heads is not None and "heads" in drafter_spec(drafter).options():
        options["heads"] = str(args.heads / name)  # e.g. warm-started on prose + instruct
    torch.manual_seed(args.seed)
    target, draft = load_model("zoo:target", "cpu"), load_model("zoo:draft", "cpu")
    tok = load_tokenizer("zoo:target")
    distill = replace(REPLAY_DISTILL, replay=args.replay)
    if args.lr is not None:
        distill = replace(distill, lr=args.lr)
    cfg = OnlineConfig(
        drafter=drafter,
        drafter_options=options,
        schedule=spec,
        n=args.n,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        steps_per_request=args.steps_per_request,
        distill=distill,
    )
    t0 = time.perf_counter()
    result = run_online(target, draft, tok, MemoryBuffer(), cfg, data_dir=args.data_dir)
    run = summarise_run(result.requests, shifts, schedule)
    promoted = sum(bool(v["promoted"]) for v in result.versions)
    run.update(schedule_spec=spec, wall_s=time.perf_counter() - t0, promoted=promoted)
    if options:
        run.update(drafter=drafter, drafter_options=options)
    run["published"] = len(result.versions)
    run["replay"] = args.replay
    return run


def plot(runs: dict, drafters: list[str], schedules: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(
        len(drafters),
        len(schedules),
        figsize=(4.2 * len(schedules), 2.6 * len(drafters)),
        squeeze=False,
        sharey=True,
    )
    for i, d in enumerate(drafters):
        for j, s in enumerate(schedules):
            ax, run = axes[i][j], runs.get(f"{d}/{s}")
            ax.set_title(f"{d} · {s}", fontsize=9)
            if run is None:
                continue
            if "tau_last_online" in run:  # where α alone misleads (module docstring)
                tau = f"τ on/fr {run['tau_last_online']:.2f}/{run['tau_last_frozen']:.2f}"
                ax.set_title(f"{d} · {s} · {tau}", fontsize=9)
            for name, color in (("online", "C0"), ("frozen", "C7")):
                a = np.array([np.nan if x is None else x for x in run[f"alpha_{name}"]])
                k = np.ones(WINDOW) / WINDOW
                smooth = np.convolve(np.nan_to_num(a, nan=np.nanmean(a)), k, mode="valid")
                ax.plot(np.arange(WINDOW - 1, len(a)), smooth, color=color, label=name, lw=1.2)
            for sh in run["shifts"]:
                ax.axvline(sh, color="k", lw=0.6, ls="--")
            ax.set_ylim(0, 1)
            if i == len(drafters) - 1:
                ax.set_xlabel("request")
            if j == 0:
                ax.set_ylabel(f"α (trailing {WINDOW})")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(runs: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="drift: online vs frozen")
    cols = ("run", "recover online", "recover frozen", "final gain", "τ on/fr", "forgetting on/fr")
    for col in cols:
        table.add_column(col, justify="right" if col != "run" else "left", no_wrap=True)
    fmt = lambda xs: ", ".join("never" if x is None else str(x) for x in xs)  # noqa: E731
    for key, r in runs.items():
        forget = (
            f"{r['forgetting_online']:+.3f} / {r['forgetting_frozen']:+.3f}"
            if "forgetting_online" in r
            else "–"
        )
        table.add_row(
            key,
            fmt(r["recover_online"]),
            fmt(r["recover_frozen"]),
            f"{r['final_gain']:+.3f}",
            f"{r['tau_last_online']:.2f} / {r['tau_last_frozen']:.2f}"
            if "tau_last_online" in r
            else "–",
            forget,
        )
    Console().print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--drafters",
        default=FAMILIES,
        help=f"comma-separated families: trainable drafters or {', '.join(VARIANTS)}",
    )
    ap.add_argument("--schedules", default=",".join(SCHEDULES), help="abrupt,gradual,return")
    ap.add_argument("--n", type=int, default=240, help="requests per run")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--steps-per-request", type=int, default=2, help="trainer steps a request")
    ap.add_argument("--lr", type=float, default=None, help="default: osd online's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--replay", type=int, default=0, help="rehearsed earlier records per trainer step"
    )
    ap.add_argument(
        "--heads",
        type=Path,
        default=None,
        help="head families load DIR/<family> (osd heads train --domains … --out) instead "
        "of the zoo's heads",
    )
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, required=True, help="results (rewritten after each run)")
    ap.add_argument("--plot", type=Path, required=True)
    ap.add_argument(
        "--merge",
        type=Path,
        action="append",
        default=[],
        metavar="JSON",
        help="keep the runs of this earlier result file (repeatable; same settings)",
    )
    args = ap.parse_args()
    from osd.drafters import drafter_spec

    drafters = [d for d in args.drafters.split(",") if d]
    schedules = [s for s in args.schedules.split(",") if s]
    if not drafters and not args.merge:
        ap.error("no drafters to run and nothing to --merge")
    for d in drafters:
        try:
            if not drafter_spec(family(d)[0]).trainable:
                ap.error(f"drafter {d!r} has nothing to train online")
        except ValueError as err:
            ap.error(f"{err} (or a variant: {', '.join(VARIANTS)})")
    for s in schedules:
        if s not in SCHEDULES:
            ap.error(f"unknown schedule {s!r}; choose from {', '.join(SCHEDULES)}")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["merge"] = [str(p) for p in args.merge]
    merge({"runs": {}}, args.merge, args)  # settings checked before any run, not after
    new: dict = {}
    for d in drafters:
        for s in schedules:
            print(f"· {d} on {s} ({args.n} requests) …", flush=True)
            new[f"{d}/{s}"] = run_one(d, s, args)
            _write(new, drafters, schedules, config, args)
    if not drafters:
        _write(new, drafters, schedules, config, args)
    print_summary(json.loads(args.json.read_text())["runs"])
    print(f"wrote {args.json} and {args.plot}")


def _write(new: dict, drafters: list[str], schedules: list[str], config: dict, args) -> None:
    """The results so far, merged with ``--merge``'s, to ``--json``; the figure of them all."""
    doc: dict = {"runs": dict(new), "config": dict(config)}
    families = ordered([*drafters, *merge(doc, args.merge, args)])
    asked = schedules if drafters else []  # only merging: the schedules of the runs
    used = [s for s in SCHEDULES if s in asked or any(k.endswith(f"/{s}") for k in doc["runs"])]
    doc["runs"] = {
        f"{d}/{s}": doc["runs"][f"{d}/{s}"]
        for d in families
        for s in used
        if f"{d}/{s}" in doc["runs"]
    }
    doc["config"].update(drafters=",".join(families), schedules=",".join(used))
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc["runs"], families, used, args.plot)


if __name__ == "__main__":
    main()
