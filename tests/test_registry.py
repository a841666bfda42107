"""Tests for osd.registry: versions, validation before publish, persistence, the gate."""

from __future__ import annotations

import ast
import copy
import dataclasses
import doctest
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import osd.registry
import osd.registry.epochs
import osd.registry.gate
import osd.registry.promotion
import osd.registry.store
import osd.registry.versions
import osd.registry.watch
import osd.registry.weights
from osd.distill.lora import LoraSpec, adapter_state_dict, wrap_lora
from osd.distill.losses import expected_acceptance
from osd.distill.record import DistillRecord, build_record
from osd.distill.student import CausalLMStudent, sparse_target
from osd.registry import (
    DiskStore,
    MemoryStore,
    Promoter,
    PromotionGate,
    Registry,
    RegistryError,
    TensorSpec,
    VersionInfo,
    WeightValidationError,
    checksum,
    draft_acceptance,
    weights_from_bytes,
    weights_to_bytes,
)

V = 64
ID = "draft-a"


def base_weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(V, 4, generator=gen),
        "head.weight": torch.randn(V, 4, generator=gen),
        "norm.weight": torch.ones(4),
    }


def shifted(delta: float) -> dict[str, torch.Tensor]:
    return {name: t + delta for name, t in base_weights().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(params=["memory", "disk"])
def store(request, tmp_path):
    return MemoryStore() if request.param == "memory" else DiskStore(tmp_path / "registry")


@pytest.fixture
def reg(store) -> Registry:
    registry = Registry(store)
    registry.register_base(ID, base_weights(), provenance={"trainer": "zoo"})
    return registry


# ---- weights: bytes and checksum ----------------------------------------------------------


def test_weights_bytes_are_canonical_and_round_trip():
    w = base_weights()
    data = weights_to_bytes(w)
    assert data == weights_to_bytes(dict(reversed(list(w.items()))))  # order does not matter
    assert data == weights_to_bytes({k: v.t().contiguous().t() for k, v in w.items()})
    assert_same(weights_from_bytes(data), w)
    assert len(checksum(data)) == 64
    tied = torch.ones(3)
    assert_same(
        weights_from_bytes(weights_to_bytes({"a": tied, "b": tied})), {"a": tied, "b": tied}
    )
    with pytest.raises(WeightValidationError, match="not valid safetensors"):
        weights_from_bytes(b"\x00" * 40)


SPEC = LoraSpec(r=2, alpha=4, target_modules=("q",), base_version=0)


def test_version_info_round_trips_through_json():
    info = VersionInfo(ID, 3, "lora", "a" * 64, {"steps": 5}, parent=1, lora=SPEC.to_dict())
    assert VersionInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    assert info.lora_spec == SPEC
    with pytest.raises(ValueError, match="without its LoRA spec"):
        VersionInfo(ID, 3, "lora", "a" * 64)
    with pytest.raises(ValueError, match="only lora has a LoRA spec"):
        VersionInfo(ID, 3, "full", "a" * 64, lora=SPEC.to_dict())
    with pytest.raises(ValueError, match="LoRA base v3 must be older than v3"):
        VersionInfo(ID, 3, "lora", "a" * 64, lora={**SPEC.to_dict(), "base_version": 3})
    with pytest.raises(ValueError, match="lora_r"):
        VersionInfo(ID, 3, "lora", "a" * 64, lora={**SPEC.to_dict(), "r": 0})
    full = VersionInfo(ID, 1, "full", "a" * 64).to_dict()
    del full["lora"]  # an index written before versions carried LoRA specs
    assert VersionInfo.from_dict(full).lora is None
    with pytest.raises(ValueError, match="status"):
        VersionInfo.from_dict({**info.to_dict(), "status": "golden"})
    with pytest.raises(ValueError, match="standard JSON"):
        VersionInfo(ID, 1, "full", "a" * 64, {"loss": float("nan")})
    with pytest.raises(ValueError, match="older"):
        VersionInfo(ID, 1, "full", "a" * 64, parent=1)


# ---- the publish / promote / rollback flow ---------------------------------------------------


def test_publish_promote_rollback_flow(reg):
    assert reg.live_version(ID) == 0 and reg.live(ID).status == "live"
    v1 = reg.publish(ID, shifted(1.0), provenance={"trainer": "t0", "steps": 10}, parent=0)
    assert (v1.version, v1.status, v1.parent, v1.provenance["steps"]) == (1, "candidate", 0, 10)
    assert reg.live_version(ID) == 0  # publishing does not promote
    assert_same(reg.weights(ID, 1), shifted(1.0))

    reg.promote(ID, 1, evaluation={"acceptance": 0.7})
    assert reg.live_version(ID) == 1 and reg.live(ID).evaluation["acceptance"] == 0.7
    assert reg.info(ID, 0).status == "retired"
    assert_same(reg.weights(ID), shifted(1.0))  # default: the live version

    reg.publish(ID, shifted(2.0))
    reg.promote(ID, 2)
    assert [v.status for v in reg.versions(ID)] == ["retired", "retired", "live"]

    assert reg.rollback(ID).version == 1
    assert reg.live_version(ID) == 1 and reg.info(ID, 2).status == "rejected"
    assert reg.rollback(ID).version == 0
    with pytest.raises(RegistryError, match="no earlier live version"):
        reg.rollback(ID)
    with pytest.raises(RegistryError, match="rejected"):
        reg.promote(ID, 2)
    assert reg.promote(ID, 0).status == "live"  # promoting the live version is a no-op


def test_reject_and_register_base_rules(reg):
    reg.publish(ID, shifted(1.0))
    info = reg.reject(ID, 1, "acceptance fell")
    assert info.status == "rejected" and info.evaluation["reason"] == "acceptance fell"
    with pytest.raises(RegistryError, match="use rollback"):
        reg.reject(ID, 0, "no")
    assert reg.register_base(ID, base_weights()).version == 0  # identical: accepted again
    with pytest.raises(RegistryError, match="different base"):
        reg.register_base(ID, shifted(1.0))
    with pytest.raises(RegistryError, match="unknown drafter 'nope'"):
        reg.live("nope")
    with pytest.raises(RegistryError, match="no version 9"):
        reg.promote(ID, 9)


def test_restarted_registry_sees_every_version_and_the_live_pointer(tmp_path):
    root = tmp_path / "registry"
    reg = Registry(DiskStore(root))
    reg.register_base(ID, base_weights())
    reg.publish(ID, shifted(1.0), provenance={"steps": 10})
    reg.promote(ID, 1)
    reg.publish(ID, shifted(2.0))
    reg.reject(ID, 2, "worse")
    reg.publish(ID, shifted(3.0))
    reg.promote(ID, 3)
    before = [v.to_dict() for v in reg.versions(ID)]

    again = Registry(DiskStore(root))
    assert again.drafters() == [ID]
    assert [v.to_dict() for v in again.versions(ID)] == before
    assert again.live_version(ID) == 3
    assert_same(again.weights(ID, 1), shifted(1.0))
    assert again.rollback(ID).version == 1  # the live history survived the restart
    assert sorted(p.name for p in (root / ID).iterdir()) == [
        "index.json",
        "v0.safetensors",
        "v1.safetensors",
        "v2.safetensors",
        "v3.safetensors",
    ]  # no temp files left behind
    assert Registry(DiskStore(root)).live_version(ID) == 1


# ---- validation before publish -------------------------------------------------------------


def _nan(w):
    w["head.weight"][3, 1] = float("nan")
    return w


def _inf(w):
    w["norm.weight"][0] = float("inf")
    return w


def _shape(w):
    w["head.weight"] = torch.zeros(V, 5)
    return w


def _dtype(w):
    w["norm.weight"] = w["norm.weight"].half()
    return w


def _missing(w):
    del w["norm.weight"]
    return w


def _extra(w):
    w["lm_head.bias"] = torch.zeros(V)
    return w


BAD = [
    (_nan, r"'head.weight' has 1 NaN and 0 inf"),
    (_inf, r"'norm.weight' has 0 NaN and 1 inf"),
    (_shape, r"'head.weight' has shape \[64, 5\]; the reference has \[64, 4\]"),
    (_dtype, r"'norm.weight' has dtype float16; the reference has float32"),
    (_missing, r"missing \['norm.weight'\] \(1\), unexpected \[\] \(0\)"),
    (_extra, r"missing \[\] \(0\), unexpected \['lm_head.bias'\] \(1\)"),
]


@pytest.mark.parametrize(("corrupt", "message"), BAD, ids=[f.__name__[1:] for f, _ in BAD])
def test_publish_refuses_bad_weights_and_changes_nothing(reg, corrupt, message):
    reg.publish(ID, shifted(1.0))
    reg.promote(ID, 1)
    before = [v.to_dict() for v in reg.versions(ID)]
    for weights in (corrupt(shifted(2.0)), weights_to_bytes(corrupt(shifted(2.0)))):
        with pytest.raises(WeightValidationError, match=rf"draft-a v2 \(full\): .*{message}"):
            reg.publish(ID, weights)
    assert reg.live_version(ID) == 1 and [v.to_dict() for v in reg.versions(ID)] == before
    assert (
        isinstance(reg.store, MemoryStore) or not (reg.store.root / ID / "v2.safetensors").exists()
    )


def test_publish_checks_the_checksum(reg):
    data = weights_to_bytes(shifted(1.0))
    with pytest.raises(WeightValidationError, match="checksum mismatch"):
        reg.publish(ID, data, checksum=checksum(b"something else"))
    assert [v.version for v in reg.versions(ID)] == [0]
    info = reg.publish(ID, data, checksum=checksum(data))
    assert info.checksum == checksum(data)
    assert (
        reg.publish(ID, shifted(2.0), checksum=checksum(weights_to_bytes(shifted(2.0)))).version
        == 2
    )


@pytest.mark.parametrize("bad_id", ["../escape", "a/b", "", ".", "..", ".hidden", "x" * 65, 7])
def test_bad_drafter_ids_are_refused(tmp_path, bad_id):
    reg = Registry(DiskStore(tmp_path / "registry"))
    with pytest.raises(ValueError, match=r"drafter id .* is not allowed"):
        reg.register_base(bad_id, base_weights())
    with pytest.raises(ValueError, match="is not allowed"):
        reg.publish(bad_id, base_weights())
    assert sorted(os.listdir(tmp_path)) == ["registry"] and not os.listdir(tmp_path / "registry")


def test_a_corrupted_weights_file_is_detected_on_load(tmp_path):
    root = tmp_path / "registry"
    reg = Registry(DiskStore(root))
    reg.register_base(ID, base_weights())
    reg.publish(ID, shifted(1.0))
    path = root / ID / "v1.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside a tensor: still parses, wrong numbers
    path.write_bytes(bytes(data))
    for registry in (reg, Registry(DiskStore(root))):
        with pytest.raises(WeightValidationError, match="v1: stored weights fail their checksum"):
            registry.weights(ID, 1)
    assert_same(reg.weights(ID, 0), base_weights())


def test_lora_reference_from_first_lora_version_or_register():
    lora = {"q.lora_A.weight": torch.zeros(2, 4), "q.lora_B.weight": torch.zeros(4, 2)}
    reg = Registry()
    reg.register_base(ID, base_weights())
    v1 = reg.publish(ID, lora, kind="lora", lora=SPEC)  # defines the lora reference
    assert v1.kind == "lora" and reg.info(ID, 1).lora_spec == SPEC
    with pytest.raises(
        WeightValidationError, match=r"v2 \(lora\): (LoRA )?tensor 'q.lora_A.weight'"
    ):
        reg.publish(ID, {**lora, "q.lora_A.weight": torch.zeros(3, 4)}, kind="lora", lora=SPEC)
    with pytest.raises(ValueError, match="without its LoRA spec"):
        reg.publish(ID, lora, kind="lora")
    with pytest.raises(RegistryError, match="sits on full weights; its base v1 is lora"):
        reg.publish(ID, lora, kind="lora", lora={**SPEC.to_dict(), "base_version": 1})
    with pytest.raises(RegistryError, match="has no version 7"):
        reg.publish(ID, lora, kind="lora", lora=dataclasses.replace(SPEC, base_version=7))
    assert [v.version for v in reg.versions(ID)] == [0, 1]  # nothing stored on failure

    other = Registry()
    spec = {
        "q.lora_A.weight": TensorSpec((8, 4), "float32"),
        "q.lora_B.weight": lora["q.lora_B.weight"],
    }
    other.register_base(ID, base_weights(), lora_reference=spec)
    with pytest.raises(WeightValidationError, match=r"shape \[2, 4\]; the reference has \[8, 4\]"):
        other.publish(ID, lora, kind="lora", lora=SPEC)


def test_gc_keeps_base_live_rollback_target_and_newest():
    reg = Registry()
    reg.register_base(ID, base_weights())
    for i in range(1, 7):
        reg.publish(ID, shifted(float(i)))
    reg.promote(ID, 2)
    reg.promote(ID, 3)
    assert reg.gc(keep=2) == [(ID, 1), (ID, 4)]
    assert [v.version for v in reg.versions(ID)] == [0, 2, 3, 5, 6]
    assert reg.rollback(ID).version == 2
    assert reg.publish(ID, shifted(7.0)).version == 7

    lora = {"q.lora_A.weight": torch.zeros(2, 4), "q.lora_B.weight": torch.zeros(4, 2)}
    reg.publish(ID, lora, kind="lora", lora=dataclasses.replace(SPEC, base_version=5))
    assert reg.gc(keep=1) == [(ID, 3), (ID, 6), (ID, 7)]  # v5 stays: v8 sits on it
    assert [v.version for v in reg.versions(ID)] == [0, 2, 5, 8]


# ---- the promotion gate --------------------------------------------------------------------


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.5,  # peaked next-token distributions, so drafts can differ
    )
    return LlamaForCausalLM(config).eval()


