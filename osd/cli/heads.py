"""``osd heads train``: the offline warm start of the head drafters (see
:mod:`osd.distill.heads_train`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

heads_app = typer.Typer(
    help="Draft heads (Medusa, EAGLE-style, KOALA, ReDrafter).", no_args_is_help=True
)


@heads_app.command("train")
def heads_train(
    kind: Annotated[str, typer.Option(help="medusa, eagle or recurrent.")] = "medusa",
    layers: Annotated[int, typer.Option(help="KOALA's K: layers per head (1 = original).")] = 1,
    adversarial: Annotated[
        bool, typer.Option(help="KOALA's adversarial training (a discriminator).")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder (default: the zoo's heads/<name>, name = kind or koala-kind)."
        ),
    ] = None,
    target: Annotated[str, typer.Option(help="The frozen target.")] = "zoo:target",
    prompts: Annotated[int, typer.Option(help="Train prompts per domain.")] = 300,
    domains: Annotated[
        str,
        typer.Option(
            help="Comma-separated domains whose prompts the target continues, or 'all'. A "
            "drift study warm-starts on a subset (e.g. prose,instruct, as the zoo draft) so "
            "the others are new to the heads."
        ),
    ] = "all",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens the target generates each.")] = 64,
    epochs: Annotated[int, typer.Option(help="Passes over the generated data.")] = 4,
    heads: Annotated[int, typer.Option(help="Medusa: number of heads.")] = 4,
    length: Annotated[int, typer.Option(help="Recurrent: the next L tokens trained.")] = 5,
    loss: Annotated[
        str, typer.Option(help="Recurrent: soft (KL to the target's top-k) or hard (argmax CE).")
    ] = "soft",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    data_dir: Annotated[Path | None, typer.Option(help="Data sets folder.")] = None,
) -> None:
    """Self-distil heads on the frozen target's own generations of train prompts."""
    from rich.progress import Progress

    from osd.distill.heads_train import HeadTrainConfig, train_heads
    from osd.drafters.heads import HEAD_KINDS, heads_dir
    from osd.models import load_model, load_tokenizer
    from osd.workloads.datasets import parse_domains

    if kind not in HEAD_KINDS:
        raise typer.BadParameter(f"--kind must be one of {', '.join(HEAD_KINDS)}")
    if layers < 1:
        raise typer.BadParameter("--layers must be >= 1")
    if loss not in ("soft", "hard"):
        raise typer.BadParameter("--loss must be soft or hard")
    try:
        parse_domains(domains)
    except ValueError as err:
        raise typer.BadParameter(f"--domains: {err}") from None
    koala = kind != "recurrent" and (layers > 1 or adversarial)
    name = f"koala-{kind}" if koala else kind
    out = out or heads_dir(name)
    cfg = HeadTrainConfig(
        kind=kind,
        layers=layers,
        adversarial=adversarial,
        num_heads=heads,
        prompts_per_domain=prompts,
        domains=domains,
        max_new_tokens=max_new_tokens,
        epochs=epochs,
        seed=seed,
        length=length,
        target_loss=loss,
    )
    model, tok = load_model(target, "cpu"), load_tokenizer(target)
    with Progress(transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, i: int, n: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=n)
            bar.update(tasks[stage], completed=i)

        _, hc, info = train_heads(model, tok, cfg, out, data_dir, progress)
    typer.echo(
        json.dumps(
            {
                "out": str(out),
                "kind": kind,
                "layers": layers,
                "adversarial": adversarial,
                "val_loss_before": round(info["val_loss_before"], 4),
                "val_loss_after": round(info["val_loss_after"], 4),
                "top1_accuracy": [row[0] for row in hc.accuracy],
            }
        )
    )
