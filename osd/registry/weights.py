"""Drafter weights as data: canonical bytes, checksums, and checks against a reference.

Terms:

- **canonical bytes**: ``safetensors`` bytes of the contiguous CPU tensors in name order
  (:func:`weights_to_bytes`); the **checksum** is their sha256. Weights are never pickled:
  they come from other processes and machines, and ``safetensors`` holds only data.
- **reference**: the tensor names, shapes and dtypes (:class:`TensorSpec`, from
  :func:`spec_of`) that weights must match; :func:`check_weights` checks them, and that
  every float is finite, raising :class:`WeightValidationError` naming the tensor.

Example (two tensors; the order of the dict does not change the bytes)::

    >>> data = weights_to_bytes({"b": torch.ones(2), "a": torch.zeros(3)})
    >>> sorted(weights_from_bytes(data)), len(checksum(data))
    (['a', 'b'], 64)
    >>> check_weights({"a": torch.zeros(4)}, {"a": TensorSpec((3,), "float32")}, "draft-a v1")
    Traceback (most recent call last):
    ...
    osd.registry.weights.WeightValidationError: draft-a v1: tensor 'a' has shape [4]; the reference has [3]
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor

__all__ = [
    "TensorSpec",
    "WeightValidationError",
    "check_lora_adapter",
    "check_weights",
    "checksum",
    "spec_of",
    "weights_from_bytes",
    "weights_to_bytes",
]


class WeightValidationError(ValueError):
    """Weights that must not go live: wrong names, shapes or dtypes, non-finite, bad checksum."""


def _few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(s) for s in names[:n])
    return f"[{shown}{', …' if len(names) > n else ''}] ({len(names)})"


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
        return load_safetensors(bytes(data))  # safetensors: no code execution, unlike pickle
    except Exception as err:  # SafetensorError, or a malformed header
        raise WeightValidationError(f"not valid safetensors bytes: {err}") from None


def checksum(data: bytes) -> str:
    """sha256 hex digest of weight bytes."""
    return hashlib.sha256(data).hexdigest()


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


_LORA_NAME = re.compile(
    r"(?P<module>.+)\.lora_(?P<part>A|B|embedding_A|embedding_B)(\.[^.]+)?\.weight"
)
_PEFT_PREFIX = re.compile(r"^(base_model\.model\.)+")


def check_lora_adapter(
    weights: Mapping[str, Tensor],
    r: int,
    target_modules: tuple[str, ...] | list[str],
    full_reference: Mapping[str, TensorSpec] | None,
    what: str,
) -> None:
    """Refuse what is not a LoRA adapter of rank ``r`` on ``target_modules`` — full weights
    published as ``kind="lora"`` above all — before anything is stored.

    Every tensor must be a PEFT adapter tensor (``<module>.lora_A.weight`` /
    ``<module>.lora_B.weight``, or the embedding variants), on a module whose name ends
    with a target module, A and B in pairs, rank ``r`` in the right dimension, and — when
    the module's own weight is in the full reference — fitting its in/out features.
    """
    _check_state_dict(weights, what)
    targets = tuple(target_modules)
    pairs: dict[str, set[str]] = {}
    for name, t in weights.items():
        m = _LORA_NAME.fullmatch(name)
        if m is None:
            raise WeightValidationError(
                f"{what}: tensor {name!r} is not a LoRA adapter tensor (…lora_A.weight / "
                "…lora_B.weight): kind='lora' takes an adapter; publish full weights as "
                "kind='full'"
            )
        module, part = m["module"], m["part"]
        leaf = module.rsplit(".", 1)[-1]
        if leaf not in targets and not any(module.endswith("." + x) for x in targets):
            raise WeightValidationError(
                f"{what}: tensor {name!r} adapts {module!r}, not one of the spec's target "
                f"modules {list(targets)}"
            )
        if t.dim() != 2:
            raise WeightValidationError(f"{what}: LoRA tensor {name!r} is {t.dim()}-D, not 2-D")
        rank_dim = 0 if part in ("A", "embedding_B") else 1
        if t.shape[rank_dim] != r:
            raise WeightValidationError(
                f"{what}: LoRA tensor {name!r} has shape {list(t.shape)}; rank r={r} expected "
                f"in dimension {rank_dim}"
            )
        pairs.setdefault(module, set()).add(part.removeprefix("embedding_"))
        base = (full_reference or {}).get(_PEFT_PREFIX.sub("", module) + ".weight")
        if base is not None and len(base.shape) == 2 and part in ("A", "B"):
            want = base.shape[1] if part == "A" else base.shape[0]
            got = t.shape[1] if part == "A" else t.shape[0]
            if want != got:
                raise WeightValidationError(
                    f"{what}: LoRA tensor {name!r} has shape {list(t.shape)}; the module's "
                    f"weight is {list(base.shape)}"
                )
    unpaired = sorted(mod for mod, parts in pairs.items() if parts != {"A", "B"})
    if unpaired:
        raise WeightValidationError(f"{what}: LoRA A/B tensors not in pairs for {unpaired[:5]}")
    if not pairs:
        raise WeightValidationError(f"{what}: an empty LoRA adapter")
