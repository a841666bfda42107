"""The early-stop decision model in the product path: replica → records → trainer actor →
registry actor (gate, versions as ``draft-stop``) → the replica adopts it between steps.

The actors' own classes, real Redis and real HTTP (FastAPI's test client), without a Ray
cluster: the actor handles are stand-ins (``tests/test_mixture._Handle``)."""

from __future__ import annotations

import time

import pytest
from test_mixture import _Handle

PROMPT = "SELECT name FROM users WHERE"


@pytest.mark.integration
def test_serve_trains_gates_and_hot_swaps_the_decision_model(monkeypatch):
    import ray
    from fastapi.testclient import TestClient
    from osd.actors import server
    from osd.actors.config import ClusterConfig
    from osd.actors.registry_actor import RegistryActor
    from osd.actors.trainer_actor import TrainerActor
    from test_http_guard import _servable_dependency

    from osd.buffer import EmbeddedRedis, RedisStreamBuffer
    from osd.buffer.redis_stream import redis_client
    from osd.distill.record import decode

    with EmbeddedRedis() as redis_server:
        cfg = ClusterConfig.from_dict(
            {
                "buffer": {"url": redis_server.url, "holdout_every": 4},
                "registry": {"gate_margin": 1.0},  # promote every candidate that loads
                "serve": {"drafter_options": {"early_stop": 0.5}},
                "trainer": {
                    "distill": {"publish_every_steps": 1000, "publish_every_s": None},
                    "decision": {"publish_every_steps": 2, "publish_every_s": None},
                },
            }
        )
        registry = RegistryActor(cfg.to_dict())
        assert set(registry.promoters) == {"draft", "draft-stop"}
        monkeypatch.setattr(ray, "get_actor", lambda name, namespace=None: _Handle(registry))
        monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
        cls = server.OSDServer.func_or_class
        replica = cls.__new__(cls)
        replica.replica = "test"
        replica._start(cfg, RedisStreamBuffer(redis_client(cfg.redis_url), consumer="test"))
        replica.registry = _Handle(registry)
        stop = replica.loop.decoder.drafter.stop
        assert stop is not None and not stop.learn  # it serves the registry's versions only
        dep = _servable_dependency(server.api)
        server.api.dependency_overrides[dep] = lambda: replica
        trainer = None
        body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}
        try:
            with TestClient(server.api, raise_server_exceptions=False) as client:
                before = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
                for _ in range(15):
                    assert client.post("/v1/completions", json=body).status_code == 200
                deadline = time.monotonic() + 20
                while replica.sink.written < 16:
                    assert time.monotonic() < deadline, "records not written"
                    time.sleep(0.05)
                peek = RedisStreamBuffer(redis_client(cfg.redis_url), group="peek")
                recs = [decode(e.data) for e in peek.read("draft", 64)]
                assert recs and all(r.stop_labels is not None for r in recs)

                trainer = TrainerActor(cfg.to_dict(), "osd-trainer-0")
                assert trainer.stop_distiller is not None
                deadline = time.monotonic() + 40
                while not trainer.stop_decisions:
                    assert time.monotonic() < deadline, f"no publish: {trainer.stats()}"
                    time.sleep(0.1)
                decision = trainer.stop_decisions[0]
                assert decision["promoted"] and decision["records"] >= 1  # held-out records
                assert "stop-likelihood" in decision["reason"]
                assert registry.live_version("draft") == 0  # the drafter's own id untouched
                action = replica.stop_follower.step(
                    lambda ref: registry.poll("draft-stop", ref),
                    lambda v: registry.serving_weights("draft-stop", v),
                    lambda data, ref: registry.recover("draft-stop", data, ref, "test"),
                )
                assert action == "adopt"
                after = client.post("/v1/completions", json=body).json()
                assert after["choices"][0]["text"] == before  # the stop model never changes text
                stats = client.get("/v1/osd/stats").json()
                live = registry.live_version("draft-stop")
                assert stats["decision_model"]["version"] == live >= 1
                assert stats["decision_model"]["serving"]["version"] == live
                assert stats["failed"] == 0 and stats["swaps"][-1]["part"] == "stop"
                assert stats["drafter_version"] == 0
                report = registry.report()["decision_model"]
                assert report["live_version"] == live and len(report["versions"]) >= 2
                assert trainer.stats()["decision_model"]["promoted"] >= 1
        finally:
            if trainer is not None:
                trainer.stop()
            server.api.dependency_overrides.pop(dep, None)
            replica.loop.stop(timeout_s=5)
            replica.sink.close(timeout_s=5)
            registry.stop()
