"""The registry actor (in process, no Ray) and a replica's follower against an emptied store,
a restarted registry and a version that serves worse (issue 13, points 3, 4 and 6)."""

import copy

import pytest
import torch
from osd.actors.metrics import ReplicaMetrics
from osd.actors.record_sink import holdout_stream
from osd.actors.registry_actor import RegistryActor

from osd.buffer import EmbeddedRedis
from osd.distill.record import build_record, encode
from osd.models import load_model
from osd.registry import WeightValidationError, checksum, spec_of, weights_to_bytes
from osd.serving import SwapEvent
from osd.serving.follow import VersionFollower

pytestmark = pytest.mark.integration

D = "draft"


class FakeLoop:
    """What the follower touches of a ServingLoop: the drafter's weights and version."""

    def __init__(self, state: dict) -> None:
        self.decoder = type("Dec", (), {})()
        self.decoder.drafter = self
        self.state, self.version, self.pending_version = state, 0, None
        self.follower: VersionFollower | None = None

    def state_dict(self) -> dict:
        return self.state

    def offer_weights(self, weights: dict, version: int) -> None:  # adopted at once
        previous, self.state, self.version = self.version, weights, version
        self.follower.on_swap(SwapEvent(version, previous, 0.0, 0.0, 0))

    def digest(self) -> str:
        return checksum(weights_to_bytes(self.state))


def replica(actor_of, state: dict) -> tuple[FakeLoop, callable]:
    loop = FakeLoop(state)
    loop.follower = VersionFollower(loop, spec_of(state), D)

    def step() -> str:
        actor = actor_of()
        return loop.follower.step(
            lambda serving: actor.poll(D, serving),
            lambda version: actor.serving_weights(D, version),
            lambda data, served: actor.recover(D, data, served, "replica-0"),
        )

    return loop, step


def config(url: str, **registry) -> dict:
    reg = {"maintain_s": 3600, "gate_margin": 0.5, **registry}  # maintain() called by hand
    return {"buffer": {"url": url}, "trainer": {"count": 0}, "registry": reg}


def records(draft, version: int, n: int, proposed: int = 0, accepted: int = 0) -> list:
    gen = torch.Generator().manual_seed(version)
    tokens = torch.randint(0, draft.config.vocab_size, (n, 12), generator=gen)
    with torch.no_grad():
        logits = draft(tokens).logits
    out = []
    for i in range(n):
        rec = build_record(f"v{version}-{i}", tokens[i], 4, list(range(4, 12)), logits[i, 3:11],
                           k=16, drafter_id=D, version=version)  # fmt: skip
        if proposed:
            rec.meta.update(proposed=proposed, accepted=accepted)
        out.append(rec)
    return out


def perturbed(draft, scale: float, seed: int) -> bytes:
    """The draft's weights plus noise (through the module: tied weights stay tied)."""
    model = copy.deepcopy(draft)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return weights_to_bytes(model.state_dict())


@pytest.fixture(scope="module")
def draft():
    return load_model("zoo:draft", "cpu")


def test_emptied_store_and_restarted_registry_keep_the_replicas_live_weights(draft, caplog):
    with EmbeddedRedis() as server:
        actors = [RegistryActor(config(server.url))]
        for rec in records(draft, 0, 4):
            actors[0].holdout_buffer.put(holdout_stream(D), encode(rec))
        loop, step = replica(lambda: actors[-1], draft.state_dict())
        assert step() == "keep" and loop.follower.serving["version"] == 0  # start-up = base
        data = perturbed(draft, 1e-3, 1)
        out = actors[0].publish(D, data, "full", {"trainer": "t"}, checksum(data))
        assert out["promoted"]
        assert step() == "adopt" and loop.version == 1
        live = loop.digest()
        assert live == checksum(data) and step() == "keep"
        epoch1 = loop.follower.serving["epoch"]

        server.client().flushall()  # Redis came back empty under a running registry
        actors[0].maintain()
        assert "REGISTRY STORE EMPTIED" in caplog.text
        assert actors[0].registry.epoch(D) != epoch1 and actors[0].live_version(D) == 0
        assert step() == "upload"  # not adopt: that would roll the replica back to v0
        assert actors[0].registry.ref(D)["checksum"] == live
        assert step() == "adopt" and loop.digest() == live  # relabelled, same weights
        assert step() == "keep" and loop.follower.serving["epoch"] == actors[0].registry.epoch(D)
        kinds = [e["kind"] for e in actors[0].history(D)]
        assert "recover" in kinds and kinds.count("epoch") == 2

        server.client().flushall()
        actors[0].stop()
        actors.append(RegistryActor(config(server.url)))  # restarted on the empty store
        assert step() == "upload" and loop.digest() == live
        assert actors[-1].registry.ref(D)["checksum"] == live
        assert step() in ("adopt", "keep") and loop.digest() == live
        report = actors[-1].report()
        assert report["epoch"] == loop.follower.serving["epoch"]
        actors[-1].stop()