def noised(model: LlamaForCausalLM, scale: float, seed: int) -> LlamaForCausalLM:
    out = tiny_llama()
    out.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return out


@pytest.fixture(scope="module")
def target() -> LlamaForCausalLM:
    return tiny_llama(0)


@pytest.fixture(scope="module")
def records(target) -> list[DistillRecord]:
    """4 requests of 12 tokens (prompt 4), every output position logged with k = V."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(4):
        tokens = torch.randint(0, V, (12,), generator=gen)
        positions = list(range(4, 12))
        with torch.no_grad():
            logits = target(tokens[None]).logits[0]  # [12, V]; row t - 1 predicts token t
        out.append(
            build_record(
                f"r{i}", tokens, 4, positions, logits[[t - 1 for t in positions]], k=V,
                drafter_id=ID, version=0,
            )
        )  # fmt: skip
    return out


def student(model: LlamaForCausalLM) -> CausalLMStudent:
    return CausalLMStudent(model)


def test_draft_acceptance_of_the_target_itself_is_one(target, records):
    est = draft_acceptance(student(target), records)
    assert (est.positions, est.records) == (32, 4)
    assert est.mean == pytest.approx(1.0, abs=1e-3)  # k = V: exact up to fp16 log-probs
    assert draft_acceptance(student(noised(target, 1.0, 3)), records).mean < 0.3
    chunked = draft_acceptance(student(target), records, chunk=3)  # a batch of 3, then 1
    assert chunked.positions == 32 and chunked.mean == pytest.approx(est.mean, abs=1e-5)


def test_gate_scores_each_record_at_its_temperature(target, records):
    """Sampled traffic at its own T; greedy (T = 0) at T = 1, like the trainer's loss."""
    draft = student(noised(target, 0.5, 7))
    hot = [dataclasses.replace(r, temperature=0.5) for r in records]
    greedy = [dataclasses.replace(r, temperature=0.0) for r in records]
    with torch.no_grad():
        logits = draft.predict(hot)
    want = torch.cat(
        [
            expected_acceptance(lg, sparse_target(r, V), 0.5)
            for lg, r in zip(logits, hot, strict=True)
        ]
    )
    assert draft_acceptance(draft, hot).mean == pytest.approx(float(want.mean()), abs=1e-5)
    at_one = draft_acceptance(draft, records)  # the records' own T: 1
    assert draft_acceptance(draft, greedy).mean == pytest.approx(at_one.mean, abs=1e-7)
    assert abs(draft_acceptance(draft, hot).mean - at_one.mean) > 1e-3


