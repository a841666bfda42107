"""What a distill record holds, and the checks on it: the :class:`DistillRecord` dataclass,
its limits and :func:`validate`. The wire format (msgpack), building a record from the
verifier's logits and the worked examples are in :mod:`osd.distill.record`, which
re-exports everything public here (import from there).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NoReturn

import numpy as np

FORMAT_VERSION = 3
# v1: no sampling fields (decoded as temperature 1, top-k/top-p off); v2: no stop fields
READ_VERSIONS = (1, 2, 3)
MAX_TEMPERATURE = 100.0  # far beyond any useful sampling temperature: a guard, not a policy
DEFAULT_K = 16
LOG_FLOOR = -30.0  # log-probs and the tail log-mass are clamped here (e^-30 ≈ 1e-13)
MAX_ARRAY_BYTES = 64 * 2**20  # all arrays of one record together
MAX_RECORD_BYTES = MAX_ARRAY_BYTES + 2**20  # arrays plus the scalar fields and framing
MAX_STR_LEN = 1024  # request id, drafter id, domain, meta keys and values
MAX_META_ITEMS = 32
MASS_TOL = 1e-2  # |Σ exp(topk) + exp(tail) − 1|: fp16 rounding of log-probs stays far inside

# Wire dtypes (all little-endian). bfloat16 is not a numpy dtype and is not accepted.
_WIRE_DTYPES: dict[str, np.dtype] = {
    "uint16": np.dtype("<u2"),
    "int32": np.dtype("<i4"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
}
_INT_WIRE = ("uint16", "int32")


@dataclass(frozen=True)
class _ArraySpec:
    wire: tuple[str, ...]  # accepted wire dtypes
    dtype: np.dtype  # in-memory dtype
    ndim: int


_ARRAYS: dict[str, _ArraySpec] = {
    "token_ids": _ArraySpec(_INT_WIRE, np.dtype(np.int32), 1),
    "positions": _ArraySpec(_INT_WIRE, np.dtype(np.int32), 1),
    "topk_ids": _ArraySpec(_INT_WIRE, np.dtype(np.int32), 2),
    "topk_logprobs": _ArraySpec(("float16",), np.dtype(np.float16), 2),
    # fp16 on the wire when that is lossless (build_record rounds to fp16 precision)
    "tail_logmass": _ArraySpec(("float16", "float32"), np.dtype(np.float32), 1),
    "hidden": _ArraySpec(("float16",), np.dtype(np.float16), 2),
    # v3: the early-stop decision model's features and labels at the drafted positions
    # that verification reached (osd.specdec.decision), when the drafter has one
    "stop_features": _ArraySpec(("float16",), np.dtype(np.float16), 2),
    "stop_labels": _ArraySpec(_INT_WIRE, np.dtype(np.int32), 1),
}
_OPTIONAL = ("hidden", "stop_features", "stop_labels")  # None when absent
_V3_ARRAYS = ("stop_features", "stop_labels")
_SCALARS = ("request_id", "domain", "drafter_id", "version", "prompt_len", "created", "meta")
# v2 adds "sampling": [temperature, top_k, top_p], integral numbers as msgpack ints (1 B)
_KEYS = {1: frozenset(("v", *_SCALARS, *(a for a in _ARRAYS if a not in _V3_ARRAYS)))}
_KEYS[2] = _KEYS[1] | {"sampling"}
_KEYS[3] = _KEYS[2] | set(_V3_ARRAYS)


class RecordError(ValueError):
    """A distillation record is malformed (bad bytes, wrong types, inconsistent shapes)."""


class LogMode(str, Enum):
    """Which positions of a request a replica logs."""

    REJECTED = "rejected"  # OSD: where the draft was wrong, plus the bonus position
    ALL = "all"  # every output position


@dataclass(frozen=True)
class LogConfig:
    """How a replica logs: mode, top-k size, sampling rate, and whether to keep hidden states.

    >>> LogConfig(mode="all", rate=0.25).mode
    <LogMode.ALL: 'all'>
    """

    mode: LogMode = LogMode.REJECTED
    k: int = DEFAULT_K
    rate: float = 1.0  # fraction of requests logged, chosen by :func:`should_log`
    seed: int = 0
    hidden: bool = False  # also log the target's last hidden state (head drafters)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", LogMode(self.mode))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        if not (isinstance(self.rate, int | float) and 0.0 <= self.rate <= 1.0):
            raise ValueError(f"rate must be a number in [0, 1], got {self.rate!r}")


@dataclass(eq=False, kw_only=True)
class DistillRecord:
    """One finished request: its tokens and the sparse target at the logged positions.

    Shapes: ``T`` tokens, ``m`` logged positions, ``k`` top-k entries, ``H`` hidden size.
    """

    request_id: str
    domain: str | None = None
    drafter_id: str
    version: int  # drafter weight version that served the request
    token_ids: np.ndarray  # [T] int32, prompt + output
    prompt_len: int
    positions: np.ndarray  # [m] int32, strictly increasing, prompt_len <= t < T
    topk_ids: np.ndarray  # [m, k] int32
    topk_logprobs: np.ndarray  # [m, k] float16, sorted descending, <= 0
    tail_logmass: np.ndarray  # [m] float32, log(1 - Σ exp(topk_logprobs)), >= LOG_FLOOR
    hidden: np.ndarray | None = None  # [m, H] float16, target last hidden state at t - 1
    stop_features: np.ndarray | None = None  # [n, 4] float16, decision-model features
    stop_labels: np.ndarray | None = None  # [n] int32, 1 = accepted, 0 = rejected
    temperature: float = 1.0  # the request's sampling temperature; 0 = greedy
    top_k: int = 0  # the request's top-k; 0 = off
    top_p: float = 1.0  # the request's nucleus mass; 1 = off
    created: float = field(default_factory=time.time)  # unix time
    meta: dict[str, str | int | float] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_positions(self) -> int:
        return int(self.positions.shape[0])

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def hidden_size(self) -> int | None:
        return None if self.hidden is None else int(self.hidden.shape[1])


# ----------------------------------------------------------------------------- validation


def _fail(msg: str) -> NoReturn:
    raise RecordError(msg)


def _check_str(name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        _fail(f"{name} must be a non-empty string, got {type(value).__name__} {value!r:.80}")
    if len(value) > MAX_STR_LEN:
        _fail(f"{name} has {len(value)} characters; the limit is {MAX_STR_LEN}")


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        _fail(f"{name} = {value} is outside [{lo}, {hi}]")


def _check_meta(meta: Any) -> None:
    if not isinstance(meta, dict):
        _fail(f"meta must be a dict, got {type(meta).__name__}")
    if len(meta) > MAX_META_ITEMS:
        _fail(f"meta has {len(meta)} items; the limit is {MAX_META_ITEMS}")
    for key, value in meta.items():
        _check_str("meta key", key)
        if isinstance(value, str):
            _check_str(f"meta[{key!r}]", value)
        elif isinstance(value, bool) or not isinstance(value, int | float):
            _fail(f"meta[{key!r}] must be str, int or float, got {type(value).__name__}")
        elif isinstance(value, int) and not -(2**63) <= value < 2**63:
            _fail(f"meta[{key!r}] = {value} does not fit in 64 bits")


def _check_sampling(temperature: Any, top_k: Any, top_p: Any) -> None:
    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    if not number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        _fail(
            f"temperature must be a finite number in [0, {MAX_TEMPERATURE}] (0 = greedy), "
            f"got {temperature!r:.40}"
        )
    _check_int("top_k", top_k, 0, 2**31 - 1)
    if not number(top_p) or not 0 < top_p <= 1:
        _fail(f"top_p must be a number in (0, 1] (1 = off), got {top_p!r:.40}")


def _check_array(name: str, arr: Any) -> None:
    spec = _ARRAYS[name]
    if not isinstance(arr, np.ndarray):
        _fail(f"{name} must be a numpy array, got {type(arr).__name__}")
    if arr.dtype != spec.dtype:
        _fail(f"{name} must have dtype {spec.dtype}, got {arr.dtype}")
    if arr.ndim != spec.ndim:
        _fail(f"{name} must have {spec.ndim} dimension(s), got shape {list(arr.shape)}")


def validate(record: DistillRecord, vocab_size: int | None = None) -> None:
    """Check every field and the consistency between them; raise :class:`RecordError`.

    ``vocab_size``, when given, bounds the token ids and the top-k ids.
    """
    if not isinstance(record, DistillRecord):
        _fail(f"expected a DistillRecord, got {type(record).__name__}")
    _check_str("request_id", record.request_id)
    _check_str("domain", record.domain, optional=True)
    _check_str("drafter_id", record.drafter_id)
    _check_int("version", record.version, 0, 2**63 - 1)
    if isinstance(record.created, bool) or not isinstance(record.created, int | float):
        _fail(f"created must be a unix time (float), got {type(record.created).__name__}")
    if not math.isfinite(record.created) or record.created < 0:
        _fail(f"created must be a finite unix time >= 0, got {record.created!r}")
    _check_meta(record.meta)
    _check_sampling(record.temperature, record.top_k, record.top_p)
    for name in _ARRAYS:
        arr = getattr(record, name)
        if arr is not None or name not in _OPTIONAL:
            _check_array(name, arr)
    total = sum(a.nbytes for a in (getattr(record, n) for n in _ARRAYS) if a is not None)
    if total > MAX_ARRAY_BYTES:
        _fail(f"arrays take {total} bytes; the limit is {MAX_ARRAY_BYTES}")
    if vocab_size is not None:
        _check_int("vocab_size", vocab_size, 1, 2**31 - 1)

    # tokens [T]
    tokens = record.token_ids
    n_tok = tokens.shape[0]
    if n_tok == 0:
        _fail("token_ids is empty")
    if tokens.min() < 0 or (vocab_size is not None and tokens.max() >= vocab_size):
        _fail(
            f"token_ids must lie in [0, {vocab_size or '2^31'}), got [{tokens.min()}, {tokens.max()}]"
        )
    _check_int("prompt_len", record.prompt_len, 1, n_tok)

    # positions [m]
    pos = record.positions
    m = pos.shape[0]
    if m and (pos.min() < record.prompt_len or pos.max() >= n_tok):
        _fail(
            f"positions must lie in [prompt_len, T) = [{record.prompt_len}, {n_tok}), "
            f"got [{pos.min()}, {pos.max()}]"
        )
    if m > 1 and not (np.diff(pos) > 0).all():
        _fail("positions must be strictly increasing")

    # top-k [m, k]
    ids, lp = record.topk_ids, record.topk_logprobs
    if ids.shape[0] != m or lp.shape[0] != m or record.tail_logmass.shape[0] != m:
        _fail(
            f"{m} positions but topk_ids has {ids.shape[0]} rows, topk_logprobs "
            f"{lp.shape[0]}, tail_logmass {record.tail_logmass.shape[0]}"
        )
    k = ids.shape[1]
    if k < 1 or lp.shape[1] != k:
        _fail(f"topk_ids has k = {k} and topk_logprobs k = {lp.shape[1]}; need equal and >= 1")
    if vocab_size is not None and k > vocab_size:
        _fail(f"k = {k} exceeds the vocabulary size {vocab_size}")
    if m:
        if ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size):
            _fail(
                f"topk_ids must lie in [0, {vocab_size or '2^31'}), got [{ids.min()}, {ids.max()}]"
            )
        if k > 1 and (np.diff(np.sort(ids, axis=1), axis=1) == 0).any():
            _fail("topk_ids repeat a token within a row")
        lp32 = lp.astype(np.float32)
        if not np.isfinite(lp32).all() or (lp32 > 0).any():
            _fail("topk_logprobs must be finite and <= 0")
        if k > 1 and (np.diff(lp32, axis=1) > 0).any():
            _fail("topk_logprobs must be sorted in descending order")
        tail = record.tail_logmass
        if not np.isfinite(tail).all() or (tail > 0).any():
            _fail("tail_logmass must be finite and <= 0")
        mass = np.exp(lp32.astype(np.float64)).sum(axis=1) + np.exp(tail.astype(np.float64))
        worst = float(np.abs(mass - 1.0).max())
        if worst > MASS_TOL:
            _fail(f"top-k mass plus tail mass must be 1 (±{MASS_TOL}); off by {worst:.4f}")

    # hidden [m, H]
    if record.hidden is not None:
        if record.hidden.shape[0] != m or record.hidden.shape[1] < 1:
            _fail(f"hidden must have shape [{m}, H >= 1], got {list(record.hidden.shape)}")
        if not np.isfinite(record.hidden).all():
            _fail("hidden contains NaN or inf")
    _check_stop(record.stop_features, record.stop_labels)


def _check_stop(x: np.ndarray | None, y: np.ndarray | None) -> None:
    """stop_features ``[n, 4]`` (finite) and stop_labels ``[n]`` (0 / 1): both or neither."""
    if x is None and y is None:
        return
    if x is None or y is None:
        _fail("stop_features and stop_labels come together")
    if x.shape[1] != 4 or y.shape[0] != x.shape[0]:
        _fail(f"stop_features [n, 4] and stop_labels [n]; got {list(x.shape)}, {list(y.shape)}")
    if not np.isfinite(x.astype(np.float32)).all():
        _fail("stop_features contain NaN or inf")
    if y.shape[0] and (y.min() < 0 or y.max() > 1):
        _fail("stop_labels must be 0 or 1")