def test_post_swap_watch_rolls_back_through_the_actor_and_shows_in_metrics(draft):
    with EmbeddedRedis() as server:
        cfg = config(server.url, watch_margin=0.1, watch_min_tokens=80)
        actor = RegistryActor(cfg)
        put = actor.holdout_buffer.put
        for rec in records(draft, 0, 10, proposed=10, accepted=8):  # v0 live: α 0.8
            put(holdout_stream(D), encode(rec))
        actor.maintain()
        data = perturbed(draft, 1e-3, 2)  # passes the gate (equal on held-out records) ...
        assert actor.publish(D, data, "full", {"trainer": "t"}, checksum(data))["promoted"]
        for rec in records(draft, 1, 10, proposed=10, accepted=2):  # ... serves α 0.2 live
            put(holdout_stream(D), encode(rec))
        verdict = actor.maintain()
        assert verdict["rollback"] and verdict["live_alpha"] == pytest.approx(0.2)
        assert actor.live_version(D) == 0 and actor.registry.info(D, 1).status == "rejected"
        answer = actor.poll(D, None)
        assert answer["watch"]["rollbacks"] == 1 and answer["version"] == 0
        metrics = ReplicaMetrics("osd", D)
        metrics.observe_registry(answer)
        text = metrics.render().decode()
        assert 'osd:drafter_watch_rollbacks{drafter_id="draft",model_name="osd"} 1.0' in text
        assert 'version_role="live"} 0.2' in text and "osd:drafter_registry_epoch_info" in text
        restarted = RegistryActor(cfg)  # the decision survives the actor
        assert restarted.history(D, "rollback")[-1]["by"] == "post-swap watch"
        assert any(d["version"] == 1 for d in restarted.report()["decisions"])
        actor.stop()
        restarted.stop()


def test_follower_never_uploads_start_up_weights_and_refuses_a_bad_transfer(draft):
    loop, _ = replica(lambda: None, draft.state_dict())
    f = loop.follower
    ref = {"epoch": "e1", "version": 3, "checksum": "0" * 64}
    never = lambda *a: pytest.fail("must not be called")  # noqa: E731
    assert f.step(lambda s: {**ref, "action": "upload"}, never, never) == "keep"  # serves none
    data = perturbed(draft, 1e-3, 3)
    with pytest.raises(WeightValidationError, match="checksum mismatch"):
        f.step(lambda s: {**ref, "action": "adopt"}, lambda v: (data, checksum(data)), never)
    assert loop.version == 0 and f.serving is None  # nothing offered
    good = {**ref, "checksum": checksum(data)}
    assert f.step(lambda s: {**good, "action": "adopt"}, lambda v: (data, good["checksum"]),
                  never) == "adopt"  # fmt: skip
    assert f.serving == good and loop.version == 3
    assert f.step(lambda s: {**good, "action": "keep"}, never, never) == "keep"


def test_the_store_keeps_only_the_newest_versions(draft):
    """registry.keep_versions: a soak grew Redis by every published version (issue 13)."""
    with EmbeddedRedis() as server:
        actor = RegistryActor(config(server.url, keep_versions=3))
        for rec in records(draft, 0, 4):
            actor.holdout_buffer.put(holdout_stream(D), encode(rec))
        for seed in range(1, 7):
            data = perturbed(draft, 1e-4, seed)
            assert actor.publish(D, data, "full", {"trainer": "t"}, checksum(data))["promoted"]
        before = server.client().info("memory")["used_memory"]
        actor.maintain()
        kept = [v["version"] for v in actor.versions(D)]
        assert kept == [0, 4, 5, 6] and actor.live_version(D) == 6  # base + newest 3
        assert server.client().info("memory")["used_memory"] < before
        actor.maintain()  # nothing more to remove
        assert [v["version"] for v in actor.versions(D)] == kept
        actor.stop()
