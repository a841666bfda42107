"""The weight registry: versions per drafter, validation, the promotion gate, stores.

Flow: a trainer **publishes** a candidate (validated: names, shapes, dtypes, finiteness,
checksum) → the **gate** scores it against the live version on held-out records → it is
**promoted** (live) or **rejected**; replicas poll the live version and hot-swap it. The
:class:`Promoter` is that flow, used by ``osd online`` and the registry actor alike.

Modules: :mod:`~osd.registry.weights` (canonical bytes, checksums, checks),
:mod:`~osd.registry.store` (metadata; memory and disk stores), :mod:`~osd.registry.gate`
(expected acceptance on held-out records), :mod:`~osd.registry.versions` (the registry),
:mod:`~osd.registry.promotion` (publish → gate → promote, and loading any version),
:mod:`~osd.registry.epochs` (an emptied or replaced store) and :mod:`~osd.registry.watch`
(the post-swap watch: roll back a version that serves worse than its predecessor).
"""

from osd.registry.gate import (
    AcceptanceEstimate,
    GateDecision,
    PromotionGate,
    draft_acceptance,
    sparse_target,
)
from osd.registry.promotion import Outcome, Promoter
from osd.registry.store import (
    KINDS,
    STATUSES,
    DiskStore,
    DrafterMeta,
    MemoryStore,
    RegistryError,
    RegistryStore,
    VersionInfo,
    check_drafter_id,
)
from osd.registry.versions import Registry
from osd.registry.watch import PostSwapWatch, WatchVerdict
from osd.registry.weights import (
    TensorSpec,
    WeightValidationError,
    check_weights,
    checksum,
    spec_of,
    weights_from_bytes,
    weights_to_bytes,
)

__all__ = [
    "KINDS",
    "STATUSES",
    "AcceptanceEstimate",
    "DiskStore",
    "DrafterMeta",
    "GateDecision",
    "MemoryStore",
    "Outcome",
    "PostSwapWatch",
    "Promoter",
    "PromotionGate",
    "Registry",
    "RegistryError",
    "RegistryStore",
    "TensorSpec",
    "VersionInfo",
    "WatchVerdict",
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
