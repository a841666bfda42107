"""Tests for osd.distill.record: the logged record, its wire format and its validation."""

from __future__ import annotations

import ast
import inspect
import math
from dataclasses import replace

import msgpack
import numpy as np
import pytest
import torch

import osd.buffer
import osd.distill.record
from osd.distill.record import (
    LOG_FLOOR,
    DistillRecord,
    LogConfig,
    LogMode,
    RecordError,
    build_record,
    bytes_per_position,
    decode,
    dense_target,
    encode,
    full_vocab_bytes_per_position,
    should_log,
)

V = 64


def make_record(
    m: int = 5, k: int = 8, vocab: int = V, hidden: int | None = None, seed: int = 0
) -> DistillRecord:
    gen = torch.Generator().manual_seed(seed)
    prompt_len, n_out = 6, 10
    tokens = torch.randint(0, vocab, (prompt_len + n_out,), generator=gen)
    positions = sorted(torch.randperm(n_out, generator=gen)[:m].add(prompt_len).tolist())
    logits = torch.randn(m, vocab, generator=gen) * 3
    hid = torch.randn(m, hidden, generator=gen) if hidden else None
    return build_record(
        "req-1",
        tokens,
        prompt_len,
        positions,
        logits,
        k=k,
        hidden=hid,
        drafter_id="draft-a",
        version=3,
        domain="math",
        meta={"replica": "r0", "temp": 0.7, "step": 12},
        temperature=0.7,
        top_k=40,
        top_p=0.9,
    )


def doc_of(record: DistillRecord) -> dict:
    return msgpack.unpackb(encode(record), raw=False)


def pack(doc: dict) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


