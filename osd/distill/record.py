"""What a serving replica logs per finished request, and its schema'd binary encoding.

Terms:

- **token ids** ``[T]``: the prompt followed by the emitted output, ``T`` tokens.
- **logged position** ``t`` (``prompt_len <= t < T``): the target distribution over
  ``token_ids[t]`` given ``token_ids[:t]``. It comes from the verifier's logits at index
  ``t - 1`` (the position that *predicts* token ``t``), so no second target pass is needed.
- **top-k**: at each logged position, the ``k`` most likely token ids and their target
  log-probs at temperature 1, sorted descending (``k`` = 16 by default).
- **tail log-mass**: ``log(1 - Σ exp(topk_logprobs))``, the log of the probability mass
  outside the top-k, clamped at :data:`LOG_FLOOR` when it is ~0 (``k`` = vocabulary).
- **sampling**: the request's ``temperature`` (``0`` = greedy), ``top_k`` (``0`` = off) and
  ``top_p`` (``1`` = off), as in :class:`osd.specdec.sampling.SamplingParams`. The logged
  distribution is always the T = 1 one; the trainer and the gate re-temper it to the
  request's temperature (``osd.distill.student.distill_temperature``).

Worked example (``V = 5``, ``k = 2``), one request with prompt ``[2, 3]`` and output
``[4, 1]``, logging every output position::

    token_ids = [2, 3, 4, 1]       prompt_len = 2       positions = [2, 3]
    target at t=2 (logits at index 1): probs [0.05, 0.10, 0.15, 0.20, 0.50]
        topk_ids [4, 3]   topk_logprobs [log .50, log .20] = [-0.693, -1.609]
        tail_logmass = log(1 - 0.70) = log 0.30 = -1.204

The wire format is msgpack (never pickle: the buffer is a network service and its
contents are untrusted input) with a format version ``"v": 3`` (v1, written before records
carried sampling parameters, still decodes, as ``temperature = 1``; v2, before they could
carry the early-stop decision model's ``stop_features`` / ``stop_labels``). The sampling
parameters travel as ``"sampling": [temperature, top_k, top_p]``, integral values as
msgpack ints (3 bytes for greedy traffic). Arrays are maps
``{"dtype": str, "shape": [...], "data": bytes}``, little-endian, from an allow-list of
dtypes. Integer arrays (token ids, positions, top-k ids) travel as ``uint16`` when every
value fits (vocabularies up to 65,536 tokens) and as ``int32`` otherwise; in memory they are
always ``int32``. :func:`decode` validates everything and raises :class:`RecordError`.

Size (k = 16, no hidden states): 16 ids × 2 B + 16 log-probs × 2 B + 4 B tail + 2 B
position ≈ 70 B per logged position, against 2·V B for a full fp16 row (8,192 B at
V = 4,096: < 1 %).
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import msgpack
import numpy as np
import torch

from osd.distill.record_schema import (
    _ARRAYS,
    _INT_WIRE,
    _KEYS,
    _OPTIONAL,
    _SCALARS,
    _V3_ARRAYS,
    _WIRE_DTYPES,
    DEFAULT_K,
    FORMAT_VERSION,
    LOG_FLOOR,
    MAX_ARRAY_BYTES,
    MAX_META_ITEMS,
    MAX_RECORD_BYTES,
    MAX_STR_LEN,
    MAX_TEMPERATURE,
    READ_VERSIONS,
    DistillRecord,
    LogConfig,
    LogMode,
    RecordError,
    _check_int,
    _check_sampling,
    _fail,
    validate,
)

__all__ = [
    "DEFAULT_K",
    "FORMAT_VERSION",
    "LOG_FLOOR",
    "MAX_ARRAY_BYTES",
    "MAX_TEMPERATURE",
    "DistillRecord",
    "LogConfig",
    "LogMode",
    "RecordError",
    "build_record",
    "bytes_per_position",
    "decode",
    "dense_target",
    "encode",
    "full_vocab_bytes_per_position",
    "should_log",
    "validate",
]

# ------------------------------------------------------------------------------ encoding


def _pack_array(name: str, arr: np.ndarray) -> dict[str, Any]:
    wire = _ARRAYS[name].wire
    if wire == _INT_WIRE:
        fits = arr.size == 0 or (arr.min() >= 0 and arr.max() <= np.iinfo(np.uint16).max)
        wire_name = "uint16" if fits else "int32"
    elif wire == ("float16", "float32"):
        lossless = np.array_equal(arr.astype(np.float16).astype(arr.dtype), arr)
        wire_name = "float16" if lossless else "float32"
    else:
        wire_name = wire[0]
    data = np.ascontiguousarray(arr, dtype=_WIRE_DTYPES[wire_name]).tobytes()
    return {"dtype": wire_name, "shape": list(arr.shape), "data": data}


def _compact(x: float) -> int | float:
    """``x`` as a msgpack int when integral (``0`` for greedy, ``1`` for top-p off: 1 byte
    instead of a 9-byte double)."""
    return int(x) if float(x).is_integer() else float(x)


def _unpack_array(name: str, obj: Any, budget: int) -> np.ndarray:
    spec = _ARRAYS[name]
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        _fail(f"{name} must be a map with keys dtype, shape, data")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in spec.wire:
        _fail(f"{name} has dtype {dtype!r:.40}; allowed: {', '.join(spec.wire)}")
    if not isinstance(shape, list) or len(shape) != spec.ndim:
        _fail(f"{name} must have a shape of {spec.ndim} dimension(s), got {shape!r:.80}")
    for dim in shape:
        _check_int(f"{name} shape entry", dim, 0, MAX_ARRAY_BYTES)
    if not isinstance(data, bytes):
        _fail(f"{name} data must be bytes, got {type(data).__name__}")
    wire = _WIRE_DTYPES[dtype]
    expected = math.prod(shape) * wire.itemsize
    if expected > budget:
        _fail(f"{name} of shape {shape} would exceed the {MAX_ARRAY_BYTES}-byte array limit")
    if expected != len(data):
        _fail(
            f"{name}: shape {shape} × {wire.itemsize} B = {expected} B, but data has {len(data)} B"
        )
    return np.frombuffer(data, dtype=wire).reshape(shape).astype(spec.dtype)  # a writable copy


def encode(record: DistillRecord) -> bytes:
    """Validate ``record`` and serialise it to msgpack bytes (format v3)."""
    validate(record)
    doc: dict[str, Any] = {"v": FORMAT_VERSION}
    for name in _SCALARS:
        doc[name] = getattr(record, name)
    doc["created"] = float(record.created)
    doc["sampling"] = [_compact(record.temperature), record.top_k, _compact(record.top_p)]
    doc["meta"] = dict(record.meta)
    for name in _ARRAYS:
        arr = getattr(record, name)
        if arr is None and name in _V3_ARRAYS:
            continue  # absent, not None: a record without them costs what a v2 one did
        doc[name] = None if arr is None else _pack_array(name, arr)
    return msgpack.packb(doc, use_bin_type=True)


def decode(data: bytes, vocab_size: int | None = None) -> DistillRecord:
    """Parse and validate untrusted bytes; raise :class:`RecordError` on anything malformed.

    ``vocab_size``, when given, bounds the token ids and the top-k ids.

    >>> logits = torch.log(torch.tensor([[0.05, 0.10, 0.15, 0.20, 0.50]]))
    >>> rec = build_record("r1", [2, 3, 4, 1], 2, [2], logits, k=2, drafter_id="d", version=0)
    >>> decode(encode(rec), vocab_size=5).topk_ids.tolist()
    [[4, 3]]
    >>> decode(b"\\x81\\xa1v\\x04")
    Traceback (most recent call last):
    ...
    osd.distill.record_schema.RecordError: record format version 4 is not supported (this reader reads v1, v2, v3)
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        _fail(f"a record must be bytes, got {type(data).__name__}")
    if len(data) > MAX_RECORD_BYTES:
        _fail(f"record has {len(data)} bytes; the limit is {MAX_RECORD_BYTES}")
    try:
        doc = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=MAX_ARRAY_BYTES,
            max_str_len=4 * MAX_STR_LEN,
            max_array_len=8,
            max_map_len=2 * MAX_META_ITEMS,
            max_ext_len=0,
        )
    except Exception as err:  # msgpack raises several types; all mean "not a record"
        raise RecordError(f"not a valid msgpack record ({type(err).__name__}: {err})") from err
    if not isinstance(doc, dict):
        _fail(f"a record must be a msgpack map, got {type(doc).__name__}")
    version = doc.get("v")
    if version not in READ_VERSIONS or isinstance(version, bool):
        readable = ", ".join(f"v{v}" for v in READ_VERSIONS)
        _fail(
            f"record format version {version!r:.40} is not supported (this reader reads {readable})"
        )
    keys = _KEYS[version]
    if version >= 3:  # the stop fields travel only when present
        keys = keys - {name for name in _V3_ARRAYS if name not in doc}
    if set(doc) != keys:
        missing, extra = sorted(keys - set(doc)), sorted(map(str, set(doc) - keys))
        _fail(f"record fields do not match v{version}: missing {missing}, unexpected {extra}")
    budget = MAX_ARRAY_BYTES
    arrays: dict[str, np.ndarray | None] = {}
    for name in _ARRAYS:
        if doc.get(name) is None and name in _OPTIONAL:  # v1/v2 carry no stop fields
            arrays[name] = None
            continue
        arrays[name] = arr = _unpack_array(name, doc[name], budget)
        budget -= arr.nbytes
    created = doc["created"]
    sampling = {}  # v1: the defaults (temperature 1, top-k and top-p off)
    if version >= 2:
        triple = doc["sampling"]
        if not isinstance(triple, list) or len(triple) != 3:
            _fail(f"sampling must be [temperature, top_k, top_p], got {triple!r:.80}")
        _check_sampling(*triple)
        sampling = {"temperature": float(triple[0]), "top_k": triple[1], "top_p": float(triple[2])}
    record = DistillRecord(
        **sampling,
        request_id=doc["request_id"],
        domain=doc["domain"],
        drafter_id=doc["drafter_id"],
        version=doc["version"],
        prompt_len=doc["prompt_len"],
        created=created,
        meta=doc["meta"],
        **arrays,
    )
    validate(record, vocab_size)
    return record


