"""The weight registry: versioned drafter weights, validated before any of them goes live.

Terms:

- **drafter id**: names one drafter, 1–64 characters from ``A-Z a-z 0-9 _ . -`` starting
  with a letter or digit. It becomes a directory name or a key, so nothing else is accepted.
- **version**: an int per drafter; ``0`` is the **base** registered first, then 1, 2, …
  in publish order. Each has a :class:`VersionInfo`: kind (``"full"`` weights or a
  ``"lora"`` adapter), checksum, provenance, evaluation and **status**::

      candidate --promote--> live --(another is promoted)--> retired --promote--> live
      candidate / retired --reject--> rejected       live --rollback--> rejected

- **reference**: per kind, the tensor names, shapes and dtypes (:class:`TensorSpec`) every
  version of that kind must have: the base for its own kind; for the other kind a spec
  given to :meth:`Registry.register_base`, else the first version published of that kind.
- **canonical bytes**: ``safetensors`` bytes of the contiguous CPU tensors in name order
  (:func:`weights_to_bytes`); the **checksum** is their sha256. Weights are never pickled:
  they come from other processes and machines, and ``safetensors`` holds only data.
- **live history**: the versions that were live before the current one, newest last;
  :meth:`Registry.rollback` goes back one step.

Publishing checks, before anything is stored, that the names equal the reference's, that
shapes and dtypes match, that every float is finite and that the checksum (when given)
matches. A failure raises :class:`WeightValidationError` naming the tensor and changes
nothing. Loading re-checks the checksum, so a corrupted file is caught, not served.

Worked example (one 2×2 tensor; ``v1`` ones, then a wrong shape)::

    >>> reg = Registry(MemoryStore())
    >>> reg.register_base("draft-a", {"w": torch.zeros(2, 2)}).status
    'live'
    >>> v1 = reg.publish("draft-a", {"w": torch.ones(2, 2)}, provenance={"steps": 10})
    >>> v1.version, v1.status, reg.live_version("draft-a")
    (1, 'candidate', 0)
    >>> reg.promote("draft-a", 1).status, reg.live_version("draft-a")
    ('live', 1)
    >>> reg.rollback("draft-a").version, reg.info("draft-a", 1).status
    (0, 'rejected')
    >>> reg.publish("draft-a", {"w": torch.ones(2, 3)})
    Traceback (most recent call last):
    ...
    osd.registry.WeightValidationError: draft-a v2 (full): tensor 'w' has shape [2, 3]; the reference has [2, 2]

**Promotion gate** (:class:`PromotionGate`): the expected acceptance of a draft at a logged
position is ``Σ_x min(p(x), q(x)) = 1 − TVD(p, q)``
(:func:`osd.distill.losses.expected_acceptance`, on the top-k + tail support). The record
holds ``q``; ``p`` comes from ONE forward of the draft over the record's token ids (logits
at index ``t − 1`` predict token ``t``), so the target never runs. The gate averages it over
every logged position of held-out records, for the candidate and for the live draft, and
promotes iff ``candidate ≥ live − margin`` on at least ``min_records`` records.

A :class:`DiskStore` is owned by one registry process at a time; its writes are atomic
(temp file + ``os.replace``), so a crash leaves either the old or the new index, never a
torn one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch
from torch import Tensor

from osd.distill.losses import SparseTarget, expected_acceptance
from osd.distill.record import DistillRecord, validate

__all__ = [
    "KINDS",
    "STATUSES",
    "AcceptanceEstimate",
    "DiskStore",
    "DrafterMeta",
    "GateDecision",
    "MemoryStore",
    "PromotionGate",
    "Registry",
    "RegistryError",
    "RegistryStore",
    "TensorSpec",
    "VersionInfo",
    "WeightValidationError",
    "check_drafter_id",
    "check_weights",
    "checksum",
    "draft_acceptance",
    "sparse_target",
    "spec_of",
    "weights_from_bytes",
    "weights_to_bytes",
]

logger = logging.getLogger(__name__)

KINDS = ("full", "lora")
STATUSES = ("candidate", "live", "rejected", "retired")
INDEX_FORMAT = 1
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class RegistryError(RuntimeError):
    """An unknown drafter or version, or a transition its current state does not allow."""


class WeightValidationError(ValueError):
    """Weights that must not go live: wrong names, shapes or dtypes, non-finite, bad checksum."""


# ---- small checks ------------------------------------------------------------------------


def check_drafter_id(drafter_id: Any) -> str:
    """Return ``drafter_id`` if it is safe as a path component and a key; else ``ValueError``.

    >>> check_drafter_id("draft-a.v2")
    'draft-a.v2'
    """
    if not isinstance(drafter_id, str) or not _ID_RE.fullmatch(drafter_id):
        raise ValueError(
            f"drafter id {drafter_id!r:.80} is not allowed: use 1-64 characters from "
            "A-Z a-z 0-9 _ . - starting with a letter or digit"
        )
    return drafter_id


def _check_version(version: Any) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"a version is an int >= 0, got {version!r:.40}")
    return version


def _check_kind(kind: Any) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r:.40}")
    return kind


def _check_json(name: str, value: Any) -> dict[str, Any]:
    """A dict with str keys that survives standard JSON (no NaN/inf); returns a deep copy."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{name} must be a dict with str keys, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be standard JSON (no NaN/inf, no objects): {err}") from None


