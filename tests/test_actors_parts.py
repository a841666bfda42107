"""The actors' building blocks without Ray: record sink, Redis registry store, metrics,
replay summaries, the demo's α gain and the replica's drafter built by name."""

import time

import numpy as np
import pytest
import torch
from osd.actors.config import ClusterConfig
from osd.actors.demo import alpha_gain
from osd.actors.metrics import ReplicaMetrics
from osd.actors.record_sink import KeyQuota, RecordSink, holdout_stream, is_holdout
from osd.actors.redis_store import RedisStore
from osd.actors.replay import (
    ReplayRecord,
    plot_replay,
    pooled_alpha,
    summarize,
    version_swaps,
    windows,
)

from osd.buffer import EmbeddedRedis, MemoryBuffer
from osd.distill.record import build_record, decode, encode
from osd.drafters import DraftModelDrafter, NgramDrafter
from osd.registry import Registry, WeightValidationError
from osd.serving import RequestResult, SwapEvent
from osd.specdec.engine import DecodeStats


def record(i: int):
    logits = torch.log_softmax(torch.randn(2, 32), -1)
    return build_record(f"r{i}", [1, 2, 3, 4], 2, [2, 3], logits, k=4, drafter_id="d", version=0)


def wait_for(cond, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ---- record sink ---------------------------------------------------------------------------


def test_sink_splits_training_and_holdout_streams():
    buf = MemoryBuffer(consumer="t")
    seen = []
    sink = RecordSink(buf, "d", holdout_every=4, on_write=lambda s, ok: seen.append((s, ok)))
    for i in range(8):
        sink.submit(record(i))
    sink.close()
    assert buf.length("d") == 5 and buf.length(holdout_stream("d")) == 3
    assert seen.count(("d.holdout", True)) == 3 and sink.written == 8
    got = [decode(e.data).request_id for e in buf.read(holdout_stream("d"), 10)]
    assert got == ["r1", "r5", "r6"]  # the seeded split: is_holdout(0, id, 4)


def test_holdout_split_is_seeded_and_one_in_n():
    ids = [f"cmpl-{i}" for i in range(8000)]
    a = [is_holdout(0, r, 8) for r in ids]
    assert a == [is_holdout(0, r, 8) for r in ids]  # deterministic
    assert abs(sum(a) / len(a) - 1 / 8) < 0.01
    b = [is_holdout(1, r, 8) for r in ids]
    assert sum(x and y for x, y in zip(a, b, strict=True)) < 0.03 * len(ids)  # another split


def test_key_quota_caps_one_keys_share_but_not_a_lone_client():
    q = KeyQuota(max_share=0.5, window=64)
    assert all(q.admit("key0") for _ in range(200))  # alone: nothing to crowd out
    got = {"key0": 0, "key1": 0}
    for i in range(2000):  # key0 sends 9 of every 10 records
        key = "key1" if i % 10 == 0 else "key0"
        got[key] += q.admit(key)
    assert got["key1"] == 200  # the small client keeps all of its records
    assert got["key0"] <= 0.55 * (got["key0"] + got["key1"])
    assert q.dropped["key0"] > 1000 and q.dropped["key1"] == 0


class DownBuffer(MemoryBuffer):
    def put(self, drafter_id, data):
        raise ConnectionError("redis is down")


def test_sink_drops_and_counts_when_redis_is_down():
    drops = []
    sink = RecordSink(DownBuffer(), "d", on_write=lambda s, ok: drops.append(ok))
    start = time.perf_counter()
    sink.submit(record(0))  # never blocks the caller
    assert time.perf_counter() - start < 0.05
    sink.close(timeout_s=0.3)  # retried until the deadline, then dropped and counted
    assert sink.dropped == 1 and drops == [False] and sink.outage.count == 1


# ---- registry on Redis ---------------------------------------------------------------------


def test_redis_store_survives_a_registry_restart():
    with EmbeddedRedis(password="s3cret") as server:
        client = server.client()
        reg = Registry(RedisStore(client))
        reg.register_base("d", {"w": torch.zeros(2, 2)})
        v1 = reg.publish("d", {"w": torch.ones(2, 2)}, provenance={"steps": 3})
        reg.promote("d", v1.version)
        reg.publish("d", {"w": torch.full((2, 2), 2.0)})
        with pytest.raises(WeightValidationError):
            reg.publish("d", {"w": torch.full((2, 2), float("nan"))})
        again = Registry(RedisStore(server.client()))  # a restarted actor
        assert again.drafters() == ["d"] and again.live_version("d") == 1
        assert [v.version for v in again.versions("d")] == [0, 1, 2]
        assert torch.equal(again.weights("d", 1)["w"], torch.ones(2, 2))
        assert again.rollback("d").version == 0
        client.set("osd:registry:d:w:2", b"garbage")  # corrupted at rest: caught on load
        with pytest.raises(WeightValidationError, match="checksum"):
            again.weights("d", 2)


# ---- metrics -------------------------------------------------------------------------------


def test_metrics_are_named_after_vllm_and_count():
    m = ReplicaMetrics("osd", "draft")
    stats = DecodeStats()
    stats.record(depth=4, accepted=2, emitted=3)
    res = RequestResult("c", "t", [1, 2, 3], "length", 5, stats, 0, 1, 0.0, 0.2)
    m.observe_result(res)
    m.observe_swap(SwapEvent(1, 0, 0.002, 0.01, 1))
    m.observe_record("draft", True)
    m.observe_record("", False)
    text = m.render().decode()
    for line in [
        'osd:spec_decode_num_draft_tokens_total{drafter_id="draft",model_name="osd"} 4.0',
        'osd:spec_decode_num_accepted_tokens_total{drafter_id="draft",model_name="osd"} 2.0',
        'osd:spec_decode_num_accepted_tokens_per_pos_total{drafter_id="draft",model_name="osd",'
        'position="1"} 1.0',
        'osd:drafter_weight_version{drafter_id="draft",model_name="osd"} 1.0',
        'osd:drafter_swaps_total{drafter_id="draft",model_name="osd"} 1.0',
        'osd:distill_records_dropped_total{drafter_id="draft",model_name="osd"} 1.0',
    ]:
        assert line in text, line


# ---- replay summaries and the demo's figures -----------------------------------------------


def rec(i, domain, accepted, proposed=10, version=0, status=200):
    return ReplayRecord(
        i,
        domain,
        None,
        float(i),
        0.5,
        status,
        None if status == 200 else "boom",
        5,
        8,
        accepted / proposed,
        proposed,
        accepted,
        version,
        version,
        "length",
    )


def test_pooled_alpha_windows_and_swaps():
    rs = [rec(0, "a", 2), rec(1, "a", 8, 30), rec(2, "b", 5, version=1), rec(3, "b", 0, status=500)]
    assert pooled_alpha(rs[:2]) == pytest.approx(10 / 40)  # pooled, not a mean of ratios
    s = summarize(rs)
    assert s["failed"] == 1 and s["requests"] == 4 and s["versions_seen"] == [0, 1]
    assert s["alpha_by_domain"]["b"] == pytest.approx(0.5)
    assert [w["start"] for w in windows(rs, 2)] == [0, 2] and windows(rs, 2)[1]["failed"] == 1
    assert [(x["version"], x["index"]) for x in version_swaps(rs)] == [(0, 0), (1, 2)]


def test_alpha_gain_uses_the_last_domain_first_and_last(tmp_path):
    rs = [rec(i, "instruct", 5) for i in range(10)]
    rs += [rec(10 + i, "math", a) for i, a in enumerate(np.linspace(1, 9, 30).round().astype(int))]
    g = alpha_gain(rs, first_last=10)
    assert g["domain"] == "math" and g["m"] == 10 and g["requests"] == 30
    assert g["gain"] == pytest.approx(g["alpha_last"] - g["alpha_first"]) and g["gain"] > 0.4
    assert alpha_gain(rs, first_last=100)["m"] == 15  # fewer than 2 × 100: half each
    plot_replay(rs, tmp_path / "r.png", window=5)
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_replica_decoder_builds_the_drafter_by_name():
    from osd.actors.server import build_decoder

    tree = ClusterConfig.from_dict({"serve": {"drafter_options": {"tree": "2,2"}}})
    dec = build_decoder(tree, "cpu")
    assert isinstance(dec.drafter, DraftModelDrafter) and dec.drafter.branching == (2, 2)
    ngram = ClusterConfig.from_dict(
        {"drafter": "ngram", "k": 3, "trainer": {"count": 0}, "serve": {"drafter_options": {}}}
    )
    dec = build_decoder(ngram, "cpu")
    assert isinstance(dec.drafter, NgramDrafter) and dec.drafter.k == 3
    assert dec.drafter.state_dict() == {}  # nothing to hot-swap: the replica does not poll
    out = dec.generate("SELECT", max_new_tokens=4)
    assert len(out.tokens) <= 4 and out.stats.steps > 0
    assert dec.controller is None  # fixed depth unless the replica is load-aware
    aware = ClusterConfig.from_dict({"k": 3, "serve": {"load_aware": True}})
    dec = build_decoder(aware, "cpu")
    assert dec.controller is not None and dec.controller.k_min == 0 and dec.controller.k_max == 3


# ---- the registry actor's promotion flow, without Ray -----------------------------------------


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # peft's call
def test_registry_actor_gates_full_and_lora_versions_and_serves_merged_weights():
    from osd.actors.registry_actor import RegistryActor

    from osd.distill.lora import LoraSpec, adapter_state_dict, wrap_lora
    from osd.distill.student import CausalLMStudent
    from osd.models import load_model
    from osd.registry import checksum, weights_from_bytes, weights_to_bytes

    draft = load_model("zoo:draft", "cpu")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, draft.config.vocab_size, (4, 12), generator=gen)
    with torch.no_grad():
        logits = draft(tokens).logits  # the draft logs itself: its acceptance is ~1
    with EmbeddedRedis() as server:
        actor = RegistryActor({"buffer": {"url": server.url}, "trainer": {"count": 0}})
        for i in range(4):
            rec = build_record(f"r{i}", tokens[i], 4, list(range(4, 12)), logits[i, 3:11],
                               k=16, drafter_id="draft", version=0)  # fmt: skip
            actor.holdout_buffer.put(holdout_stream("draft"), encode(rec))
        noisy = {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in
                 draft.state_dict().items()}  # fmt: skip
        data = weights_to_bytes(noisy)
        out = actor.publish("draft", data, "full", {"trainer": "t"}, checksum(data))
        assert (out["version"], out["promoted"], out["records"]) == (1, False, 4)

        spec = LoraSpec(r=2, alpha=4, target_modules=("q_proj",), base_version=0)
        wrapped = wrap_lora(load_model("zoo:draft", "cpu"), spec, "CAUSAL_LM")
        adapter = adapter_state_dict(wrapped)  # lora_B = 0: the base exactly
        data = weights_to_bytes(adapter)
        out = actor.publish("draft", data, "lora", {"trainer": "t"}, checksum(data), spec.to_dict())
        assert out["promoted"] and actor.live_version("draft") == 2
        raw = actor.raw_weights("draft")
        assert (raw["version"], raw["kind"], raw["lora"]) == (2, "lora", spec.to_dict())
        served, digest = actor.serving_weights("draft", 2)
        assert digest == checksum(served)
        merged = weights_from_bytes(served)
        assert set(merged) == set(draft.state_dict())
        for name, t in draft.state_dict().items():
            torch.testing.assert_close(merged[name], t, msg=name)
        assert CausalLMStudent(draft).vocab_size == actor.promoter.base.vocab_size
        assert len(actor.report()["decisions"]) == 2


def test_registry_actor_of_a_weightless_drafter_holds_no_versions():
    from osd.actors.registry_actor import RegistryActor

    with EmbeddedRedis() as server:
        cfg = {"drafter": "ngram", "buffer": {"url": server.url}, "trainer": {"count": 0}}
        actor = RegistryActor(cfg)
        assert actor.live_version("draft") == 0 and actor.versions("draft") == []
        report = actor.report()
        assert report["live_version"] == 0 and report["versions"] == []
        with pytest.raises(ValueError, match="'ngram' has no weights to version"):
            actor.publish("draft", b"", "full", {})