def test_gate_rejects_a_worse_candidate_and_promotes_a_better_one(target, records):
    live_model = noised(target, 0.05, 2)  # close to the target that generated the records
    live = student(live_model)
    reg = Registry()
    reg.register_base(ID, live_model.state_dict())
    gate = PromotionGate(margin=0.01)

    worse = noised(target, 1.0, 3)
    reg.publish(ID, worse.state_dict(), provenance={"steps": 1})
    decision = reg.gate_and_promote(ID, 1, gate, student(worse), live, records)
    assert not decision.promote and decision.candidate < decision.live - 0.01
    assert decision.records == 4 and decision.positions == 32
    info = reg.info(ID, 1)
    assert info.status == "rejected" and reg.live_version(ID) == 0
    assert info.evaluation["acceptance"] == decision.candidate
    assert info.evaluation["live_acceptance"] == decision.live
    assert info.evaluation["live_version"] == 0 and "<" in info.evaluation["reason"]

    reg.publish(ID, target.state_dict())
    decision = reg.gate_and_promote(ID, 2, gate, student(target), live, records)
    assert decision.promote and decision.candidate == pytest.approx(1.0, abs=1e-3)
    assert reg.live_version(ID) == 2 and reg.live(ID).evaluation["records"] == 4
    assert PromotionGate().evaluate(student(target), student(target), records).promote  # equal