def _few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(s) for s in names[:n])
    return f"[{shown}{', …' if len(names) > n else ''}] ({len(names)})"


# ---- weights: canonical bytes, checksum, specs -------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorSpec:
    """What a reference fixes about one tensor: its shape and dtype (``"float32"``, …)."""

    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, tensor: Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), _dtype_name(tensor.dtype))


def spec_of(weights: Mapping[str, Tensor | TensorSpec]) -> dict[str, TensorSpec]:
    """Name → :class:`TensorSpec` of a state dict (specs pass through)."""
    return {
        name: t if isinstance(t, TensorSpec) else TensorSpec.of(t)
        for name, t in sorted(weights.items())
    }


def _check_state_dict(weights: Any, what: str) -> None:
    if not isinstance(weights, Mapping):
        raise WeightValidationError(f"{what}: weights must be a dict of tensors or bytes")
    for name, t in weights.items():
        if not isinstance(name, str) or not isinstance(t, Tensor):
            raise WeightValidationError(
                f"{what}: entry {name!r:.80} is {type(t).__name__}; need str → torch.Tensor"
            )


def weights_to_bytes(weights: Mapping[str, Tensor]) -> bytes:
    """Canonical ``safetensors`` bytes: contiguous CPU tensors, names sorted, no metadata.

    The same tensors give the same bytes whatever the dict order or device.

    >>> a = weights_to_bytes({"b": torch.ones(2), "a": torch.zeros(3)})
    >>> a == weights_to_bytes({"a": torch.zeros(3), "b": torch.ones(2)})
    True
    """
    _check_state_dict(weights, "weights_to_bytes")
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name in sorted(weights):
        t = weights[name].detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():  # tied weights: safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return safetensors.torch.save(out)