def assert_same(a: DistillRecord, b: DistillRecord) -> None:
    scalars = ("request_id", "domain", "drafter_id", "version", "prompt_len", "created", "meta")
    for name in (*scalars, "temperature", "top_k", "top_p"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("token_ids", "positions", "topk_ids", "topk_logprobs", "tail_logmass"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    if a.hidden is None:
        assert b.hidden is None
    else:
        assert b.hidden.dtype == np.float16 and np.array_equal(a.hidden, b.hidden)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("hidden", [None, 12])
def test_round_trip(hidden):
    rec = make_record(hidden=hidden)
    back = decode(encode(rec), vocab_size=V)
    assert_same(rec, back)
    assert back.topk_ids.flags.writeable  # decoded arrays are copies, usable by torch
    assert back.hidden_size == hidden


def test_sampling_parameters_travel_and_v1_records_still_decode():
    rec = make_record()
    doc = doc_of(rec)
    assert doc["v"] == 3 and doc["sampling"] == [0.7, 40, 0.9]
    plain = replace(rec, temperature=0.0, top_k=0, top_p=1.0)
    assert len(encode(plain)) == len(encode(rec)) - 16  # greedy: 3 bytes, not 2 doubles
    greedy = decode(encode(plain))
    assert (greedy.temperature, greedy.top_k, greedy.top_p) == (0.0, 0, 1.0)
    assert isinstance(greedy.temperature, float) and isinstance(greedy.top_p, float)
    v2 = {k: v for k, v in doc.items() if not k.startswith("stop_")}
    assert decode(pack({**v2, "v": 2}), vocab_size=V).stop_labels is None  # before v3
    v1 = {k: v for k, v in v2.items() if k != "sampling"}
    old = decode(pack({**v1, "v": 1}), vocab_size=V)  # written before v2: T = 1, no warps
    assert (old.temperature, old.top_k, old.top_p) == (1.0, 0, 1.0)
    assert np.array_equal(old.topk_ids, rec.topk_ids)
    with pytest.raises(RecordError, match="temperature must be"):
        build_record("r", [1, 2], 1, [1], torch.zeros(1, 4), drafter_id="d", version=0,
                     temperature=-1.0)  # fmt: skip


def test_stop_fields_travel_and_are_validated():
    rec = make_record()
    x = np.array([[0.9, 0.5, 0.1, 0.125], [0.4, 0.1, 0.6, 0.25]], np.float16)
    with_stop = replace(rec, stop_features=x, stop_labels=np.array([1, 0], np.int32))
    back = decode(encode(with_stop), vocab_size=V)
    assert np.array_equal(back.stop_features, x) and back.stop_labels.tolist() == [1, 0]
    assert decode(encode(rec)).stop_features is None
    bad = [
        (dict(stop_features=x, stop_labels=None), "come together"),
        (dict(stop_features=x, stop_labels=np.array([1, 2], np.int32)), "0 or 1"),
        (dict(stop_features=x[:, :3], stop_labels=np.array([1, 0], np.int32)), r"\[n, 4\]"),
        (dict(stop_features=x * np.float16("nan"), stop_labels=np.array([1, 0])), "NaN"),
    ]
    for fields, message in bad:
        with pytest.raises(RecordError, match=message):
            encode(replace(rec, **{**fields, "stop_labels": _i32(fields["stop_labels"])}))


def _i32(a):
    return None if a is None else np.asarray(a, np.int32)


def test_ids_travel_as_uint16_when_they_fit_else_int32():
    assert doc_of(make_record())["topk_ids"]["dtype"] == "uint16"  # V = 64: 2 B per id
    vocab = 70_000
    logits = torch.zeros(2, vocab)
    logits[:, vocab - 1] = 5.0  # the top token id needs more than 16 bits
    rec = build_record("r", [1, 69_999, 5], 1, [1, 2], logits, k=4, drafter_id="d", version=0)
    doc = doc_of(rec)
    assert doc["topk_ids"]["dtype"] == "int32" and doc["token_ids"]["dtype"] == "int32"
    assert doc["positions"]["dtype"] == "uint16"
    back = decode(encode(rec), vocab_size=vocab)
    assert_same(rec, back)
    assert back.topk_ids.dtype == np.int32 and back.topk_ids[0, 0] == vocab - 1


def test_round_trip_no_positions():
    rec = make_record()
    empty = DistillRecord(
        request_id="r",
        drafter_id="d",
        version=0,
        token_ids=rec.token_ids,
        prompt_len=rec.prompt_len,
        positions=np.zeros(0, np.int32),
        topk_ids=np.zeros((0, 4), np.int32),
        topk_logprobs=np.zeros((0, 4), np.float16),
        tail_logmass=np.zeros(0, np.float32),
    )
    back = decode(encode(empty))
    assert back.num_positions == 0 and back.k == 4 and back.domain is None


# ------------------------------------------------------------------------------ rejection


def corrupt(**changes) -> bytes:
    doc = doc_of(make_record())
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = doc
        for p in parents:
            node = node[p]
        node[leaf] = value
    return pack(doc)


def corrupt_without(*names: str) -> bytes:
    doc = doc_of(make_record())
    for name in names:
        del doc[name]
    return pack(doc)


def shape_mismatch() -> bytes:
    doc = doc_of(make_record(m=5))
    ids = np.frombuffer(doc["topk_ids"]["data"], "<u2").reshape(5, 8)[:4]
    doc["topk_ids"] = {"dtype": "uint16", "shape": [4, 8], "data": ids.tobytes()}
    return pack(doc)


def with_logprob(value: float) -> bytes:
    doc = doc_of(make_record())
    lp = np.frombuffer(doc["topk_logprobs"]["data"], "<f2").copy()
    lp[0] = value
    doc["topk_logprobs"]["data"] = lp.tobytes()
    return pack(doc)


def with_position(value: int) -> bytes:
    doc = doc_of(make_record())
    doc["positions"]["dtype"] = "int32"
    pos = np.frombuffer(doc["positions"]["data"], "<u2").astype("<i4")
    pos[-1] = value
    doc["positions"]["data"] = pos.tobytes()
    return pack(doc)


GOOD = encode(make_record())
BAD = {
    "truncated": (lambda: GOOD[: len(GOOD) // 2], "not a valid msgpack record"),
    "trailing": (lambda: GOOD + b"\x00", "not a valid msgpack record"),
    "random": (lambda: np.random.default_rng(0).bytes(300), "record"),
    "not a map": (lambda: pack([1, 2, 3]), "must be a msgpack map"),
    "wrong version": (lambda: corrupt(v=4), "version 4 is not supported"),
    "v2 with stop fields": (
        lambda: corrupt(v=2, stop_labels=None),
        "do not match v2: missing [], unexpected ['stop_labels']",
    ),
    "half the stop fields": (
        lambda: corrupt(stop_labels={"dtype": "uint16", "shape": [1], "data": b"\x01\x00"}),
        "come together",
    ),
    "v1 with sampling": (lambda: corrupt(v=1), "do not match v1: missing [], unexpected"),
    "no sampling": (lambda: corrupt_without("sampling"), "missing ['sampling']"),
    "sampling not a list": (lambda: corrupt(sampling=0.7), "sampling must be [temperature"),
    "short sampling": (lambda: corrupt(sampling=[0.7, 40]), "sampling must be [temperature"),
    "negative temperature": (lambda: corrupt(sampling=[-0.5, 0, 1]), "temperature must be a"),
    "nan temperature": (lambda: corrupt(sampling=[float("nan"), 0, 1]), "temperature must be"),
    "huge temperature": (lambda: corrupt(sampling=[1e9, 0, 1]), "temperature must be"),
    "text temperature": (lambda: corrupt(sampling=["hot", 0, 1]), "temperature must be"),
    "bool temperature": (lambda: corrupt(sampling=[True, 0, 1]), "temperature must be"),
    "negative top_k": (lambda: corrupt(sampling=[0.7, -1, 1]), "top_k = -1"),
    "float top_k": (lambda: corrupt(sampling=[0.7, 2.5, 1]), "top_k must be an int"),
    "zero top_p": (lambda: corrupt(sampling=[0.7, 0, 0.0]), "top_p must be a number in"),
    "top_p > 1": (lambda: corrupt(sampling=[0.7, 0, 1.5]), "top_p must be a number in"),
    "no version": (lambda: pack({"request_id": "x"}), "version None"),
    "extra field": (lambda: corrupt(evil="x"), "unexpected ['evil']"),
    "wrong type": (lambda: corrupt(version="3"), "version must be an int"),
    "bool version": (lambda: corrupt(version=True), "version must be an int"),
    "bad dtype": (lambda: corrupt(topk_logprobs__dtype="float64"), "allowed: float16"),
    "object dtype": (lambda: corrupt(token_ids__dtype="object"), "allowed: uint16, int32"),
    "bfloat16": (
        lambda: corrupt(hidden={"dtype": "bfloat16", "shape": [5, 2], "data": b""}),
        "allowed: float16",
    ),
    "data length": (lambda: corrupt(tail_logmass__data=b"\x00" * 7), "but data has 7 B"),
    "shape mismatch": (shape_mismatch, "5 positions but topk_ids has 4 rows"),
    "shape rank": (lambda: corrupt(positions__shape=[5, 1]), "shape of 1 dimension"),
    "negative dim": (lambda: corrupt(positions__shape=[-5]), "outside"),
    "nan logprob": (lambda: with_logprob(float("nan")), "finite and <= 0"),
    "positive logprob": (lambda: with_logprob(0.5), "finite and <= 0"),
    "position >= T": (lambda: with_position(16), "positions must lie in"),
    "position < prompt": (lambda: with_position(2), "positions must lie in"),
    "oversize array": (
        lambda: corrupt(hidden={"dtype": "float16", "shape": [2**14, 2**12], "data": b""}),
        "array limit",
    ),
    "oversize claim": (lambda: b"\xc6" + (2**31).to_bytes(4, "big"), "not a valid msgpack"),
    "oversize string": (lambda: corrupt(request_id="x" * 5000), "exceeds max_str_len"),
    "long string": (lambda: corrupt(request_id="x" * 2000), "2000 characters; the limit is 1024"),
    "ext type": (lambda: corrupt(meta={"x": msgpack.ExtType(1, b"a")}), "not a valid msgpack"),
    "nested meta": (lambda: corrupt(meta={"x": {"y": 1}}), "meta['x'] must be str"),
    "prompt_len": (lambda: corrupt(prompt_len=0), "prompt_len = 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_decode_rejects_malformed(case):
    make, message = BAD[case]
    with pytest.raises(RecordError, match=None) as info:
        decode(make())
    assert message in str(info.value), str(info.value)


def test_decode_rejects_non_bytes_and_huge_input():
    with pytest.raises(RecordError, match="must be bytes"):
        decode("not bytes")  # type: ignore[arg-type]
    with pytest.raises(RecordError, match="the limit is"):
        decode(bytes(osd.distill.record.MAX_RECORD_BYTES + 1))


def test_decode_checks_vocab_size():
    rec = make_record(vocab=V)
    decode(encode(rec), vocab_size=V)
    with pytest.raises(RecordError, match="must lie in"):
        decode(encode(rec), vocab_size=int(rec.topk_ids.max()))


def test_decode_rejects_unsorted_duplicate_and_bad_mass():
    rec = make_record()
    rec.topk_logprobs = rec.topk_logprobs[:, ::-1].copy()
    with pytest.raises(RecordError, match="descending"):
        encode(rec)
    rec = make_record()
    rec.topk_ids[0, 1] = rec.topk_ids[0, 0]
    with pytest.raises(RecordError, match="repeat"):
        encode(rec)
    rec = make_record()
    rec.tail_logmass[:] = 0.0  # claims all mass in the tail too
    with pytest.raises(RecordError, match="mass"):
        encode(rec)


# ------------------------------------------------------------------------------- building


def test_build_record_matches_dense_softmax():
    gen = torch.Generator().manual_seed(1)
    m, vocab, k = 4, 50, 16
    logits = torch.randn(m, vocab, generator=gen) * 4
    rec = build_record(
        "r", list(range(12)), 8, [8, 9, 10, 11], logits, k=k, drafter_id="d", version=0
    )
    logp = torch.log_softmax(logits.double(), -1)
    ref_lp, ref_ids = logp.topk(k, -1)
    assert np.array_equal(rec.topk_ids, ref_ids.numpy())
    np.testing.assert_allclose(rec.topk_logprobs.astype(np.float64), ref_lp.numpy(), atol=1e-2)
    ref_tail = torch.log1p(-ref_lp.exp().sum(-1))
    # the tail is kept at fp16 precision (2 bytes on the wire, like the top-k log-probs)
    np.testing.assert_allclose(rec.tail_logmass, ref_tail.numpy(), rtol=1e-3, atol=1e-4)
    dense = dense_target(rec, vocab).double()
    assert torch.allclose(dense.exp().sum(-1), torch.ones(m, dtype=torch.float64))
    top = dense.gather(1, torch.from_numpy(rec.topk_ids.astype(np.int64)))
    assert torch.allclose(top, ref_lp, atol=2e-2)
    # the tail is spread evenly: every non-top-k token gets tail / (V - k)
    mask = torch.ones(m, vocab, dtype=torch.bool).scatter(1, ref_ids, False)
    expect = (ref_tail - math.log(vocab - k))[:, None].expand(m, vocab)[mask]
    assert torch.allclose(dense[mask], expect, atol=2e-2)


def test_build_record_tail_without_cancellation_and_k_equal_vocab():
    logits = torch.tensor([[30.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    rec = build_record("r", [1, 2, 3], 1, [1, 2], logits, k=1, drafter_id="d", version=0)
    # tail of row 0 = 3 e^-30 / (e^30 + 3) ≈ log 3 - 30 (1 - Σ would give log 0)
    assert rec.tail_logmass[0] == pytest.approx(math.log(3) - 30, abs=1e-2)  # fp16 spacing
    assert rec.tail_logmass[1] == pytest.approx(math.log(0.75), abs=1e-3)
    full = build_record("r", [1, 2, 3], 1, [1, 2], logits, k=99, drafter_id="d", version=0)
    assert full.k == 4 and (full.tail_logmass == LOG_FLOOR).all()
    assert torch.allclose(dense_target(full, 4), torch.log_softmax(logits, -1), atol=2e-3)


def test_build_record_handles_masked_vocab_and_rejects_nan():
    logits = torch.tensor([[0.0, float("-inf"), float("-inf"), 1.0]])
    rec = build_record("r", [0, 3], 1, [1], logits, k=3, drafter_id="d", version=0)
    assert rec.topk_logprobs[0, 2] == LOG_FLOOR
    with pytest.raises(RecordError, match="NaN"):
        build_record(
            "r", [0, 3], 1, [1], torch.full((1, 4), float("nan")), drafter_id="d", version=0
        )
    with pytest.raises(RecordError, match="shape"):
        build_record("r", [0, 3], 1, [1], torch.zeros(2, 4), drafter_id="d", version=0)


@pytest.mark.parametrize(("prompt_len", "n_out"), [(64, 256), (128, 48)])
def test_bytes_per_position_is_under_one_percent_of_full_vocab(prompt_len, n_out):
    vocab = 4096
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (prompt_len + n_out,), generator=gen)
    positions = list(range(prompt_len, prompt_len + n_out))  # LogMode.ALL
    logits = torch.randn(n_out, vocab, generator=gen)
    rec = build_record("r", tokens, prompt_len, positions, logits, k=16, drafter_id="d", version=0)
    ratio = bytes_per_position(rec) / full_vocab_bytes_per_position(vocab)
    assert full_vocab_bytes_per_position(vocab) == 8192
    assert ratio <= 0.01, f"{bytes_per_position(rec):.1f} B per position = {ratio:.2%}"


def test_tail_travels_as_fp16_only_when_lossless():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    rec = build_record("r", list(range(6)), 3, [3, 4, 5], logits, k=4, drafter_id="d", version=0)
    doc = msgpack.unpackb(encode(rec), raw=False)
    assert doc["tail_logmass"]["dtype"] == "float16"
    assert np.array_equal(decode(encode(rec)).tail_logmass, rec.tail_logmass)
    off_grid = (rec.tail_logmass + np.float32(1e-5)).astype(np.float32)  # not fp16-exact
    exact = replace(rec, tail_logmass=off_grid)
    doc = msgpack.unpackb(encode(exact), raw=False)
    assert doc["tail_logmass"]["dtype"] == "float32"
    assert np.array_equal(decode(encode(exact)).tail_logmass, exact.tail_logmass)


# ------------------------------------------------------------------------- log selection


def test_should_log_is_deterministic_and_hits_the_rate():
    ids = [f"req-{i}" for i in range(4000)]
    picked = [should_log(i, 0.25, seed=7) for i in ids]
    assert picked == [should_log(i, 0.25, seed=7) for i in ids]
    assert 0.22 < sum(picked) / len(ids) < 0.28
    assert picked != [should_log(i, 0.25, seed=8) for i in ids]
    assert all(should_log(i, 1.0) for i in ids[:10]) and not any(should_log(i, 0.0) for i in ids)
    with pytest.raises(ValueError, match="rate"):
        should_log("x", 1.5)


def test_log_config():
    assert LogConfig().mode is LogMode.REJECTED and LogConfig().k == 16
    assert LogConfig(mode="all").mode is LogMode.ALL
    with pytest.raises(ValueError):
        LogConfig(mode="some")
    with pytest.raises(ValueError, match="k must"):
        LogConfig(k=0)


# ------------------------------------------------------------------------------ no pickle


@pytest.mark.parametrize("module", [osd.distill.record, osd.buffer])
def test_no_pickle_on_the_wire(module):
    tree = ast.parse(inspect.getsource(module))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