def test_gate_needs_enough_records(target, records):
    decision = PromotionGate(min_records=5).evaluate(student(target), student(target), records)
    assert not decision.promote and "needs 5" in decision.reason
    assert not PromotionGate().evaluate(student(target), student(target), []).promote
    with pytest.raises(ValueError, match="min_records"):
        PromotionGate(min_records=0)


# ---- the promotion flow ---------------------------------------------------------------------


def lora_on(model: LlamaForCausalLM, spec: LoraSpec) -> tuple[dict, dict]:
    """A small trained-looking adapter for ``model`` and the weights it merges into."""
    wrapped = wrap_lora(copy.deepcopy(model), spec, "CAUSAL_LM")
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(0.01 * torch.randn(p.shape, generator=gen))
    adapter = {k: v.detach().clone() for k, v in adapter_state_dict(wrapped).items()}
    merged = {k: v.detach().clone() for k, v in wrapped.merge_and_unload().state_dict().items()}
    return adapter, merged


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # peft's call
def test_promoter_gates_full_and_lora_versions_and_a_restart_loads_them(target, records, tmp_path):
    reg = Registry(DiskStore(tmp_path / "registry"))
    live_model = noised(target, 0.05, 2)
    promoter = Promoter(reg, ID, student(live_model), PromotionGate(margin=0.05))
    assert reg.live_version(ID) == 0

    out = promoter.submit(noised(target, 1.0, 3).state_dict(), "full", {"steps": 1}, records)
    assert (out.version, out.promoted, out.live_version) == (1, False, 0)
    assert out.candidate < out.live and out.positions == 32 and out.provenance == {"steps": 1}
    out = promoter.submit(target.state_dict(), "full", {"steps": 2}, records)
    assert out.promoted and out.candidate == pytest.approx(1.0, abs=1e-3)
    assert reg.live_version(ID) == 2 and reg.info(ID, 2).evaluation["live_version"] == 0
    assert_same(promoter.weights(2), target.state_dict())

    spec = LoraSpec(r=2, alpha=4, target_modules=("q_proj", "v_proj"), base_version=2)
    adapter, merged = lora_on(target, spec)
    out = promoter.submit(adapter, "lora", {"steps": 3}, records, lora=spec)
    assert out.promoted and reg.info(ID, 3).lora_spec == spec
    for name, t in promoter.weights(3).items():
        torch.testing.assert_close(t, merged[name], msg=name)

    # a restarted registry process: the LoRA version loads from the store alone
    again = Promoter(
        Registry(DiskStore(tmp_path / "registry")), ID, student(noised(target, 0.05, 2)),
        PromotionGate(),
    )  # fmt: skip
    assert again.registry.live_version(ID) == 3
    for name, t in again.weights(3).items():
        torch.testing.assert_close(t, merged[name], msg=name)
    loaded = again.student(3)
    assert not loaded.module.training and loaded.lora is None
    with pytest.raises(WeightValidationError, match="NaN"):
        again.submit({k: v * float("nan") for k, v in merged.items()}, "full", {}, records)
    assert [v.version for v in again.registry.versions(ID)] == [0, 1, 2, 3]


# ---- hygiene ----------------------------------------------------------------------------------


REGISTRY_MODULES = [
    osd.registry,
    osd.registry.store,
    osd.registry.weights,
    osd.registry.gate,
    osd.registry.promotion,
    osd.registry.versions,
    osd.registry.epochs,
    osd.registry.watch,
]


@pytest.mark.parametrize("module", REGISTRY_MODULES, ids=lambda m: m.__name__)
def test_registry_never_unpickles(module):
    tree = ast.parse(Path(module.__file__).read_text())
    imported, names, torch_loads = set(), set(), 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
            is_torch = isinstance(node.value, ast.Name) and node.value.id == "torch"
            torch_loads += is_torch and node.attr == "load"  # safetensors.torch.load is fine
    unsafe = {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve"}
    assert not imported & unsafe and not names & unsafe and torch_loads == 0


@pytest.mark.parametrize("module", REGISTRY_MODULES, ids=lambda m: m.__name__)
def test_doctests(module):
    assert doctest.testmod(module).failed == 0
