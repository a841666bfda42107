"""The cluster commands of ``osd``: ``demo``, ``serve``, ``launch``, ``replay``.

Registered on the main app in ``osd/cli/main.py`` (``app.command()(demo)`` …). Ray, Serve and
HTTP live in ``osd.actors``, imported inside each command so that ``osd --help`` and the
library stay free of them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from osd.cli.common import DataDir, console, fail

__all__ = ["demo", "launch", "replay", "serve"]

log = logging.getLogger(__name__)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Topology YAML (see deploy/local.yaml); defaults to the built-in local topology.",
    ),
]
PortOpt = Annotated[int | None, typer.Option(help="HTTP port (overrides serve.port).")]
ReplicasOpt = Annotated[int | None, typer.Option(help="Serving replicas (serve.replicas).")]
TrainersOpt = Annotated[
    int | None, typer.Option(help="Trainer actors (trainer.count); 0 serves without learning.")
]
ApiKeyOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--api-key",
        envvar="OSD_API_KEY",
        help="Require 'Authorization: Bearer KEY' on /v1/* (serve.api_keys); repeat the flag "
        "or separate keys by commas (also $OSD_API_KEY) for several.",
    ),
]
MetricsAuthOpt = Annotated[
    bool | None,
    typer.Option("--metrics-auth/--no-metrics-auth", help="/metrics needs a key too."),
]
RedisOpt = Annotated[
    str | None,
    typer.Option(
        "--redis-url",
        help="Redis for the buffer and registry (default: $REDIS_URL, else a private "
        "redis-server on a Unix socket).",
    ),
]


def _config(path: Path | None, **overrides: Any):
    from osd.actors.config import load_config

    try:
        return load_config(path, **overrides)
    except (ValueError, TypeError) as err:
        fail(f"bad config: {err}")


def _keys(values: list[str] | None) -> list[str] | None:
    """``--api-key a --api-key b,c`` (or ``OSD_API_KEY="a,b"``) → ``[a, b, c]``."""
    keys = [k.strip() for v in values or [] for k in v.split(",") if k.strip()]
    return keys or None


def _wait_for_interrupt(what: str) -> None:
    """Block until Ctrl-C or SIGTERM (both arrive as KeyboardInterrupt)."""
    console.print(f"{what} — Ctrl-C to stop")
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(1.0)


def demo(
    n: Annotated[int, typer.Option(help="Requests in the drift replay.")] = 350,
    schedule: Annotated[
        str, typer.Option(help="Replay schedule; the last phase's domain is the drifted one.")
    ] = "drift:instruct@50,math@150,sql",
    max_tokens: Annotated[int, typer.Option(help="Tokens generated per request.")] = 32,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 2,
    seed: Annotated[int, typer.Option(help="Schedule seed.")] = 0,
    throughput_requests: Annotated[
        int, typer.Option(help="Requests per throughput phase (trainer paused / running).")
    ] = 16,
    target: Annotated[
        str | None,
        typer.Option(
            help="Target (overrides the topology's): e.g. smollm2, served with its zoo draft "
            "(`osd models get smollm2`, `osd zoo build --target smollm2`)."
        ),
    ] = None,
    drafter: Annotated[
        str | None,
        typer.Option(
            help="Drafter to serve and train online (drafter), e.g. medusa, eagle, "
            "koala-medusa (see `osd bench --help`); default: the topology's (draft_model)."
        ),
    ] = None,
    config: ConfigOpt = None,
    port: PortOpt = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results JSON here.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write the α / latency PNG here (default: next to --json).")
    ] = None,
    data_dir: DataDir = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Local Ray + private Redis + zoo models: a drift replay with online distillation and
    hot-swaps, a live table, then results (JSON + PNG)."""
    from osd.actors.demo import DemoConfig, run_demo
    from osd.drafters import drafter_spec
    from osd.models import default_draft

    real = {"target": target, "draft": default_draft(target)} if target else {}
    if drafter is not None:
        try:
            if not drafter_spec(drafter).trainable:
                fail(f"osd demo trains its drafter online; {drafter!r} has nothing to train")
        except ValueError as err:
            fail(str(err))
    keys = _keys(api_key)
    cfg = _config(
        config, **{"serve.port": port, "serve.api_keys": keys, "drafter": drafter, **real}
    )
    try:
        dcfg = DemoConfig(
            schedule=schedule,
            n=n,
            max_tokens=max_tokens,
            concurrency=concurrency,
            seed=seed,
            throughput_requests=throughput_requests,
        )
        if plot is None and json_out is not None:
            plot = json_out.with_suffix(".png")
        doc = run_demo(cfg, dcfg, json_out, plot, console, data_dir)
    except (ValueError, FileNotFoundError, TimeoutError) as err:
        fail(str(err))
    table = Table(title="osd demo · results")
    table.add_column("figure")
    table.add_column("value", justify="right")
    b = doc["alpha_gain_basis"]
    fmt = lambda x, f="{:.3f}": "–" if x is None else f.format(x)  # noqa: E731
    table.add_row("requests / failed", f"{doc['requests']} / {doc['failed']}")
    for g in doc["alpha_gain_by_domain"].values():
        if g["m"]:
            table.add_row(
                f"α {g['domain']} ({g['requests']} req.): first {g['m']} → last {g['m']}",
                f"{fmt(g['alpha_first'])} → {fmt(g['alpha_last'])}",
            )
    table.add_row(f"alpha_gain ({b['domain']}, m = {b['m']})", fmt(doc["alpha_gain"], "{:+.3f}"))
    promoted = sum(v["status"] in ("live", "retired") for v in doc["versions"][1:])
    table.add_row("versions published / promoted", f"{len(doc['versions']) - 1} / {promoted}")
    for did, part in doc.get("parts", {}).items():  # decision model, per-adapter mixture
        live, n = part["live_version"], len(part["versions"]) - 1
        table.add_row(
            f"{did}: published / live / adoptions", f"{n} / v{live} / {len(part['adoptions'])}"
        )
    table.add_row("swap pause p99", fmt(doc["swap_pause_ms_p99"], "{:.1f} ms"))
    table.add_row("throughput with trainer ÷ without", fmt(doc["throughput_ratio_with_trainer"]))
    table.add_row("wall time", f"{doc['wall_s']:.0f} s")
    console.print(table)
    for path in (json_out, plot):
        if path:
            console.print(f"wrote {path}")


