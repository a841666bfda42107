"""What every ``osd`` sub-command module shares: the console, common options, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Folder of the shared data sets (default: $OSD_DATA_DIR, else ../shared/data).",
        show_default=False,
    ),
]


def fail(msg: str) -> None:
    """Print ``msg`` as an error and exit with status 2 (bad input)."""
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)
