"""Registry epochs, the post-swap watch, recovery from an emptied or replaced store, validation before any write,
persisted history (issue 13, point 3)."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from osd.distill.lora import LoraSpec
from osd.distill.record import build_record
from osd.distill.student import CausalLMStudent
from osd.registry import (
    DiskStore,
    MemoryStore,
    PostSwapWatch,
    Promoter,
    PromotionGate,
    Registry,
    RegistryError,
    WeightValidationError,
)

ID = "draft-a"
SPEC = LoraSpec(r=2, alpha=4, target_modules=("q",), base_version=0)


def base() -> dict[str, torch.Tensor]:
    return {"q.weight": torch.zeros(4, 4), "head.weight": torch.zeros(8, 4)}


def shifted(x: float) -> dict[str, torch.Tensor]:
    return {k: v + x for k, v in base().items()}


def promoted(reg: Registry, x: float) -> dict:
    info = reg.publish(ID, shifted(x), parent=reg.live_version(ID))
    reg.promote(ID, info.version)
    return reg.ref(ID)


def test_full_weights_as_lora_are_refused_before_anything_is_stored():
    store = MemoryStore()
    reg = Registry(store)
    reg.register_base(ID, base())
    before = (dict(store._weights), store._meta[ID])
    for bad in (shifted(1.0), {"q.lora_A.weight": torch.zeros(2, 4)}):  # full; unpaired
        with pytest.raises(WeightValidationError, match=r"LoRA|lora"):
            reg.publish(ID, bad, kind="lora", lora=SPEC)
    with pytest.raises(ValueError, match="without its LoRA spec"):
        reg.publish(ID, {"q.lora_A.weight": torch.zeros(2, 4)}, kind="lora")
    wrong_in = {"q.lora_A.weight": torch.zeros(2, 5), "q.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(WeightValidationError, match="module's weight is"):
        reg.publish(ID, wrong_in, kind="lora", lora=SPEC)
    assert (dict(store._weights), store._meta[ID]) == before  # nothing written
    assert [v.version for v in reg.versions(ID)] == [0] and "lora" not in reg._meta[ID].references
    good = {"q.lora_A.weight": torch.zeros(2, 4), "q.lora_B.weight": torch.zeros(4, 2)}
    assert reg.publish(ID, good, kind="lora", lora=SPEC).version == 1  # the reference is sane


def test_store_emptied_under_a_running_registry_starts_an_epoch_and_keeps_live(caplog):
    store = MemoryStore()
    reg = Registry(store)
    reg.register_base(ID, base())
    promoted(reg, 1.0)
    served = promoted(reg, 2.0)  # replicas serve v2 of epoch 1
    assert served["version"] == 2
    assert reg.resolve(ID, served)["action"] == "keep"
    store._weights.clear()
    store._meta.clear()  # Redis came back empty
    assert reg.sync(ID) == "emptied"
    assert "REGISTRY STORE EMPTIED" in caplog.text
    reg.register_base(ID, base())  # what the promoter does: a new epoch
    assert reg.epoch(ID) != served["epoch"] and reg.live_version(ID) == 0
    answer = reg.resolve(ID, served)  # not "adopt": that would roll the replicas back to v0
    assert answer["action"] == "upload"
    live = reg.recover(ID, shifted(2.0), served, "replica-1")
    assert live["checksum"] == served["checksum"] and live["epoch"] == reg.epoch(ID)
    assert reg.recover(ID, shifted(2.0), served, "replica-2") == live  # idempotent
    again = reg.resolve(ID, served)
    assert again["action"] == "adopt" and again["checksum"] == served["checksum"]
    assert reg.resolve(ID, live)["action"] == "keep"
    kinds = [e["kind"] for e in reg.history(ID)]
    assert kinds.count("epoch") == 2 and "recover" in kinds
    lost = [e for e in reg.history(ID, "epoch") if e.get("started") == "store emptied"]
    assert lost[0]["lost_live"] == served
    with pytest.raises(WeightValidationError, match="checksum"):
        reg2 = Registry(MemoryStore())
        reg2.register_base(ID, base())
        reg2.recover(ID, shifted(3.0), served, "liar")  # weights not matching their ref


def test_registry_restarted_on_an_empty_store_takes_the_replicas_weights():
    reg = Registry(MemoryStore())
    reg.register_base(ID, base())
    served = promoted(reg, 1.0)
    restarted = Registry(MemoryStore())  # e.g. an external Redis without persistence
    restarted.register_base(ID, base())
    assert restarted.resolve(ID, served)["action"] == "upload"
    assert restarted.resolve(ID, None)["action"] == "adopt"  # a new replica takes live
    base_ref = reg.ref(ID, 0)  # a replica on the base: same checksum, so no upload
    assert restarted.resolve(ID, base_ref)["action"] == "adopt"
    promoted(restarted, 5.0)  # the new epoch promoted through its gate first: adopt it
    assert restarted.resolve(ID, served)["action"] == "adopt"
    with pytest.raises(RegistryError, match="promoted since"):
        restarted.recover(ID, shifted(1.0), served, "late")


def test_store_replaced_by_another_epoch():
    store = MemoryStore()
    reg = Registry(store)
    reg.register_base(ID, base())
    served = promoted(reg, 1.0)
    other_store = MemoryStore()
    other = Registry(other_store)
    other.register_base(ID, base())
    promoted(other, 7.0)
    store._meta, store._weights = other_store._meta, other_store._weights  # a backup restored
    assert reg.sync(ID) == "replaced" and reg.epoch(ID) == other.epoch(ID)
    assert reg.resolve(ID, served)["action"] == "upload"  # not a silent switch
    reg.recover(ID, shifted(1.0), served, "r")
    assert reg.ref(ID)["checksum"] == served["checksum"] and reg.sync(ID) == "ok"


def test_history_survives_a_restart_and_old_indexes_load(tmp_path):
    reg = Registry(DiskStore(tmp_path))
    reg.register_base(ID, base())
    v1 = promoted(reg, 1.0)
    reg.record_event(ID, "decision", version=1, promoted=True, candidate=0.5, live=0.4)
    reg.record_event(ID, "adoption", replica="r0", ref=v1, pause_ms=1.5)
    reg.rollback(ID, "watch: acceptance fell", {"live_alpha": 0.2}, by="post-swap watch")
    again = Registry(DiskStore(tmp_path))  # restarted
    kinds = [e["kind"] for e in again.history(ID)]
    assert kinds == ["epoch", "promote", "decision", "adoption", "rollback"]
    assert again.history(ID, "rollback")[0]["by"] == "post-swap watch"
    assert again.info(ID, 1).evaluation["live_alpha"] == 0.2
    assert again.epoch(ID) == v1["epoch"] and again.resolve(ID, v1)["action"] == "adopt"

    index = tmp_path / ID / "index.json"  # an index written before epochs
    doc = json.loads(index.read_text())
    del doc["epoch"], doc["events"]
    for v in doc["versions"]:
        del v["epoch"]
    index.write_text(json.dumps(doc))
    old = Registry(DiskStore(tmp_path))
    assert old.epoch(ID) == "legacy" and old.ref(ID)["epoch"] == "legacy"


# ---- the post-swap watch (issue 13, point 4) ---------------------------------------------------


def live_records(version: int, n: int, proposed: int, accepted: int) -> list:
    out = []
    for i in range(n):
        logits = torch.log_softmax(torch.randn(2, 32), -1)
        r = build_record(f"{version}-{i}", [1, 2, 3, 4], 2, [2, 3], logits, k=4, drafter_id=ID,
                         version=version)  # fmt: skip
        r.meta.update(proposed=proposed, accepted=accepted)
        out.append(r)
    return out


def tiny_student(seed: int) -> CausalLMStudent:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return CausalLMStudent(LlamaForCausalLM(cfg).eval())


@pytest.mark.parametrize("live_accepted", [2, 7])  # of 10: α 0.2 → rolled back; 0.7 → kept
def test_post_swap_watch_rolls_back_a_version_that_serves_worse(live_accepted, tmp_path):
    reg = Registry(DiskStore(tmp_path))
    watch = PostSwapWatch(margin=0.1, min_tokens=100)
    promoter = Promoter(reg, ID, tiny_student(0), PromotionGate(min_records=1), watch=watch)
    promoter.observe_live(live_records(0, 20, 10, 7))  # v0 live: α 0.7
    gate_records = live_records(0, 2, 10, 7)
    out = promoter.submit(tiny_student(0).module.state_dict(), "full", {}, gate_records)
    assert out.promoted and reg.live_version(ID) == 1  # equal on the gate: promoted
    promoter.observe_live(live_records(1, 5, 10, live_accepted))
    assert promoter.check_watch() is None  # 50 tokens < min_tokens: wait
    promoter.observe_live(live_records(1, 5, 10, live_accepted))
    verdict = promoter.check_watch()
    assert verdict["rollback"] == (live_accepted == 2) and verdict["previous_alpha"] == 0.7
    assert promoter.check_watch() is None  # one verdict per promotion
    again = Registry(DiskStore(tmp_path))  # the decision is in the persisted history
    if verdict["rollback"]:
        assert again.live_version(ID) == 0 and again.info(ID, 1).status == "rejected"
        event = again.history(ID, "rollback")[-1]
        assert event["by"] == "post-swap watch" and event["evaluation"]["watch"] == verdict
        assert "fell" in again.info(ID, 1).evaluation["reason"]
    else:
        assert again.live_version(ID) == 1 and again.history(ID, "watch")[-1] == {
            **again.history(ID, "watch")[-1],
            **verdict,
        }


def test_watch_drops_a_version_no_longer_live_and_waits_for_a_baseline():
    w = PostSwapWatch(margin=0.05, min_tokens=10)
    w.start(3, previous=2)
    w.observe(3, 10, 1)
    assert w.check(live=3) is None  # no baseline for v2 yet: wait up to 4 × min_tokens
    w.observe(3, 30, 3)
    v = w.check(live=3)
    assert not v.rollback and "no baseline" in v.reason
    w.start(4, previous=3)
    assert w.check(live=3) is None and w.watching is None  # v4 rolled back by someone else
    with pytest.raises(ValueError, match="margin"):
        PostSwapWatch(margin=1.5)
