"""What the registry stores about each drafter, and where: metadata and the stores.

A drafter's metadata is a :class:`DrafterMeta`: its :class:`VersionInfo` list, the live
pointer, the live history and the per-kind references. A store keeps it, with the weight
bytes of each version: :class:`MemoryStore` in process (the metadata still round-trips
through JSON, as on disk) or :class:`DiskStore` under a directory.

**Epochs**: every drafter's metadata carries an ``epoch`` id, drawn when its base is
registered into a store that does not hold it. A registry that finds its store emptied or
replaced (another epoch) knows it, and versions are named ``(epoch, version, checksum)``
(:meth:`VersionInfo.ref`): version numbers restart in a new epoch. ``events`` is the
drafter's persisted history — gate decisions, promotions, rollbacks, replicas' adoptions,
epoch changes — newest last, at most :data:`MAX_EVENTS`.

A :class:`DiskStore` is owned by one registry process at a time; its writes are atomic
(temp file + ``os.replace``), so a crash leaves either the old or the new index, never a
torn one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from osd.distill.lora import LoraSpec
from osd.registry.weights import TensorSpec

__all__ = [
    "KINDS",
    "STATUSES",
    "DiskStore",
    "DrafterMeta",
    "MemoryStore",
    "RegistryError",
    "RegistryStore",
    "VersionInfo",
    "check_drafter_id",
    "new_epoch",
]

KINDS = ("full", "lora")
STATUSES = ("candidate", "live", "rejected", "retired")
INDEX_FORMAT = 1
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_EVENTS = 500
LEGACY_EPOCH = "legacy"  # indexes written before epochs


def new_epoch() -> str:
    """A fresh epoch id: UTC time (sortable, readable) and 6 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


class RegistryError(RuntimeError):
    """An unknown drafter or version, or a transition its current state does not allow."""


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


# ---- metadata ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionInfo:
    """One version of one drafter. JSON-serialisable through :meth:`to_dict`.

    A ``"lora"`` version is loadable from the registry alone: ``lora`` holds its
    :class:`~osd.distill.lora.LoraSpec` (rank, alpha, dropout, target modules and the
    ``base_version`` — a ``"full"`` version — the adapter sits on).
    """

    drafter_id: str
    version: int  # 0 = base
    kind: str  # "full" | "lora"
    checksum: str  # sha256 hex of the canonical safetensors bytes
    provenance: dict[str, Any] = field(default_factory=dict)  # trainer, steps, records_seen, …
    evaluation: dict[str, Any] = field(default_factory=dict)  # acceptance, live_acceptance, …
    status: str = "candidate"  # "candidate" | "live" | "rejected" | "retired"
    created: float = field(default_factory=time.time)  # unix time
    parent: int | None = None  # the version it was trained from
    lora: dict[str, Any] | None = None  # LoraSpec.to_dict() iff kind == "lora"
    epoch: str = ""  # the epoch of the drafter's metadata it was stored in

    def __post_init__(self) -> None:
        check_drafter_id(self.drafter_id)
        if not isinstance(self.epoch, str) or len(self.epoch) > 64:
            raise ValueError(f"epoch must be a short string, got {self.epoch!r:.80}")
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
        if self.kind == "lora":
            if self.lora is None:
                raise ValueError(
                    f"v{self.version} is a LoRA adapter without its LoRA spec (r, alpha, "
                    "target modules, base version); publish it with lora=LoraSpec(...)"
                )
            spec = self.lora_spec
            if spec.base_version >= self.version:
                raise ValueError(
                    f"LoRA base v{spec.base_version} must be older than v{self.version}"
                )
            object.__setattr__(self, "lora", spec.to_dict())
        elif self.lora is not None:
            raise ValueError(f"v{self.version} is {self.kind} weights; only lora has a LoRA spec")

    @property
    def lora_spec(self) -> LoraSpec | None:
        return None if self.lora is None else LoraSpec.from_dict(self.lora)

    def ref(self) -> dict[str, Any]:
        """What names this version across registry restarts: epoch, version, checksum."""
        return {"epoch": self.epoch, "version": self.version, "checksum": self.checksum}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: Any) -> VersionInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        if isinstance(doc, dict) and "lora" not in doc:  # indexes written before LoRA specs
            doc = {**doc, "lora": None}
        if isinstance(doc, dict) and "epoch" not in doc:  # … and before epochs
            doc = {**doc, "epoch": LEGACY_EPOCH}
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
    epoch: str = field(default_factory=new_epoch)
    events: list[dict[str, Any]] = field(default_factory=list)  # history, newest last

    def add_event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append ``{"kind", "time", "epoch", **fields}`` (JSON-checked); keep the newest."""
        event = _check_json(
            "event", {"kind": kind, "time": time.time(), "epoch": self.epoch, **fields}
        )
        self.events = [*self.events[-(MAX_EVENTS - 1) :], event]
        return event

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
            "epoch": self.epoch,
            "events": list(self.events),
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
        epoch = doc.get("epoch", LEGACY_EPOCH)
        if not isinstance(epoch, str) or not epoch or len(epoch) > 64:
            raise ValueError(f"index of {drafter_id!r}: bad epoch {epoch!r:.80}")
        events = doc.get("events", [])
        if not isinstance(events, list):
            raise ValueError(f"index of {drafter_id!r}: events must be a list")
        events = [_check_json("event", e) for e in events[-MAX_EVENTS:]]
        meta = cls(drafter_id, versions, _check_version(doc["live"]), [], refs, epoch, events)
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
