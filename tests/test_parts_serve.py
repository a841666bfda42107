"""A drafter's versioned parts in the product path — the early-stop decision model
(``draft-stop``) and the adapters of a mixture versioned per adapter (``draft-<domain>``):
replica → records → trainer actor → registry actor (gate, versions) → the replica adopts
them between steps.

The actors' own classes, real Redis and real HTTP (FastAPI's test client), without a Ray
cluster (``tests/_served.py``)."""

from __future__ import annotations

import pytest
from _served import follow, served, start_trainer, wait_until
from test_mixture import PROMPTS

PROMPT = "SELECT name FROM users WHERE"


@pytest.mark.integration
def test_serve_trains_gates_and_hot_swaps_the_decision_model(monkeypatch):
    from osd.buffer import RedisStreamBuffer
    from osd.buffer.redis_stream import redis_client
    from osd.distill.record import decode

    config = {
        "buffer": {"holdout_every": 2},  # random request ids: ~8 of 16 held out
        "registry": {"gate_margin": 1.0},  # promote every candidate that loads
        "serve": {"drafter_options": {"early_stop": 0.5}},
        "trainer": {
            "distill": {"publish_every_steps": 1000, "publish_every_s": None},
            "decision": {"publish_every_steps": 1, "publish_every_s": None, "batch_records": 4},
        },
    }
    with served(monkeypatch, config) as ns:
        registry, replica, client = ns.registry, ns.replica, ns.client
        assert set(registry.promoters) == {"draft", "draft-stop"}
        stop = replica.loop.decoder.drafter.stop
        assert stop is not None and not stop.learn  # it serves the registry's versions only
        body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}
        before = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        for _ in range(15):
            assert client.post("/v1/completions", json=body).status_code == 200
        wait_until(lambda: replica.sink.written >= 16, "records not written", 20)
        peek = RedisStreamBuffer(redis_client(ns.cfg.redis_url), group="peek")
        recs = [decode(e.data) for e in peek.read("draft", 64)]
        assert recs and all(r.stop_labels is not None for r in recs)

        trainer = start_trainer(ns)
        assert set(trainer.part_distillers) == {"draft-stop"}
        decisions = trainer.part_decisions["draft-stop"]
        wait_until(lambda: decisions, lambda: f"no publish: {trainer.stats()}")
        assert decisions[0]["promoted"] and decisions[0]["records"] >= 1  # held-out records
        assert "stop-likelihood" in decisions[0]["reason"]
        assert registry.live_version("draft") == 0  # the drafter's own id untouched
        assert follow(replica.part_followers["stop"], registry, "draft-stop") == "adopt"
        after = client.post("/v1/completions", json=body).json()
        assert after["choices"][0]["text"] == before  # the stop model never changes text
        stats = client.get("/v1/osd/stats").json()
        live = registry.live_version("draft-stop")  # the trainer may have published again
        adopted = replica.part_followers["stop"].serving["version"]
        assert stats["parts"]["stop"]["version"] == adopted and 1 <= adopted <= live
        assert stats["parts"]["stop"]["serving"]["version"] == adopted
        assert stats["failed"] == 0 and stats["swaps"][-1]["part"] == "stop"
        assert stats["drafter_version"] == 0
        report = registry.report()["parts"]["draft-stop"]
        assert report["live_version"] >= adopted and len(report["versions"]) >= 2
        assert [(a["replica"], a["version"]) for a in report["adoptions"]] == [("test", adopted)]
        assert trainer.stats()["parts"]["draft-stop"]["promoted"] >= 1


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")
def test_mixture_versioned_per_adapter(monkeypatch):
    """``versioning: adapter``: a trainer per adapter publishes ``draft-math`` and
    ``draft-sql`` (LoRA), each gated on the held-out records its adapter drafted; the
    mixture's own id stays at v0; the replica adopts one adapter's version while the
    other adapter keeps serving its own."""
    options = {"domains": "math,sql", "router": "tag", "versioning": "adapter"}
    config = {
        "drafter": "mixture",
        "buffer": {"holdout_every": 2},  # ~6 of each adapter's 12 held out (random ids)
        "registry": {"gate_margin": 1.0},
        "serve": {"drafter_options": options},
        "trainer": {"distill": {"lora": True, "publish_every_steps": 1, "batch_records": 4}},
    }
    with served(monkeypatch, config) as ns:
        registry, replica, client = ns.registry, ns.replica, ns.client
        assert set(registry.promoters) == {"draft", "draft-math", "draft-sql"}
        assert set(replica.part_followers) == {"adapter:math", "adapter:sql"}
        for i in range(24):
            domain = ("math", "sql")[i % 2]
            body = {"prompt": PROMPTS[domain], "max_tokens": 12, "temperature": 0,
                    "domain": domain}  # fmt: skip
            assert client.post("/v1/completions", json=body).status_code == 200
        wait_until(lambda: replica.sink.written >= 24, "records not written", 20)

        trainer = start_trainer(ns)
        assert trainer.distiller is None  # only the adapters train
        assert set(trainer.part_distillers) == {"draft-math", "draft-sql"}
        wait_until(
            lambda: all(trainer.part_decisions.values()),
            lambda: f"no publish: {trainer.stats()}",
            60,
        )
        held = list(registry.holdout)
        for domain in ("math", "sql"):
            decision = trainer.part_decisions[f"draft-{domain}"][0]
            assert decision["promoted"], decision
            mine = sum(r.meta.get("adapter") == domain for r in held)
            assert decision["records"] == mine >= 1  # its own held-out records only
            assert registry.versions(f"draft-{domain}")[-1]["kind"] == "lora"
        assert registry.live_version("draft") == 0  # the mixture's own id
        assert follow(replica.part_followers["adapter:sql"], registry, "draft-sql") == "adopt"
        body = {"prompt": PROMPTS["sql"], "max_tokens": 12, "temperature": 0, "domain": "sql"}
        assert client.post("/v1/completions", json=body).status_code == 200
        stats = client.get("/v1/osd/stats").json()
        adopted = replica.part_followers["adapter:sql"].serving["version"]
        assert stats["parts"]["adapter:sql"]["version"] == adopted >= 1
        assert stats["parts"]["adapter:math"]["version"] == 0  # not adopted yet
        assert stats["failed"] == 0 and stats["swaps"][-1]["part"] == "adapter:sql"
        parts = registry.report()["parts"]
        assert set(parts) == {"draft-math", "draft-sql"}
        assert [a["version"] for a in parts["draft-sql"]["adoptions"]] == [adopted]
        assert parts["draft-math"]["adoptions"] == []
