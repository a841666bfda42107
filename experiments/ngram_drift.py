"""Does the model-free drafter follow drift? The n-gram suffix tree with a history
(``osd.drafters.ngram``: what earlier requests generated is drafted for later ones) against
the same tree without one, on ``experiments/drift.py``'s three schedules.

Each request is decoded greedily by the engine with the history drafter (the "online" one:
it learns from every finished request, with no trainer), and the same output is replayed
by the drafter without a history (the "frozen" one: it sees only the request itself;
``osd.specdec.replay``, exact under greedy). Per schedule it reports α and τ over time,
**time to recover** after each shift (``osd.metrics.time_to_recover``, as drift.py), the
**final gain** (online − frozen α over the last 50 requests; and over the last 50 whose
prompt was new to the stream, since the schedules cycle each domain's queries and a
repeated prompt's output is recalled whole from the history) and, on ``return``,
**forgetting** (α on instruct at the end of its first phase minus its first 30 requests
after the return).

    python experiments/ngram_drift.py --json docs/ngram_drift.json --plot docs/ngram_drift.png
    python experiments/ngram_drift.py --target smollm2 --n 120 --json d.json --plot d.png

On the zoo target, 240 requests × 32 tokens take about half a minute a schedule here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from drift import SCHEDULES  # the same three schedules


@dataclass
class Row:
    domain: str
    accepted: int
    proposed: int
    steps: int
    emitted: int
    accepted_frozen: int
    proposed_frozen: int
    steps_frozen: int
    repeat: bool  # the same prompt came earlier in the stream (its output is in the history)


def _frozen(row: Row) -> tuple[int, int]:
    return row.accepted_frozen, row.proposed_frozen


def _tau(rows: list[Row], frozen: bool = False) -> float:
    """Tokens per target step over ``rows`` (the same tokens either way)."""
    steps = sum(r.steps_frozen if frozen else r.steps for r in rows)
    return sum(r.emitted for r in rows) / steps


def run_schedule(spec: str, shifts: list[int], args, target, tok, options: dict) -> dict:
    from osd.drafters import build_drafter
    from osd.metrics import alpha_windows, pooled_alpha, time_to_recover
    from osd.specdec.engine import SpeculativeDecoder
    from osd.specdec.replay import replay_greedy
    from osd.workloads.schedule import parse_schedule

    online = build_drafter("ngram", target, **options, history=args.history)
    frozen = build_drafter("ngram", target, **options)
    dec = SpeculativeDecoder(target, online, tok)
    dec.eos = set()  # every request generates max_new_tokens (as osd bench)
    rows: list[Row] = []
    seen: set[str] = set()
    for req in parse_schedule(spec, args.n, args.seed).build(data_dir=args.data_dir):
        ids = tok(req.query.prompt, add_special_tokens=False).input_ids[-args.prompt_tokens :]
        out = dec.generate(ids, max_new_tokens=args.max_new_tokens)
        fr = replay_greedy(frozen, ids + out.tokens, len(ids), max_depth=options["k"])
        s = out.stats
        repeat = req.query.prompt in seen
        seen.add(req.query.prompt)
        rows.append(
            Row(
                req.domain,
                s.accepted,
                s.proposed,
                s.steps,
                s.emitted,
                fr.accepted,
                fr.proposed,
                fr.steps,
                repeat,
            )
        )
    last = rows[-50:]
    novel = [r for r in rows if not r.repeat][-50:]
    run = {
        "schedule": spec,
        "shifts": shifts,
        "windows": [
            {
                "start": w.start,
                "domain": w.domain,
                "alpha_online": w.alpha,
                "alpha_frozen": pooled_alpha(w.rows, _frozen),
                "tau_online": _tau(w.rows),
                "tau_frozen": _tau(w.rows, frozen=True),
            }
            for w in alpha_windows(rows, args.window)
        ],
        "time_to_recover": {
            "online": [time_to_recover(rows, s) for s in shifts],
            "frozen": [time_to_recover(rows, s, _frozen) for s in shifts],
        },
        "final_gain": pooled_alpha(last) - pooled_alpha(last, _frozen),
        # the same over the last 50 requests whose prompt was new to the stream: what the
        # history gives beyond recalling a repeated request's output
        "final_gain_novel": pooled_alpha(novel) - pooled_alpha(novel, _frozen),
        "repeats": sum(r.repeat for r in rows),
        "tau_last50": {"online": _tau(last), "frozen": _tau(last, frozen=True)},
    }
    if len(shifts) == 2:  # return: instruct before the first shift and after the second
        before = pooled_alpha(rows[max(0, shifts[0] - 30) : shifts[0]])
        after = pooled_alpha(rows[shifts[1] : shifts[1] + 30])
        run["forgetting"] = before - after
    return run


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, (name, run) in zip(axes[0], runs.items(), strict=True):
        xs = [w["start"] for w in run["windows"]]
        ax.plot(xs, [w["alpha_online"] for w in run["windows"]], "o-", label="with history")
        ax.plot(xs, [w["alpha_frozen"] for w in run["windows"]], "s--", label="no history")
        for s in run["shifts"]:
            ax.axvline(s, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{name}: {run['schedule']}", fontsize=8)
        ax.set_xlabel("request")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("α (per window)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"n-gram suffix tree, {report['config']['target']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="zoo:target", help="target model (zoo:target, smollm2)")
    ap.add_argument("--schedules", default="abrupt,gradual,return", help="of drift.py's three")
    ap.add_argument("--n", type=int, default=240, help="requests per schedule")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=128, help="the prompt's last N tokens")
    ap.add_argument("--history", type=int, default=1 << 16, help="history tokens kept")
    ap.add_argument("--window", type=int, default=20, help="requests per α window")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--plot", type=Path, help="write the figure here (PNG)")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.schedules.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SCHEDULES))
    if unknown or args.n < 60:
        ap.error(f"schedules are {', '.join(SCHEDULES)} (got {unknown}); --n must be ≥ 60")

    from osd.models import load_model, load_tokenizer

    target, tok = load_model(args.target, "cpu"), load_tokenizer(args.target)
    options = {"k": 8, "nodes": 10}  # osd bench's "ours ngram tree"
    report = {"runs": {}, "config": {**vars(args), **options}}
    report["config"].update(json=str(args.json), plot=str(args.plot))
    for name in names:
        start = time.perf_counter()
        spec, shifts = SCHEDULES[name](args.n)
        run = run_schedule(spec, shifts, args, target, tok, options)
        run["seconds"] = time.perf_counter() - start
        report["runs"][name] = run
        print(
            f"{name:8s} {spec}: final gain {run['final_gain']:+.3f} "
            f"({run['final_gain_novel']:+.3f} on new prompts; {run['repeats']} repeats), τ last 50 "
            f"{run['tau_last50']['online']:.2f} vs {run['tau_last50']['frozen']:.2f}, "
            f"time to recover {run['time_to_recover']['online']} vs "
            f"{run['time_to_recover']['frozen']} (with vs without history)"
            + (f", forgetting {run['forgetting']:+.3f}" if "forgetting" in run else "")
            + f" [{run['seconds']:.0f} s]"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return report


if __name__ == "__main__":
    main()
