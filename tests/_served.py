"""The product path without a Ray cluster: the registry actor, a replica's HTTP app and
trainer actors — the actors' own classes — on an embedded Redis, their Ray handles
replaced by stand-ins (``handle.method.remote(...)`` calls the object)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from types import SimpleNamespace


class Handle:
    """A Ray actor handle stand-in: ``handle.method.remote(...)`` calls the object."""

    def __init__(self, obj):
        self.obj = obj

    def __getattr__(self, name):
        return SimpleNamespace(remote=getattr(self.obj, name))


@contextmanager
def served(monkeypatch, config: dict):
    """Yields ``SimpleNamespace(cfg, registry, replica, client)`` for ``config`` (a cluster
    config; its Redis is an embedded one); :func:`start_trainer` adds trainer actors, and
    everything stops on exit."""
    import ray
    from fastapi.testclient import TestClient
    from osd.actors import server
    from osd.actors.config import ClusterConfig
    from osd.actors.registry_actor import RegistryActor
    from test_http_guard import _servable_dependency

    from osd.buffer import EmbeddedRedis, RedisStreamBuffer
    from osd.buffer.redis_stream import redis_client

    with EmbeddedRedis() as redis_server:
        buffer = {**config.get("buffer", {}), "url": redis_server.url}
        cfg = ClusterConfig.from_dict({**config, "buffer": buffer})
        registry = RegistryActor(cfg.to_dict())
        monkeypatch.setattr(ray, "get_actor", lambda name, namespace=None: Handle(registry))
        monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
        cls = server.OSDServer.func_or_class
        replica = cls.__new__(cls)
        replica.replica = "test"
        replica._start(cfg, RedisStreamBuffer(redis_client(cfg.redis_url), consumer="test"))
        replica.registry = Handle(registry)
        dep = _servable_dependency(server.api)
        server.api.dependency_overrides[dep] = lambda: replica
        ns = SimpleNamespace(cfg=cfg, registry=registry, replica=replica, trainers=[])
        try:
            with TestClient(server.api, raise_server_exceptions=False) as client:
                ns.client = client
                yield ns
        finally:
            for trainer in ns.trainers:
                trainer.stop()
            server.api.dependency_overrides.pop(dep, None)
            replica.loop.stop(timeout_s=5)
            replica.sink.close(timeout_s=5)
            registry.stop()


def start_trainer(ns):
    """A trainer actor of ``ns`` (stopped when :func:`served` exits)."""
    from osd.actors.trainer_actor import TrainerActor

    trainer = TrainerActor(ns.cfg.to_dict(), "osd-trainer-0")
    ns.trainers.append(trainer)
    return trainer


def wait_until(ok, what: str, timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.05)


def follow(follower, registry, did: str) -> str:
    """One poll of a replica's ``follower`` of registry id ``did``, answered directly."""
    return follower.step(
        lambda ref: registry.poll(did, ref),
        lambda v: registry.serving_weights(did, v),
        lambda data, ref: registry.recover(did, data, ref, "test"),
    )