def bytes_per_position(record: DistillRecord) -> float:
    """Encoded bytes of ``record`` per logged position (token ids and framing included)."""
    if record.num_positions == 0:
        raise RecordError("record logs no positions; bytes per position is undefined")
    return len(encode(record)) / record.num_positions


def full_vocab_bytes_per_position(vocab_size: int) -> int:
    """Bytes of one full fp16 logits row: what logging the whole vocabulary would cost."""
    return 2 * vocab_size


# ------------------------------------------------------------------------------- building


def _as_int32(name: str, values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu":
        raise RecordError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise RecordError(f"{name} must lie in [0, 2^31), got [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int32).reshape(-1)


def build_record(
    request_id: str,
    token_ids: Any,
    prompt_len: int,
    positions: Any,
    logits: torch.Tensor,
    k: int = DEFAULT_K,
    hidden: torch.Tensor | None = None,
    *,
    drafter_id: str,
    version: int,
    domain: str | None = None,
    created: float | None = None,
    meta: dict[str, str | int | float] | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_features: torch.Tensor | None = None,
    stop_labels: Any = None,
) -> DistillRecord:
    """Build a record from the verifier's logits at the logged positions.

    ``logits`` ``[m, V]``: row ``i`` is the target's logits that *predict*
    ``token_ids[positions[i]]`` (the verifier output at index ``positions[i] - 1``).
    ``hidden`` ``[m, H]``: the target's last hidden state at that same index. ``k`` is
    capped at ``V``; then the record is exact and the tail is :data:`LOG_FLOOR`.
    ``temperature`` / ``top_k`` / ``top_p``: the request's sampling parameters (the logits
    are logged at T = 1 whatever they are). ``stop_features`` ``[n, 4]`` / ``stop_labels``
    ``[n]``: the early-stop decision model's features and labels (both or neither).

    >>> logits = torch.log(torch.tensor([[0.05, 0.10, 0.15, 0.20, 0.50]]))
    >>> rec = build_record("r1", [2, 3, 4, 1], 2, [2], logits, k=2, drafter_id="d", version=0)
    >>> rec.topk_ids.tolist(), round(float(rec.tail_logmass[0]), 3)
    ([[4, 3]], -1.204)
    """
    tokens = _as_int32("token_ids", token_ids)
    pos = _as_int32("positions", positions)
    if logits.ndim != 2 or logits.shape[0] != pos.shape[0]:
        raise RecordError(
            f"logits must have shape [m, V] with m = {pos.shape[0]} positions, "
            f"got {list(logits.shape)}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RecordError(f"k must be an int >= 1, got {k!r}")
    if bool(torch.isnan(logits).any() | (logits == float("inf")).any()):
        raise RecordError("logits contain NaN or +inf; refusing to log them")
    from osd.kernels import topk_tail as extract  # the Triton kernel on CUDA, else topk_tail

    top_ids, top_lp, tail = extract(logits.detach(), k)
    hid = None
    if hidden is not None:
        hid = hidden.detach().to(device="cpu", dtype=torch.float16).numpy()
    record = DistillRecord(
        request_id=request_id,
        domain=domain,
        drafter_id=drafter_id,
        version=version,
        token_ids=tokens,
        prompt_len=prompt_len,
        positions=pos,
        topk_ids=top_ids.cpu().numpy().astype(np.int32),
        topk_logprobs=top_lp.cpu().numpy().astype(np.float16),
        # fp16 precision (like the top-k log-probs): 2 bytes per position on the wire
        tail_logmass=tail.cpu().numpy().astype(np.float32),
        hidden=hid,
        created=time.time() if created is None else created,
        meta=dict(meta or {}),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_features=None
        if stop_features is None
        else stop_features.detach().to(device="cpu", dtype=torch.float16).numpy(),
        stop_labels=None if stop_labels is None else _as_int32("stop_labels", stop_labels),
    )
    validate(record, vocab_size=logits.shape[1])
    return record


def topk_tail(
    logits: torch.Tensor, k: int, log_floor: float = LOG_FLOOR
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a record keeps of ``[m, V]`` logits: ``(ids [m, k] int64, logprobs [m, k] fp16
    sorted descending, tail [m] fp16)``, log-probs at T = 1 clamped to ``[log_floor, 0]``;
    ``k`` is capped at ``V`` (then the tail is ``log_floor``). The PyTorch reference of
    the Triton kernel ``osd.kernels.topk.topk_tail``.

    >>> ids, lp, tail = topk_tail(torch.log(torch.tensor([[0.05, 0.10, 0.15, 0.20, 0.50]])), 2)
    >>> ids.tolist(), [round(x, 2) for x in lp.float().exp()[0].tolist()], round(float(tail), 2)
    ([[4, 3]], [0.5, 0.2], -1.2)
    """
    k = min(int(k), logits.shape[1])
    with torch.no_grad():
        logp = torch.log_softmax(logits.detach().float(), dim=-1)  # [m, V]
        top_lp, top_ids = torch.topk(logp, k, dim=-1)  # [m, k], sorted descending
        # tail mass summed directly over the non-top-k tokens: no 1 - Σ cancellation
        rest = logp.scatter(-1, top_ids, float("-inf"))
        tail = torch.logsumexp(rest, dim=-1)  # [m]; -inf when k == V
        top_lp = top_lp.clamp(log_floor, 0.0)
        tail = tail.nan_to_num(neginf=log_floor).clamp(log_floor, 0.0)
    return top_ids, top_lp.half(), tail.half()


def dense_target(record: DistillRecord, vocab_size: int) -> torch.Tensor:
    """The target log-probs ``[m, V]`` with the tail mass spread evenly over non-top-k tokens.

    Rows are renormalised (fp16 rounding of the top-k log-probs leaves them off by < 1e-2).

    >>> logits = torch.log(torch.tensor([[0.05, 0.10, 0.15, 0.20, 0.50]]))
    >>> rec = build_record("r1", [2, 3, 4, 1], 2, [2], logits, k=2, drafter_id="d", version=0)
    >>> dense_target(rec, 5).exp().mul(100).round().tolist()
    [[10.0, 10.0, 10.0, 20.0, 50.0]]
    """
    validate(record, vocab_size)
    m, k = record.topk_ids.shape
    ids = torch.from_numpy(record.topk_ids.astype(np.int64))  # [m, k]
    top = torch.from_numpy(record.topk_logprobs.astype(np.float32))  # [m, k]
    tail = torch.from_numpy(record.tail_logmass.astype(np.float32))  # [m]
    fill = tail - math.log(vocab_size - k) if k < vocab_size else torch.full((m,), -math.inf)
    out = fill[:, None].expand(m, vocab_size).clone()  # [m, V]
    out.scatter_(1, ids, top)
    return torch.log_softmax(out, dim=-1)


def should_log(request_id: str, rate: float, seed: int = 0) -> bool:
    """Deterministically choose a fraction ``rate`` of requests by hashing their id.

    The same (id, seed) always gives the same answer, on every replica and every run.

    >>> should_log("req-1", 1.0), should_log("req-1", 0.0)
    (True, False)
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate!r}")
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(f"{seed}:{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < rate
