"""``osd bench``: decoding (batch 1, every drafter against the target alone and Hugging
Face) and serving (concurrency sweeps through the continuous-batching loop) benchmarks.

Registered on the main app in ``osd/cli/main.py`` (``app.command()(bench)``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from osd.cli.common import DataDir, console, fail

__all__ = ["bench"]


def bench(
    workload: Annotated[str, typer.Option(help="Comma-separated domains, or 'all'.")] = "all",
    n: Annotated[int, typer.Option(help="Eval prompts per domain.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt.")] = 64,
    k: Annotated[int, typer.Option(help="Draft length for the chain methods.")] = 4,
    drafters: Annotated[
        str | None,
        typer.Option(
            "--drafters",
            "--drafter",
            help="Drafters by name, comma-separated (see osd.drafters): the decode bench runs "
            "each one's variants (default draft_model,ngram); --serving takes one (default "
            "draft_model, a chain of --k).",
        ),
    ] = None,
    serving: Annotated[
        bool,
        typer.Option(
            "--serving",
            help="Benchmark the serving loop instead: tokens/s and latency at each "
            "--concurrency, every prompt once per level.",
        ),
    ] = False,
    concurrency: Annotated[
        str, typer.Option(help="--serving: concurrent clients per level, e.g. 1,8,32.")
    ] = "1,8,32",
    max_batch: Annotated[
        int | None,
        typer.Option(help="--serving: the loop's max batch (default: the highest concurrency)."),
    ] = None,
    requests: Annotated[
        int | None,
        typer.Option(
            help="--serving: requests per level, the prompts cycled (default: every prompt "
            "once and at least 4 per client of the highest level, so batches run full)."
        ),
    ] = None,
    adaptive: Annotated[
        bool,
        typer.Option(
            "--adaptive",
            help="--serving: the load-aware controller picks the draft depth each step "
            "(up to --k; 0 = speculation off) from measured costs and the batch size.",
        ),
    ] = False,
    rounds: Annotated[
        int,
        typer.Option(
            help="--serving: run the levels this many times in turn (1, 8, 32, 1, 8, 32, …) "
            "and pool each level's requests, so a machine whose speed drifts during the run "
            "biases no level; per-round figures are in the JSON."
        ),
    ] = 1,
    target: Annotated[
        str, typer.Option(help="Target model: zoo:target, smollm2 (see `osd models`), a path.")
    ] = "zoo:target",
    draft: Annotated[
        str | None,
        typer.Option(help="Draft model (ours and HF assisted; default: the target's zoo draft)."),
    ] = None,
    verify_costs: Annotated[
        bool,
        typer.Option(
            "--verify-costs", help="Also measure c_verify(n) ÷ c(1) for n = 1…17 (batch 1)."
        ),
    ] = False,
    threads: Annotated[
        int | None, typer.Option(help="torch intra-op threads (default: torch's choice).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = (
        None
    ),
    data_dir: DataDir = None,
) -> None:
    """Target-only vs HF assisted generation vs our drafters, one process, same prompts;
    or, with --serving, the serving loop's throughput at several concurrencies."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    names = [s.strip() for s in drafters.split(",") if s.strip()] if drafters else None
    from osd.cli.models import real_bench_defaults

    draft, names = real_bench_defaults(target, draft, names, serving)
    if serving:
        rep = _bench_serving(
            workload,
            n,
            max_new_tokens,
            k,
            names,
            concurrency,
            max_batch,
            target,
            draft,
            data_dir,
            requests,
            adaptive,
            rounds,
        )
    else:
        rep = _bench_decode(workload, n, max_new_tokens, k, names, target, draft, data_dir)
        if verify_costs:
            from osd.cli.models import print_verify_costs

            rep["verify_costs"] = print_verify_costs(target)
    if json_out:
        json_out.write_text(json.dumps(rep, indent=2) + "\n")
        console.print(f"wrote {json_out}")