def serve(
    config: ConfigOpt = None,
    port: PortOpt = None,
    replicas: ReplicasOpt = None,
    trainers: TrainersOpt = None,
    drafter: Annotated[
        str | None,
        typer.Option(
            help="Drafter by name (drafter): draft_model, ngram, medusa, eagle, koala-medusa, "
            "koala-eagle, … (see osd.drafters); one with nothing to train (ngram, none) starts "
            "no trainers."
        ),
    ] = None,
    max_batch: Annotated[
        int | None,
        typer.Option(help="Sequences stepped together per replica (serve.max_batch)."),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="Target (target), e.g. smollm2 with its zoo draft; a target with a chat "
            "template also answers POST /v1/chat/completions."
        ),
    ] = None,
    redis_url: RedisOpt = None,
    api_key: ApiKeyOpt = None,
    metrics_auth: MetricsAuthOpt = None,
) -> None:
    """Start the server alone on a local Ray (replicas + registry + trainers) and keep it up."""
    from osd.actors.cluster import launch as launch_cluster
    from osd.drafters import drafter_spec
    from osd.models import default_draft

    if drafter is not None and trainers is None:
        try:
            trainers = None if drafter_spec(drafter).trainable else 0
        except ValueError as err:
            fail(str(err))
    cfg = _config(
        config,
        **{
            "serve.port": port,
            "serve.replicas": replicas,
            "trainer.count": trainers,
            "drafter": drafter,
            "serve.max_batch": max_batch,
            "buffer.url": redis_url,
            "serve.api_keys": _keys(api_key),
            "serve.metrics_auth": metrics_auth,
            **({"target": target, "draft": default_draft(target)} if target else {}),
        },
    )
    try:
        cluster = launch_cluster(cfg)
    except (ValueError, TimeoutError, FileNotFoundError) as err:
        fail(str(err))
    try:
        _wait_for_interrupt(f"serving {cfg.model_name!r} at {cluster.url}/v1/completions")
    finally:
        cluster.shutdown()


