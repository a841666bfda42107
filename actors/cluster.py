"""Bring up (and tear down) one OSD topology on Ray: Redis, registry, trainers, Serve app.

>>> cluster = launch(ClusterConfig())       # doctest: +SKIP  (local Ray, private Redis)
>>> cluster.url                             # doctest: +SKIP
'http://127.0.0.1:8000'
>>> cluster.shutdown()                      # doctest: +SKIP

What starts where (DESIGN §5):

- **Ray**: ``address`` (``ray://…``, ``auto``) or ``$RAY_ADDRESS`` joins an existing cluster;
  otherwise a local instance with ``num_cpus`` logical CPUs and no dashboard.
- **Redis**: ``buffer.url`` or ``$REDIS_URL``; otherwise a private ``redis-server`` with a
  random password on a Unix socket (local runs only: other nodes cannot reach it).
- **registry** and **trainers**: named actors in the config's namespace, restarted by Ray
  when they die (``max_restarts=-1``); ``detached`` outlives this process (``osd launch``).
- **Serve**: the ``osd`` application on ``serve.host:serve.port``; ``launch`` returns once
  ``/health`` answers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
from osd.actors.config import REGISTRY_ACTOR, SERVE_APP, ClusterConfig, runtime_env

__all__ = ["Cluster", "ensure_backend", "launch", "start_ray"]

log = logging.getLogger(__name__)


def start_ray(address: str | None = None, num_cpus: int = 4) -> bool:
    """Connect to ``address`` / ``$RAY_ADDRESS`` or start a local Ray; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env(), logging_level="warning")
        return False
    ray.init(
        address="local",  # a Ray of our own, never one that another process left running
        num_cpus=num_cpus,
        include_dashboard=False,
        runtime_env=runtime_env(),
        logging_level="warning",
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    return True


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _interrupt_on_sigterm() -> None:
    """SIGTERM → KeyboardInterrupt in the main thread (Ray's own handler would exit without
    stopping the private redis-server)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)


def _options(cfg: ClusterConfig, name: str, detached: bool, **extra: Any) -> dict[str, Any]:
    opts = {
        "name": name,
        "namespace": cfg.namespace,
        "get_if_exists": True,
        "max_restarts": -1,
        "max_task_retries": -1,
        "runtime_env": runtime_env(),
        **extra,
    }
    if detached:
        opts["lifetime"] = "detached"
    return opts


def ensure_backend(cfg: ClusterConfig, detached: bool = False) -> tuple[Any, list[Any]]:
    """The registry actor and the trainer actors, created if missing; waits until ready."""
    import ray
    from osd.actors.registry_actor import RegistryActor
    from osd.actors.trainer_actor import TrainerActor

    doc = cfg.to_dict()
    registry = (
        ray.remote(RegistryActor)
        .options(
            **_options(
                cfg, REGISTRY_ACTOR, detached, num_cpus=cfg.registry.num_cpus, max_concurrency=8
            )
        )
        .remote(doc)
    )
    ray.get(registry.ping.remote())
    trainers = [
        ray.remote(TrainerActor)
        .options(
            **_options(
                cfg,
                name,
                detached,
                num_cpus=cfg.trainer.num_cpus,
                num_gpus=cfg.trainer.num_gpus,
                resources=cfg.trainer.resources,
                max_concurrency=4,
            )
        )
        .remote(doc, name)
        for name in cfg.trainer_names
    ]
    ray.get([t.ping.remote() for t in trainers])
    return registry, trainers


def wait_healthy(url: str, timeout_s: float = 180.0) -> None:
    """Poll ``url/health`` until it answers 200."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=5.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as err:
            last = str(err)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f} s ({last})")


@dataclass
class Cluster:
    """Handles to a running topology; :meth:`shutdown` stops what :func:`launch` started."""

    cfg: ClusterConfig
    registry: Any
    trainers: list[Any]
    url: str
    started_ray: bool = False
    redis_server: Any = None  # EmbeddedRedis started here, if any
    timings: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        import ray

        return ray.get(self.registry.report.remote())

    def trainer_stats(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([t.stats.remote() for t in self.trainers])

    def shutdown(self, keep_ray: bool = False) -> None:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                with contextlib.suppress(Exception):
                    serve.delete(SERVE_APP)
                for name in [*self.cfg.trainer_names, REGISTRY_ACTOR]:  # by name: half-started too
                    with contextlib.suppress(Exception):
                        ray.kill(ray.get_actor(name, namespace=self.cfg.namespace), no_restart=True)
                if self.started_ray and not keep_ray:
                    with contextlib.suppress(Exception):
                        serve.shutdown()
                    ray.shutdown()
        finally:
            if self.redis_server is not None:
                self.redis_server.stop()
                self.redis_server = None


def launch(
    cfg: ClusterConfig,
    address: str | None = None,
    detached: bool = False,
    num_cpus: int = 4,
) -> Cluster:
    """Start Redis (if needed), Ray (if needed), the registry, trainers and Serve app."""
    from osd.actors.server import build_app
    from ray import serve

    from osd.buffer import EmbeddedRedis

    t0 = time.perf_counter()
    server = None
    if cfg.redis_url is None:
        if address or os.environ.get("RAY_ADDRESS"):
            raise ValueError(
                "a cluster needs a Redis every node can reach: set buffer.url in the config "
                "or $REDIS_URL (e.g. redis://:PASSWORD@redis-host:6379/0)"
            )
        server = EmbeddedRedis(  # persistent (AOF) and supervised: restarted if it dies
            password=secrets.token_urlsafe(16),
            data_dir=cfg.buffer.data_dir,
            appendfsync=cfg.buffer.appendfsync,
        ).start()
        cfg = replace(cfg, buffer=replace(cfg.buffer, url=server.url))
    elif cfg.buffer.url is None:  # actors on other nodes lack this process's $REDIS_URL
        cfg = replace(cfg, buffer=replace(cfg.buffer, url=cfg.redis_url))
    timings = {"redis_s": time.perf_counter() - t0}
    started = False
    try:
        started = start_ray(address, num_cpus)
        if started:  # this process owns Ray and Redis: turn SIGTERM into a clean shutdown
            _interrupt_on_sigterm()
        timings["ray_s"] = time.perf_counter() - t0
        registry, trainers = ensure_backend(cfg, detached)
        timings["actors_s"] = time.perf_counter() - t0
        serve.start(
            http_options={"host": cfg.serve.host, "port": cfg.serve.port},
            proxy_location="HeadOnly",
        )
        serve.run(build_app(cfg), name=SERVE_APP, route_prefix="/", blocking=False)
        url = f"http://{cfg.serve.host}:{cfg.serve.port}"
        wait_healthy(url)
        timings["serve_s"] = time.perf_counter() - t0
    except BaseException:
        Cluster(cfg, None, [], "", started, server).shutdown()
        raise
    log.info("OSD up at %s in %.1f s", url, time.perf_counter() - t0)
    return Cluster(cfg, registry, trainers, url, started, server, timings)
