"""The ``osd`` command. Every sub-command has ``--help``."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from osd.cli.common import DataDir, console, fail

app = typer.Typer(
    help="OSD: online speculative decoding — serve with speculative decoding and keep "
    "distilling the drafts from the traffic served.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
zoo_app = typer.Typer(help="The tiny model zoo shipped with the package.", no_args_is_help=True)
workloads_app = typer.Typer(help="Real-data workloads and replay schedules.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
app.add_typer(workloads_app, name="workloads")


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # SIGTERM → SystemExit, so `finally` blocks and atexit hooks run (an embedded
    # redis-server is stopped, temp dirs removed) when a job is killed politely
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@zoo_app.command("build")
def zoo_build(
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder (default: the package's zoo, replacing the shipped models)."
        ),
    ] = None,
    preset: Annotated[str, typer.Option(help="Size preset: default or micro.")] = "default",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    only: Annotated[
        str | None,
        typer.Option(
            help="'draft': rebuild only the draft, from the tokenizer and target already in --out."
        ),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="A real target (smollm2): distil only a draft for it, into the model cache "
            "as zoo:NAME-draft (see `osd models`)."
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="--target: training steps (default 150).")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Train the tokenizer, the target (all domains) and the draft (prose + instruct);
    with --target, only a draft for that real target."""
    from osd.models import ZOO_DIR
    from osd.zoo.build import PRESETS, build_zoo

    if target is not None:
        from osd.cli.models import build_real_draft

        return build_real_draft(target, out, seed, steps, data_dir)
    if preset not in PRESETS:
        fail(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    out = out or ZOO_DIR
    start = time.perf_counter()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, step: int, total: int, loss: float) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"train {stage}", total=total, loss=float("nan"))
            bar.update(tasks[stage], completed=step, loss=loss)

        console.print(f"building zoo preset [bold]{preset}[/bold] into {out} …")
        try:
            result = build_zoo(
                out, preset, data_dir=data_dir, seed=seed, progress=progress, only=only
            )
        except FileNotFoundError as err:
            fail(str(err))
    console.print(
        f"done in {time.perf_counter() - start:.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    )


@zoo_app.command("report")
def zoo_report_cmd(
    target: Annotated[str, typer.Option(help="Target model.")] = "zoo:target",
    draft: Annotated[str, typer.Option(help="Draft model.")] = "zoo:draft",
    n: Annotated[int, typer.Option(help="Eval queries per domain for perplexity.")] = 50,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Held-out perplexity per domain, parameter counts and decode cost of target vs draft."""
    from osd.workloads.datasets import DOMAINS
    from osd.zoo.report import zoo_report

    try:
        rep = zoo_report(target, draft, n=n, data_dir=data_dir)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    table = Table(title="zoo report (perplexity on held-out eval split)")
    table.add_column("model")
    table.add_column("params", justify="right")
    table.add_column("decode ms/token", justify="right")
    for d in DOMAINS:
        table.add_column(f"ppl {d}", justify="right")
    for role in ("target", "draft"):
        r = rep[role]
        table.add_row(
            role,
            f"{r['params'] / 1e6:.2f}M",
            f"{r['decode_ms']:.2f}",
            *(f"{r['ppl'][d]:.2f}" for d in DOMAINS),
        )
    console.print(table)
    console.print(f"cost ratio (target ÷ draft decode step): [bold]{rep['cost_ratio']:.2f}×[/bold]")
    if json_out:
        json_out.write_text(json.dumps(rep, indent=2) + "\n")
        console.print(f"wrote {json_out}")


@workloads_app.command("show")
def workloads_show(
    domains: Annotated[str, typer.Option(help="Comma-separated domains, or 'all'.")] = "all",
    examples: Annotated[int, typer.Option(help="Examples printed per domain.")] = 1,
    data_dir: DataDir = None,
) -> None:
    """Counts per domain and split, and example queries."""
    from osd.workloads.datasets import load_domain, parse_domains

    try:
        names = parse_domains(domains)
        table = Table(title="workloads")
        for col in ("domain", "train", "eval", "mean prompt chars", "with reference"):
            table.add_column(col, justify="right" if col != "domain" else "left")
        shown = []
        for d in names:
            train, ev = load_domain(d, "train", data_dir), load_domain(d, "eval", data_dir)
            mean = sum(len(q.prompt) for q in ev) / max(len(ev), 1)
            refs = sum(q.reference is not None for q in ev)
            table.add_row(d, str(len(train)), str(len(ev)), f"{mean:.0f}", f"{refs}/{len(ev)}")
            shown.extend(ev[:examples])
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    console.print(table)
    for q in shown:
        console.rule(f"{q.domain} · {q.id}")
        console.print(q.prompt, markup=False, highlight=False)
        if q.reference:
            console.print(f"[dim]reference:[/dim] {q.reference[:300]}", highlight=False)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt text.")],
    target: Annotated[str, typer.Option(help="Target model: zoo:NAME, path or Hub id.")] = (
        "zoo:target"
    ),
    drafter: Annotated[
        str, typer.Option(help="Drafter by name: none, draft_model, ngram (see osd.drafters).")
    ] = "draft_model",
    draft: Annotated[
        str | None,
        typer.Option(
            help="Draft model for --drafter draft_model (default: the target's zoo draft)."
        ),
    ] = None,
    k: Annotated[int, typer.Option(help="Draft length (chain).")] = 4,
    tree: Annotated[
        str | None, typer.Option(help="MCSD k-config tree, e.g. 4,2,2 (overrides --k).")
    ] = None,
    adaptive: Annotated[
        bool,
        typer.Option(help="Adapt the chain length to measured costs and acceptance (up to --k)."),
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Top-k sampling (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass in (0, 1].")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    typical: Annotated[
        bool,
        typer.Option(
            help="LOSSY Medusa typical acceptance at T > 0 "
            "(output no longer follows the target's "
            "distribution)."
        ),
    ] = False,
) -> None:
    """Generate with speculative decoding; prints the text and acceptance statistics."""
    from osd.drafters import build_drafter, drafter_spec
    from osd.models import load_model, load_tokenizer
    from osd.specdec.controller import SpeculationController
    from osd.specdec.engine import SpeculativeDecoder
    from osd.specdec.sampling import SamplingParams

    try:
        from osd.models import default_draft

        sampling = SamplingParams(temperature, top_k, top_p, seed)
        model, tok = load_model(target), load_tokenizer(target)
        draft = draft or default_draft(target)
        draft_model = load_model(draft) if drafter_spec(drafter).needs_draft else None
        dec = SpeculativeDecoder(
            model,
            build_drafter(drafter, model, draft_model, lenient=True, k=k, tree=tree),
            tok,
            controller=SpeculationController(k_max=k) if adaptive else None,
        )
        start = time.perf_counter()
        out = dec.generate(prompt, max_new_tokens=max_new_tokens, sampling=sampling)
    except ValueError as err:
        fail(str(err))
    dt = time.perf_counter() - start
    console.print(prompt, end="", markup=False, highlight=False)
    console.print(out.text, style="bold", markup=False, highlight=False)
    s = out.stats
    console.print(
        f"[dim]{len(out.tokens)} tokens in {dt:.2f} s ({len(out.tokens) / dt:.1f} "
        f"tok/s) · drafter {drafter} · α {s.alpha:.2f} · τ {s.tau:.2f} · "
        f"{s.steps} target steps · stop: {out.finish_reason}[/dim]"
    )


@app.command()
def online(
    schedule: Annotated[
        str, typer.Option(help="Replay schedule, e.g. 'drift:instruct@100,math@350,sql'.")
    ] = ("drift:instruct@100,math@350,sql"),
    n: Annotated[int, typer.Option(help="Requests in the stream.")] = 600,
    loss: Annotated[str, typer.Option(help="fkl, rkl, jsd, tvd or ce.")] = "fkl",
    lora: Annotated[bool, typer.Option(help="Train LoRA adapters instead of the full draft.")] = (
        False
    ),
    lr: Annotated[
        float | None, typer.Option(help="Learning rate (default: 3e-4 full fine-tune, 1e-3 LoRA).")
    ] = None,
    target_name: Annotated[
        str,
        typer.Option(
            "--target",
            help="Target: zoo:target or smollm2 (`osd models get smollm2`; its draft from "
            "`osd zoo build --target smollm2`).",
        ),
    ] = "zoo:target",
    k: Annotated[int, typer.Option(help="Draft length.")] = 4,
    drafter: Annotated[
        str,
        typer.Option(help="A trainable drafter: draft_model, medusa, eagle, koala-…, recurrent."),
    ] = "draft_model",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per request.")] = 48,
    steps_per_request: Annotated[int, typer.Option(help="Trainer steps after each request.")] = 2,
    replay: Annotated[
        int,
        typer.Option(
            help="Rehearsal: records from a reservoir of earlier ones added to each trainer "
            "step (0: off), against forgetting a domain the traffic comes back to."
        ),
    ] = 0,
    early_stop: Annotated[
        float | None,
        typer.Option(
            help="Early-stop threshold (draft_model, eagle, recurrent): the decision model is "
            "trained from the stream, gated and hot-swapped as 'draft-stop'."
        ),
    ] = None,
    heads: Annotated[
        Path | None,
        typer.Option(
            help="Head drafters: the heads' folder (default: the zoo's), e.g. heads trained "
            "by `osd heads train --domains prose,instruct --out DIR` for a drift study."
        ),
    ] = None,
    log_mode: Annotated[str, typer.Option(help="all or rejected (OSD).")] = "all",
    seed: Annotated[int, typer.Option(help="Schedule seed.")] = 0,
    redis_url: Annotated[
        str | None,
        typer.Option(help="Redis URL (default: $REDIS_URL, else a private embedded redis-server)."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the α plot (PNG) here.")] = None,
    data_dir: DataDir = None,
) -> None:
    """In-process online loop on a drift stream: online vs frozen draft α per window."""
    from dataclasses import replace

    import torch

    from osd.buffer import RedisStreamBuffer, connect
    from osd.metrics import pooled_alpha
    from osd.models import load_model, load_tokenizer
    from osd.online import (
        REPLAY_DISTILL,
        OnlineConfig,
        frozen_counts,
        online_counts,
        plot_online,
        run_online,
    )

    try:
        cfg = OnlineConfig(
            drafter=drafter,
            drafter_options={
                **({} if early_stop is None else {"early_stop": early_stop}),
                **({} if heads is None else {"heads": str(heads)}),
            },
            schedule=schedule,
            n=n,
            seed=seed,
            k=k,
            max_new_tokens=max_new_tokens,
            distill=replace(REPLAY_DISTILL, loss=loss, lora=lora, lr=lr, replay=replay),
            log_mode=log_mode,
            steps_per_request=steps_per_request,
        )
    except ValueError as err:
        fail(str(err))
    torch.manual_seed(seed)
    from osd.models import default_draft

    try:
        target = load_model(target_name, "cpu")
        draft = load_model(default_draft(target_name), "cpu")
        tok = load_tokenizer(target_name)
    except ValueError as err:
        fail(str(err))
    client, server = connect(redis_url)
    try:
        buffer = RedisStreamBuffer(client, maxlen=cfg.maxlen)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("online", total=n)

            def progress(entry, result):
                w = result.requests[-cfg.window :]
                on = pooled_alpha(w, online_counts) or 0.0
                fr = pooled_alpha(w, frozen_counts) or 0.0
                bar.update(
                    task,
                    advance=1,
                    description=(
                        f"{entry.domain:8s} v{entry.version} α online {on:.2f} frozen {fr:.2f} "
                        f"steps {result.trainer_steps}"
                    ),
                )

            result = run_online(
                target, draft, tok, buffer, cfg, data_dir=data_dir, progress=progress
            )
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    finally:
        if server is not None:
            server.stop()
    rep = result.to_json()
    table = Table(title=f"online distillation · {loss}{' LoRA' if lora else ''} · {schedule}")
    for col in ("domain", "requests", "α online", "α frozen", "gain"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for d, g in rep["by_domain"].items():
        table.add_row(
            d,
            str(g["requests"]),
            f"{g['alpha_online']:.3f}",
            f"{g['alpha_frozen']:.3f}",
            f"{g['gain']:+.3f}",
        )
    console.print(table)
    promoted = sum(v["promoted"] for v in rep["versions"])
    console.print(
        f"{len(rep['versions'])} versions published, {promoted} promoted; "
        f"{rep['bytes_per_position']:.1f} bytes per logged position "
        f"({100 * rep['bytes_ratio']:.2f}% of full-vocab fp16)"
    )
    if rep["decision_versions"]:
        dv = rep["decision_versions"]
        wasted = sum(r.proposed_online - r.accepted_online for r in result.requests)
        console.print(
            f"decision model: {len(dv)} versions published, "
            f"{sum(v['promoted'] for v in dv)} promoted; {wasted} wasted draft tokens"
        )
    if json_out:
        json_out.write_text(json.dumps(rep, indent=2) + "\n")
        console.print(f"wrote {json_out}")
    if plot:
        plot_online(result, plot)
        console.print(f"wrote {plot}")


from osd.cli.bench import bench  # noqa: E402
from osd.cli.cluster import demo, launch, replay, serve  # noqa: E402  (Ray imported lazily)

app.command()(bench)

app.command()(demo)
app.command()(serve)
app.command()(launch)
app.command()(replay)

from osd.cli.models import models_app  # noqa: E402

app.add_typer(models_app, name="models")

from osd.cli.heads import heads_app  # noqa: E402

app.add_typer(heads_app, name="heads")


if __name__ == "__main__":  # pragma: no cover
    app()