def weights_from_bytes(data: bytes) -> dict[str, Tensor]:
    """Parse ``safetensors`` bytes into CPU tensors (no code runs: it is data only)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WeightValidationError(f"weights must be bytes, got {type(data).__name__}")
    try:
        return safetensors.torch.load(bytes(data))
    except Exception as err:  # SafetensorError, or a malformed header
        raise WeightValidationError(f"not valid safetensors bytes: {err}") from None


def checksum(data: bytes) -> str:
    """sha256 hex digest of weight bytes."""
    return hashlib.sha256(data).hexdigest()


_checksum_of = checksum  # for `Registry.publish`, whose parameter `checksum` shadows it


def check_weights(
    weights: Mapping[str, Tensor], reference: Mapping[str, TensorSpec] | None, what: str
) -> None:
    """Raise :class:`WeightValidationError` unless ``weights`` match ``reference`` (names,
    shapes, dtypes; skipped when ``None``) and every float is finite. ``what`` prefixes the
    message, e.g. ``"draft-a v3 (full)"``."""
    _check_state_dict(weights, what)
    if reference is not None:
        missing = sorted(set(reference) - set(weights))
        extra = sorted(set(weights) - set(reference))
        if missing or extra:
            raise WeightValidationError(
                f"{what}: tensor names differ from the reference: missing {_few(missing)}, "
                f"unexpected {_few(extra)}"
            )
        for name in sorted(reference):
            got, want = TensorSpec.of(weights[name]), reference[name]
            if got.shape != want.shape:
                raise WeightValidationError(
                    f"{what}: tensor {name!r} has shape {list(got.shape)}; the reference "
                    f"has {list(want.shape)}"
                )
            if got.dtype != want.dtype:
                raise WeightValidationError(
                    f"{what}: tensor {name!r} has dtype {got.dtype}; the reference has {want.dtype}"
                )
    for name in sorted(weights):
        t = weights[name]
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            n_nan = int(t.isnan().sum())
            n_inf = int((~torch.isfinite(t)).sum()) - n_nan
            raise WeightValidationError(
                f"{what}: tensor {name!r} has {n_nan} NaN and {n_inf} inf values out of "
                f"{t.numel()}; refusing non-finite weights"
            )


# ---- metadata ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionInfo:
    """One version of one drafter. JSON-serialisable through :meth:`to_dict`."""

    drafter_id: str
    version: int  # 0 = base
    kind: str  # "full" | "lora"
    checksum: str  # sha256 hex of the canonical safetensors bytes
    provenance: dict[str, Any] = field(default_factory=dict)  # trainer, steps, records_seen, …
    evaluation: dict[str, Any] = field(default_factory=dict)  # acceptance, live_acceptance, …
    status: str = "candidate"  # "candidate" | "live" | "rejected" | "retired"
    created: float = field(default_factory=time.time)  # unix time
    parent: int | None = None  # the version it was trained from

    def __post_init__(self) -> None:
        check_drafter_id(self.drafter_id)
        _check_version(self.version)
        _check_kind(self.kind)
        if not isinstance(self.checksum, str) or not _HEX64.fullmatch(self.checksum):
            raise ValueError(f"checksum must be 64 lowercase hex digits, got {self.checksum!r:.80}")
        object.__setattr__(self, "provenance", _check_json("provenance", self.provenance))
        object.__setattr__(self, "evaluation", _check_json("evaluation", self.evaluation))
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r:.40}")
        created = self.created
        if isinstance(created, bool) or not isinstance(created, int | float):
            raise ValueError(f"created must be a unix time, got {type(created).__name__}")
        if not math.isfinite(created):
            raise ValueError(f"created must be finite, got {created}")
        if self.parent is not None and _check_version(self.parent) >= self.version:
            raise ValueError(f"parent v{self.parent} must be older than v{self.version}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: Any) -> VersionInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(doc, dict) or set(doc) != names:
            got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"a version entry needs exactly the keys {sorted(names)}; got {got}")
        return cls(**doc)


@dataclass
class DrafterMeta:
    """Everything a store keeps about one drafter besides the weight bytes."""

    drafter_id: str
    versions: list[VersionInfo]  # ascending version
    live: int
    history: list[int] = field(default_factory=list)  # previously live, newest last
    references: dict[str, dict[str, TensorSpec]] = field(default_factory=dict)  # kind → spec

    def info(self, version: int) -> VersionInfo:
        for info in self.versions:
            if info.version == version:
                return info
        have = [i.version for i in self.versions]
        raise RegistryError(f"drafter {self.drafter_id!r} has no version {version}; has {have}")

    def replace(self, info: VersionInfo) -> None:
        self.versions = [info if i.version == info.version else i for i in self.versions]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "drafter_id": self.drafter_id,
            "live": self.live,
            "history": list(self.history),
            "references": {
                kind: {n: {"shape": list(s.shape), "dtype": s.dtype} for n, s in spec.items()}
                for kind, spec in self.references.items()
            },
            "versions": [v.to_dict() for v in self.versions],
        }

    @classmethod
    def from_dict(cls, doc: Any) -> DrafterMeta:
        if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
            raise ValueError(f"registry index must be a map with format {INDEX_FORMAT}")
        drafter_id = check_drafter_id(doc["drafter_id"])
        versions = [VersionInfo.from_dict(v) for v in doc["versions"]]
        refs: dict[str, dict[str, TensorSpec]] = {}
        for kind, spec in doc["references"].items():
            refs[_check_kind(kind)] = {
                str(n): TensorSpec(tuple(int(d) for d in s["shape"]), str(s["dtype"]))
                for n, s in spec.items()
            }
        meta = cls(drafter_id, versions, _check_version(doc["live"]), [], refs)
        meta.history = [meta.info(_check_version(v)).version for v in doc["history"]]
        if meta.info(meta.live).status != "live":
            raise ValueError(f"index of {drafter_id!r}: live v{meta.live} is not marked live")
        if any(v.drafter_id != drafter_id for v in versions):
            raise ValueError(f"index of {drafter_id!r} holds versions of another drafter")
        return meta


# ---- stores ----------------------------------------------------------------------------------


class RegistryStore(Protocol):
    """Where the registry keeps weight bytes and per-drafter metadata."""

    def put_weights(self, drafter_id: str, version: int, data: bytes) -> None: ...
    def get_weights(self, drafter_id: str, version: int) -> bytes: ...
    def delete_weights(self, drafter_id: str, version: int) -> None: ...
    def put_meta(self, drafter_id: str, meta: DrafterMeta) -> None: ...
    def get_meta(self, drafter_id: str) -> DrafterMeta | None: ...
    def drafter_ids(self) -> list[str]: ...


class MemoryStore:
    """In-process store; metadata round-trips through JSON exactly as on disk."""

    def __init__(self) -> None:
        self._weights: dict[tuple[str, int], bytes] = {}
        self._meta: dict[str, str] = {}

    def put_weights(self, drafter_id: str, version: int, data: bytes) -> None:
        self._weights[(check_drafter_id(drafter_id), _check_version(version))] = bytes(data)

    def get_weights(self, drafter_id: str, version: int) -> bytes:
        try:
            return self._weights[(drafter_id, version)]
        except KeyError:
            raise RegistryError(f"no weights stored for {drafter_id!r} v{version}") from None

    def delete_weights(self, drafter_id: str, version: int) -> None:
        self._weights.pop((drafter_id, version), None)

    def put_meta(self, drafter_id: str, meta: DrafterMeta) -> None:
        self._meta[check_drafter_id(drafter_id)] = json.dumps(meta.to_dict())

    def get_meta(self, drafter_id: str) -> DrafterMeta | None:
        text = self._meta.get(check_drafter_id(drafter_id))
        return None if text is None else DrafterMeta.from_dict(json.loads(text))

    def drafter_ids(self) -> list[str]:
        return sorted(self._meta)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DiskStore:
    """``root/<drafter_id>/v<N>.safetensors`` and ``root/<drafter_id>/index.json``.

    A registry restarted on the same ``root`` sees every version and the live pointer.
    """

    INDEX = "index.json"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, drafter_id: str) -> Path:
        return self.root / check_drafter_id(drafter_id)

    def weights_path(self, drafter_id: str, version: int) -> Path:
        return self._dir(drafter_id) / f"v{_check_version(version)}.safetensors"

    def put_weights(self, drafter_id: str, version: int, data: bytes) -> None:
        _atomic_write(self.weights_path(drafter_id, version), bytes(data))

    def get_weights(self, drafter_id: str, version: int) -> bytes:
        path = self.weights_path(drafter_id, version)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise RegistryError(
                f"no weights stored for {drafter_id!r} v{version} ({path})"
            ) from None

    def delete_weights(self, drafter_id: str, version: int) -> None:
        self.weights_path(drafter_id, version).unlink(missing_ok=True)

    def put_meta(self, drafter_id: str, meta: DrafterMeta) -> None:
        text = json.dumps(meta.to_dict(), indent=1, sort_keys=True)
        _atomic_write(self._dir(drafter_id) / self.INDEX, text.encode())

    def get_meta(self, drafter_id: str) -> DrafterMeta | None:
        path = self._dir(drafter_id) / self.INDEX
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RegistryError(f"registry index {path} is unreadable: {err}") from None
        try:
            return DrafterMeta.from_dict(doc)
        except (KeyError, TypeError, ValueError, RegistryError) as err:
            raise RegistryError(f"registry index {path} is invalid: {err}") from None

    def drafter_ids(self) -> list[str]:
        return sorted(
            p.name
            for p in self.root.iterdir()
            if _ID_RE.fullmatch(p.name) and (p / self.INDEX).is_file()
        )


# ---- promotion gate ----------------------------------------------------------------------------


def sparse_target(record: DistillRecord) -> SparseTarget:
    """A record's logged top-k + tail as a :class:`SparseTarget` ([m, k], [m, k], [m])."""
    return SparseTarget(
        topk_ids=torch.as_tensor(record.topk_ids, dtype=torch.long),
        topk_logprobs=torch.as_tensor(record.topk_logprobs, dtype=torch.float32),
        tail_logmass=torch.as_tensor(record.tail_logmass, dtype=torch.float32),
    )