def launch(
    config: ConfigOpt = None,
    address: Annotated[
        str | None,
        typer.Option(help="Existing Ray cluster (ray://host:10001, auto); default $RAY_ADDRESS."),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(help="Stay in the foreground (default: only when Ray was started here)."),
    ] = False,
    down: Annotated[
        bool, typer.Option("--down", help="Tear the topology down instead of starting it.")
    ] = False,
    api_key: ApiKeyOpt = None,
) -> None:
    """Deploy an explicit topology (replicas, trainers, drafter, loss, buffer) on a cluster;
    named actors and the Serve app outlive this command when joining an existing cluster."""
    import ray

    from osd.actors.cluster import Cluster, start_ray
    from osd.actors.cluster import launch as launch_cluster

    cfg = _config(config, **{"serve.api_keys": _keys(api_key)})
    if down:
        start_ray(address)
        Cluster(cfg, None, [], "").shutdown(keep_ray=True)
        console.print("stopped the osd app, registry and trainers")
        return
    detached = bool(address or os.environ.get("RAY_ADDRESS"))
    try:
        cluster = launch_cluster(cfg, address=address, detached=detached)
    except (ValueError, TimeoutError, FileNotFoundError) as err:
        fail(str(err))
    console.print(
        f"osd up at {cluster.url}: {cfg.serve.replicas} replica(s), {cfg.trainer.count} "
        f"trainer(s), drafter {cfg.drafter} ({cfg.trainer.distill.loss}"
        f"{', LoRA' if cfg.trainer.distill.lora else ''}), startup {cluster.timings}"
    )
    if cluster.started_ray or wait:
        try:
            _wait_for_interrupt("running")
        finally:
            cluster.shutdown()
    else:
        ray.shutdown()  # detached actors and the Serve app stay up


def replay(
    schedule: Annotated[
        str, typer.Option(help="Replay schedule, e.g. 'drift:instruct@50,math|poisson:2'.")
    ],
    url: Annotated[str, typer.Option(help="Server base URL.")] = "http://127.0.0.1:8000",
    n: Annotated[int, typer.Option(help="Requests.")] = 100,
    seed: Annotated[int, typer.Option(help="Schedule seed.")] = 0,
    model: Annotated[str, typer.Option(help="Model id sent with each request.")] = "osd",
    max_tokens: Annotated[int, typer.Option(help="Tokens per request.")] = 32,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at most.")] = 2,
    window: Annotated[int, typer.Option(help="Requests per α window.")] = 25,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write per-request results here.")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the α / latency PNG here.")] = None,
    data_dir: DataDir = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Send a workload schedule to /v1/completions at its arrival times; record latency,
    tokens, α and drafter version per request."""
    from dataclasses import replace

    from osd.actors.replay import ReplayConfig, plot_replay, to_json
    from osd.actors.replay import replay as run_replay
    from osd.workloads.schedule import parse_schedule

    try:
        reqs = parse_schedule(schedule, n, seed).build(data_dir=data_dir)
        cfg = ReplayConfig(url.rstrip("/"), model, max_tokens, temperature, concurrency)
        cfg = replace(cfg, api_key=next(iter(_keys(api_key) or []), None))
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    start = time.perf_counter()
    done = [0]

    def progress(rec) -> None:
        done[0] += 1
        if rec.error:
            log.warning("request %d: %s", rec.index, rec.error)

    with console.status("replaying …") as status:

        def on_result(rec) -> None:
            progress(rec)
            status.update(f"replaying … {done[0]}/{len(reqs)}")

        records = run_replay(reqs, cfg, on_result)
    doc = to_json(records, window)
    s = doc["summary"]
    table = Table(title=f"replay · {n} requests · {time.perf_counter() - start:.0f} s")
    for col in ("domain", "requests", "α"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for d, a in s["alpha_by_domain"].items():
        table.add_row(d, str(s["requests_by_domain"][d]), "–" if a is None else f"{a:.3f}")
    console.print(table)
    console.print(
        f"{s['failed']} failed · {s['tokens_per_s']:.1f} tok/s · latency p50 "
        f"{(s['latency_p50_s'] or 0):.2f} s, p99 {(s['latency_p99_s'] or 0):.2f} s · versions "
        f"{s['versions_seen']}"
    )
    if json_out:
        json_out.write_text(json.dumps(doc, indent=2) + "\n")
        console.print(f"wrote {json_out}")
    if plot:
        plot_replay(records, plot, window, title=f"replay · {schedule}")
        console.print(f"wrote {plot}")
    if s["failed"]:
        raise typer.Exit(1)
