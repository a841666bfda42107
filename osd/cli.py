"""The ``osd`` command. Every sub-command has ``--help``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

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
console = Console()

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Folder of the shared data sets (default: $OSD_DATA_DIR, else ../shared/data).",
        show_default=False,
    ),
]


def _fail(msg: str) -> None:
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


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
    data_dir: DataDir = None,
) -> None:
    """Train the tokenizer, the target (all domains) and the draft (prose + instruct)."""
    from osd.models import ZOO_DIR
    from osd.zoo.build import PRESETS, build_zoo

    if preset not in PRESETS:
        _fail(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
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
            result = build_zoo(out, preset, data_dir=data_dir, seed=seed, progress=progress)
        except FileNotFoundError as err:
            _fail(str(err))
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
        _fail(str(err))
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
        _fail(str(err))
    console.print(table)
    for q in shown:
        console.rule(f"{q.domain} · {q.id}")
        console.print(q.prompt, markup=False, highlight=False)
        if q.reference:
            console.print(f"[dim]reference:[/dim] {q.reference[:300]}", highlight=False)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt text.")],
    target: Annotated[
        str, typer.Option(help="Target model: zoo:NAME, path or Hub id.")
    ] = "zoo:target",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass in (0, 1].")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Generate a continuation with the target alone (Hugging Face generate)."""
    import torch

    from osd.models import load_model, load_tokenizer

    if max_new_tokens <= 0:
        _fail(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        _fail(f"--temperature must be ≥ 0, got {temperature}")
    if not 0 < top_p <= 1:
        _fail(f"--top-p must be in (0, 1], got {top_p}")
    try:
        model, tok = load_model(target), load_tokenizer(target)
    except ValueError as err:
        _fail(str(err))
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] == 0:
        _fail("prompt is empty")
    torch.manual_seed(seed)
    sample = temperature > 0
    start = time.perf_counter()
    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        pad_token_id=tok.pad_token_id,
    )
    dt = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    console.print(prompt, end="", markup=False, highlight=False)
    console.print(tok.decode(out[0, ids.shape[1] :]), style="bold", markup=False, highlight=False)
    console.print(f"[dim]{new} tokens in {dt:.2f} s ({new / dt:.1f} tok/s), target only[/dim]")


if __name__ == "__main__":  # pragma: no cover
    app()