@dataclass(frozen=True)
class AcceptanceEstimate:
    """Mean expected acceptance of one draft over the logged positions of some records."""

    mean: float  # over positions; 0.0 when there are none
    positions: int
    records: int  # records with at least one logged position


@torch.no_grad()
def draft_acceptance(
    model: torch.nn.Module, records: list[DistillRecord], temperature: float = 1.0
) -> AcceptanceEstimate:
    """Run only the draft ``model`` (an HF causal LM) once per record and average
    ``Σ min(p, q)`` over all logged positions.

    A record with tokens ``[5, 9, 2, 7]``, prompt 2, positions ``[2, 3]`` takes logits rows
    1 and 2 of ``model([[5, 9, 2, 7]])`` (they predict tokens 2 and 7) against its top-k.
    """
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, positions, used = 0.0, 0, 0
    try:
        for record in records:
            validate(record, vocab)
            if record.num_positions == 0:
                continue
            ids = torch.as_tensor(record.token_ids, dtype=torch.long, device=device)[None]
            logits = model(ids).logits[0]  # [T, V]
            rows = torch.as_tensor(record.positions, dtype=torch.long, device=device) - 1
            acc = expected_acceptance(
                logits[rows].float().cpu(), sparse_target(record), temperature
            )
            total += float(acc.double().sum())  # acc: [m]
            positions += record.num_positions
            used += 1
    finally:
        model.train(was_training)
    return AcceptanceEstimate(total / positions if positions else 0.0, positions, used)


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict and the numbers behind it."""

    promote: bool
    candidate: float  # mean expected acceptance of the candidate
    live: float  # … of the live draft on the same positions
    records: int
    reason: str
    positions: int = 0

    def evaluation(self) -> dict[str, Any]:
        """What :meth:`Registry.gate_and_promote` records in ``VersionInfo.evaluation``."""
        return {
            "acceptance": self.candidate,
            "live_acceptance": self.live,
            "records": self.records,
            "positions": self.positions,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class PromotionGate:
    """Promote iff ``candidate ≥ live − margin`` measured on ``≥ min_records`` records.

    A negative ``margin`` demands a strict improvement of ``|margin|``.
    """

    margin: float = 0.0
    min_records: int = 1

    def __post_init__(self) -> None:
        if not math.isfinite(self.margin):
            raise ValueError(f"margin must be finite, got {self.margin}")
        if isinstance(self.min_records, bool) or not isinstance(self.min_records, int):
            raise ValueError(f"min_records must be an int, got {self.min_records!r}")
        if self.min_records < 1:
            raise ValueError(f"min_records must be >= 1, got {self.min_records}")

    def evaluate(
        self,
        candidate_model: torch.nn.Module,
        live_model: torch.nn.Module,
        records: list[DistillRecord],
        temperature: float = 1.0,
    ) -> GateDecision:
        cand = draft_acceptance(candidate_model, records, temperature)
        live = draft_acceptance(live_model, records, temperature)
        if cand.records < self.min_records:
            ok = False
            reason = (
                f"{cand.records} records with logged positions; the gate needs {self.min_records}"
            )
        else:
            ok = cand.mean >= live.mean - self.margin
            sign = ">=" if ok else "<"
            reason = (
                f"acceptance {cand.mean:.4f} {sign} live {live.mean:.4f} - margin {self.margin} "
                f"over {cand.positions} positions of {cand.records} records"
            )
        return GateDecision(ok, cand.mean, live.mean, cand.records, reason, cand.positions)


# ---- the registry ----------------------------------------------------------------------------


class Registry:
    """Per drafter id, an ordered list of validated versions and a live pointer.

    Metadata is cached in memory and written through to the store on every change; the
    store write happens first, so a failed write leaves the registry as it was.
    """

    def __init__(self, store: RegistryStore | None = None) -> None:
        self.store: RegistryStore = MemoryStore() if store is None else store
        self._meta: dict[str, DrafterMeta] = {}
        self._lock = threading.RLock()

    # -- reading
    def _get(self, drafter_id: str) -> DrafterMeta:
        check_drafter_id(drafter_id)
        meta = self._meta.get(drafter_id)
        if meta is None:
            meta = self.store.get_meta(drafter_id)
            if meta is None:
                known = self.drafters()
                raise RegistryError(f"unknown drafter {drafter_id!r}; registered: {known}")
            self._meta[drafter_id] = meta
        return meta

    def drafters(self) -> list[str]:
        return sorted(set(self.store.drafter_ids()) | set(self._meta))

    def info(self, drafter_id: str, version: int) -> VersionInfo:
        with self._lock:
            return copy.deepcopy(self._get(drafter_id).info(version))

    def versions(self, drafter_id: str) -> list[VersionInfo]:
        with self._lock:
            return copy.deepcopy(self._get(drafter_id).versions)

    def live(self, drafter_id: str) -> VersionInfo:
        with self._lock:
            meta = self._get(drafter_id)
            return copy.deepcopy(meta.info(meta.live))

    def live_version(self, drafter_id: str) -> int:
        """The live version number: a dict lookup once cached, cheap enough to poll."""
        with self._lock:
            return self._get(drafter_id).live

    def weight_bytes(self, drafter_id: str, version: int | None = None) -> bytes:
        """Stored bytes of ``version`` (default: live), checksum re-verified."""
        with self._lock:
            meta = self._get(drafter_id)
            info = meta.info(meta.live if version is None else version)
        data = self.store.get_weights(drafter_id, info.version)
        got = checksum(data)
        if got != info.checksum:
            raise WeightValidationError(
                f"{drafter_id} v{info.version}: stored weights fail their checksum "
                f"(expected {info.checksum[:16]}…, got {got[:16]}…); the stored copy is "
                "corrupted — reject this version or publish it again"
            )
        return data

    def weights(self, drafter_id: str, version: int | None = None) -> dict[str, Tensor]:
        """The tensors of ``version`` (default: live) on CPU, checksum re-verified."""
        return weights_from_bytes(self.weight_bytes(drafter_id, version))

    # -- writing
    def _commit(self, meta: DrafterMeta) -> None:
        self.store.put_meta(meta.drafter_id, meta)
        self._meta[meta.drafter_id] = meta

    def register_base(
        self,
        drafter_id: str,
        state_dict: Mapping[str, Tensor],
        kind: str = "full",
        provenance: dict[str, Any] | None = None,
        lora_spec: Mapping[str, Tensor | TensorSpec] | None = None,
    ) -> VersionInfo:
        """Register version 0 (live) and the reference of its kind.

        ``lora_spec`` (a LoRA adapter state dict or specs) fixes the ``"lora"`` reference;
        without it the first ``"lora"`` version published does. Registering again with
        identical weights returns the existing base; different weights raise.
        """
        check_drafter_id(drafter_id)
        _check_kind(kind)
        what = f"{drafter_id} v0 ({kind})"
        check_weights(state_dict, None, what)
        data = weights_to_bytes(state_dict)
        info = VersionInfo(drafter_id, 0, kind, checksum(data), provenance or {}, status="live")
        with self._lock:
            try:
                old = self._get(drafter_id).info(0)
            except RegistryError:
                old = None
            if old is not None:
                if (old.checksum, old.kind) == (info.checksum, info.kind):
                    return copy.deepcopy(old)
                raise RegistryError(
                    f"drafter {drafter_id!r} is already registered with a different base "
                    f"(kind {old.kind}, checksum {old.checksum[:16]}…); use another id"
                )
            refs = {kind: spec_of(state_dict)}
            if lora_spec is not None:
                if kind == "lora":
                    raise ValueError("lora_spec is for a full base; a lora base is its own spec")
                refs["lora"] = spec_of(lora_spec)
            self.store.put_weights(drafter_id, 0, data)
            self._commit(DrafterMeta(drafter_id, [info], live=0, references=refs))
        logger.info("registered %s v0 (%s, %d tensors)", drafter_id, kind, len(state_dict))
        return copy.deepcopy(info)

    def publish(
        self,
        drafter_id: str,
        weights: Mapping[str, Tensor] | bytes,
        provenance: dict[str, Any] | None = None,
        checksum: str | None = None,
        kind: str = "full",
        parent: int | None = None,
    ) -> VersionInfo:
        """Validate ``weights`` against the reference of ``kind`` and store them as the next
        version, a ``"candidate"``. ``checksum`` (sha256 hex) may be of the bytes sent or of
        their canonical form. Raises :class:`WeightValidationError`; nothing changes then.
        """
        _check_kind(kind)
        prov = _check_json("provenance", provenance or {})
        with self._lock:
            meta = copy.deepcopy(self._get(drafter_id))
            version = meta.versions[-1].version + 1
            if parent is not None:
                meta.info(_check_version(parent))
            what = f"{drafter_id} v{version} ({kind})"
            given = None
            if isinstance(weights, bytes | bytearray | memoryview):
                given = bytes(weights)
                weights = weights_from_bytes(given)
            check_weights(weights, meta.references.get(kind), what)
            data = weights_to_bytes(weights)
            digest = _checksum_of(data)
            if checksum is not None and checksum not in (digest, given and _checksum_of(given)):
                raise WeightValidationError(
                    f"{what}: checksum mismatch: given {checksum!r:.80}, computed {digest} — "
                    "the weights were altered or truncated in transit"
                )
            meta.references.setdefault(kind, spec_of(weights))
            info = VersionInfo(drafter_id, version, kind, digest, prov, parent=parent)
            meta.versions.append(info)
            self.store.put_weights(drafter_id, version, data)
            self._commit(meta)
        logger.info("published %s (%d bytes, provenance %s)", what, len(data), prov)
        return copy.deepcopy(info)

    def promote(
        self, drafter_id: str, version: int, evaluation: dict[str, Any] | None = None
    ) -> VersionInfo:
        """Make ``version`` live (from candidate or retired); the old live one is retired."""
        with self._lock:
            meta = copy.deepcopy(self._get(drafter_id))
            info = meta.info(version)
            if version == meta.live:
                return copy.deepcopy(info)
            if info.status not in ("candidate", "retired"):
                reason = info.evaluation.get("reason", "no reason recorded")
                raise RegistryError(
                    f"{drafter_id} v{version} is {info.status} ({reason}); publish it again "
                    "to retry"
                )
            old = meta.info(meta.live)
            meta.replace(dataclasses.replace(old, status="retired"))
            meta.history = [v for v in meta.history if v != version] + [old.version]
            info = dataclasses.replace(
                info, status="live", evaluation={**info.evaluation, **(evaluation or {})}
            )
            meta.replace(info)
            meta.live = version
            self._commit(meta)
        logger.info("promoted %s v%d (was v%d)", drafter_id, version, old.version)
        return copy.deepcopy(info)

    def reject(
        self,
        drafter_id: str,
        version: int,
        reason: str,
        evaluation: dict[str, Any] | None = None,
    ) -> VersionInfo:
        """Mark a candidate (or retired) version rejected; it can no longer be promoted."""
        with self._lock:
            meta = copy.deepcopy(self._get(drafter_id))
            info = meta.info(version)
            if version == meta.live:
                raise RegistryError(f"{drafter_id} v{version} is live; use rollback() instead")
            info = self._rejected(info, reason, evaluation)
            meta.replace(info)
            meta.history = [v for v in meta.history if v != version]
            self._commit(meta)
        logger.info("rejected %s v%d: %s", drafter_id, version, reason)
        return copy.deepcopy(info)

    @staticmethod
    def _rejected(info: VersionInfo, reason: str, evaluation: dict[str, Any] | None) -> VersionInfo:
        merged = {**info.evaluation, **(evaluation or {}), "reason": str(reason)}
        return dataclasses.replace(info, status="rejected", evaluation=merged)

    def rollback(self, drafter_id: str, reason: str = "rolled back") -> VersionInfo:
        """Put the previously live version back; the current one is marked rejected."""
        with self._lock:
            meta = copy.deepcopy(self._get(drafter_id))
            if not meta.history:
                raise RegistryError(
                    f"drafter {drafter_id!r} has no earlier live version to roll back to "
                    f"(live is v{meta.live})"
                )
            current = meta.info(meta.live)
            meta.replace(self._rejected(current, reason, None))
            previous = dataclasses.replace(meta.info(meta.history.pop()), status="live")
            meta.replace(previous)
            meta.live = previous.version
            self._commit(meta)
        logger.warning("rolled %s back from v%d to v%d", drafter_id, current.version, meta.live)
        return copy.deepcopy(previous)

    def gate_and_promote(
        self,
        drafter_id: str,
        version: int,
        gate: PromotionGate,
        candidate_model: torch.nn.Module,
        live_model: torch.nn.Module,
        records: list[DistillRecord],
        temperature: float = 1.0,
    ) -> GateDecision:
        """Evaluate candidate ``version`` (loaded in ``candidate_model``) against the live
        version (in ``live_model``) on ``records``; record the numbers and promote or reject.
        """
        with self._lock:
            info = self._get(drafter_id).info(version)
            if info.status != "candidate":
                raise RegistryError(f"{drafter_id} v{version} is {info.status}, not a candidate")
            live_before = self._get(drafter_id).live
        decision = gate.evaluate(candidate_model, live_model, records, temperature)  # unlocked
        evaluation = {
            **decision.evaluation(),
            "live_version": live_before,
            "margin": gate.margin,
            "temperature": temperature,
        }
        with self._lock:
            if self._get(drafter_id).live != live_before:
                raise RegistryError(
                    f"{drafter_id}: the live version changed during evaluation "
                    f"(v{live_before} → v{self._get(drafter_id).live}); evaluate again"
                )
            if decision.promote:
                self.promote(drafter_id, version, evaluation)
            else:
                self.reject(drafter_id, version, decision.reason, evaluation)
        return decision

    def gc(self, keep: int = 3) -> list[tuple[str, int]]:
        """Delete all but the newest ``keep`` versions of every drafter, always keeping the
        base, the live version and the rollback target. Returns ``(drafter_id, version)``."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        removed: list[tuple[str, int]] = []
        with self._lock:
            for drafter_id in self.drafters():
                meta = copy.deepcopy(self._get(drafter_id))
                protect = {0, meta.live, *meta.history[-1:]}
                protect |= {i.version for i in meta.versions[-keep:]}
                gone = [i.version for i in meta.versions if i.version not in protect]
                if not gone:
                    continue
                meta.versions = [i for i in meta.versions if i.version in protect]
                meta.history = [v for v in meta.history if v in protect]
                self._commit(meta)  # index first: it never points at a deleted file
                for version in gone:
                    self.store.delete_weights(drafter_id, version)
                    removed.append((drafter_id, version))
        if removed:
            logger.info("gc removed %d versions: %s", len(removed), removed)
        return removed
