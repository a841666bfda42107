"""Does ``trainer.nice`` keep a trainer off the cores a replica wants?

A stand-in for a replica that uses every core of its node (``--threads``, default all of
them: torch matmuls, the shape of a batched decode step) runs alone, then beside a
stand-in trainer (one thread, fp32 forward + backward of a small MLP, in its own
process) at nice 0 and at the default nice 19 (:func:`osd.distill.budget.lower_thread_priority`),
interleaved over ``--rounds``. Prints the replica's matmuls/s in each phase and its ratio
to running alone, and the trainer's steps/s (what it still got done).

    python experiments/priority.py                # ≈ 1 min
    python experiments/priority.py --seconds 5 --rounds 3 --json priority.json

The trainer and this process are in one session, as a Ray node's workers are (Linux
weighs nice values only within a session: autogroups).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import torch


def _trainer(nice: int, stop, steps) -> None:
    from osd.distill.budget import lower_thread_priority

    torch.set_num_threads(1)
    lower_thread_priority(nice)
    net = torch.nn.Sequential(
        torch.nn.Linear(512, 2048), torch.nn.SiLU(), torch.nn.Linear(2048, 512)
    )
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(256, 512)
    while not stop.is_set():
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        with steps.get_lock():
            steps.value += 1


def _replica(seconds: float) -> float:
    """Matmuls a second: 32 rows through a 288 × 768 layer, as a batch-32 decode step."""
    x, w = torch.randn(32, 288), torch.randn(288, 768)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            x @ w
        n += 100
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="replica threads")
    ap.add_argument("--seconds", type=float, default=4.0, help="per phase")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ctx = mp.get_context("spawn")
    phases: list[dict] = []
    for r in range(args.rounds):
        for label, nice in (("alone", None), ("trainer nice 0", 0), ("trainer nice 19", 19)):
            stop, steps, proc = ctx.Event(), ctx.Value("l", 0), None
            if nice is not None:
                proc = ctx.Process(target=_trainer, args=(nice, stop, steps), daemon=True)
                proc.start()
                time.sleep(1.5)  # started and stepping
            start = steps.value
            rate = _replica(args.seconds)
            done = steps.value - start
            if proc is not None:
                stop.set()
                proc.join(10)
            phases.append(
                {
                    "round": r,
                    "phase": label,
                    "replica_per_s": rate,
                    "trainer_steps_per_s": done / args.seconds,
                }
            )
            print(
                f"round {r} {label:>16}: replica {rate:9.0f} matmuls/s, trainer {done / args.seconds:5.1f} steps/s"
            )
    rows = []
    for label in dict.fromkeys(p["phase"] for p in phases):
        ratios = [
            p["replica_per_s"] / a["replica_per_s"]
            for p in phases
            for a in phases
            if p["phase"] == label and a["phase"] == "alone" and a["round"] == p["round"]
        ]
        steps = [p["trainer_steps_per_s"] for p in phases if p["phase"] == label]
        rows.append(
            {
                "phase": label,
                "ratio_median": statistics.median(ratios),
                "ratios": ratios,
                "trainer_steps_per_s": statistics.median(steps),
            }
        )
        print(
            f"{label:>16}: replica {statistics.median(ratios):.2f}× of alone (median of {len(ratios)} rounds), "
            f"trainer {statistics.median(steps):.1f} steps/s"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "phases": phases, "threads": args.threads}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