def _bench_decode(workload, n, max_new_tokens, k, names, target, draft, data_dir) -> dict:
    from osd.bench.decode import DEFAULT_DRAFTERS, default_methods, run_bench

    with Progress(
        TextColumn("bench"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} prompts"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("bench", total=None)
        try:
            rep = run_bench(
                target,
                draft,
                workload,
                n=n,
                max_new_tokens=max_new_tokens,
                k=k,
                methods=default_methods(k, names or DEFAULT_DRAFTERS),
                data_dir=data_dir,
                progress=lambda i, t: bar.update(task, completed=i, total=t),
            )
        except (ValueError, FileNotFoundError) as err:
            fail(str(err))
    table = Table(
        title=f"osd bench · {rep['prompts']} prompts × {max_new_tokens} tokens, greedy, one process"
    )
    for col in ("method", "tok/s", "speedup", "α", "τ", "SoL", "= target"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, r in rep["methods"].items():
        fmt = lambda key, r=r: f"{r[key]:.2f}" if r.get(key) is not None else "–"  # noqa: E731
        table.add_row(
            name,
            f"{r['tokens_per_s']:.1f}",
            f"{r['speedup']:.2f}×",
            fmt("alpha"),
            fmt("tau"),
            fmt("speed_of_light"),
            f"{r['matches_target']}/{r['prompts']}",
        )
    console.print(table)
    return rep


def _bench_serving(
    workload,
    n,
    max_new_tokens,
    k,
    names,
    concurrency,
    max_batch,
    target,
    draft,
    data_dir,
    requests=None,
    adaptive=False,
    rounds=1,
) -> dict:
    from osd.bench.serving import ServingBenchConfig, parse_levels, run_serving_bench

    if names and len(names) > 1:
        fail(f"--serving compares concurrencies for one drafter; got {', '.join(names)}")
    try:
        cfg = ServingBenchConfig(
            concurrency=parse_levels(concurrency),
            n=n,
            max_new_tokens=max_new_tokens,
            domains=workload,
            drafter=names[0] if names else "draft_model",
            k=k,
            target=target,
            draft=draft,
            max_batch=max_batch,
            requests=requests,
            adaptive=adaptive,
            rounds=rounds,
        ).validate()
    except ValueError as err:
        fail(str(err))
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} requests"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        tasks = {
            c: bar.add_task(f"concurrency {c}", total=None, start=False) for c in cfg.concurrency
        }

        def progress(c: int, done: int, total: int) -> None:
            if done == 0:
                bar.start_task(tasks[c])  # elapsed time counts from the level's start
            bar.update(tasks[c], completed=done, total=total)

        try:
            rep = run_serving_bench(cfg, data_dir, progress)
        except (ValueError, FileNotFoundError, RuntimeError) as err:
            fail(str(err))
    table = Table(
        title=f"osd bench --serving · {rep['requests_per_level']} requests × "
        f"{max_new_tokens} tokens per level, drafter {cfg.drafter}, greedy, max batch "
        f"{rep['max_batch']}, {rep['device']}"
    )
    cols = ("concurrency", "tok/s", "× c=1", "p50 s", "p99 s", "batch", "depth", "α", "τ", "= c=1")
    for col in cols:
        table.add_column(col, justify="right")
    for lv in rep["serving"]:
        ratio = lv.get("ratio_vs_c1")
        match = lv.get("matches_c1")
        table.add_row(
            str(lv["concurrency"]),
            f"{lv['tokens_per_s']:.1f}",
            "–" if ratio is None else f"{ratio:.2f}×",
            f"{lv['p50_s']:.2f}",
            f"{lv['p99_s']:.2f}",
            f"{lv['mean_batch']:.1f}",
            f"{lv['mean_depth']:.1f}",
            f"{lv['alpha']:.2f}",
            f"{lv['tau']:.2f}",
            "–" if match is None else f"{match}/{lv['requests']}",
        )
    console.print(table)
    return rep
