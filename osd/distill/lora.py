"""LoRA adapters: the spec a registry version stores, wrapping a module, merging an adapter.

A published LoRA version is an adapter (PEFT state-dict names) **plus** its
:class:`LoraSpec`: rank, alpha, dropout, target modules and the **base version** whose full
weights the adapter was trained on. With both, any process holding the registry can
rebuild plain weights — base version's weights, wrapped with the spec, adapter loaded,
merged — without out-of-band configuration (:func:`merge_adapter`).

Worked example (what the registry stores beside an adapter trained on version 3)::

    >>> spec = LoraSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj"), base_version=3)
    >>> spec.to_dict()
    {'r': 8, 'alpha': 16.0, 'dropout': 0.0, 'target_modules': ['q_proj', 'v_proj'], 'base_version': 3}
    >>> LoraSpec.from_dict(spec.to_dict()) == spec
    True
    >>> LoraSpec(r=0, alpha=16, target_modules=("q_proj",))
    Traceback (most recent call last):
    ...
    ValueError: lora_r must be an int >= 1, got 0

``peft`` is imported only by the functions that wrap or merge, so reading a spec is cheap.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "LoraSpec",
    "adapter_state_dict",
    "load_adapter",
    "merge_adapter",
    "wrap_lora",
]

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSpec:
    """Everything needed to rebuild a LoRA-wrapped module besides the adapter tensors.

    Field errors name the :class:`~osd.distill.config.DistillConfig` keys (``lora_r``, …).
    """

    r: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0
    base_version: int = 0  # the registry version (full weights) the adapter sits on

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str, value: Any) -> None:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {value!r}")

        def number(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        def int_at_least(v: Any, least: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= least

        need(int_at_least(self.r, 1), "lora_r", "an int >= 1", self.r)
        need(number(self.alpha) and self.alpha > 0, "lora_alpha", "> 0", self.alpha)
        need(
            number(self.dropout) and 0 <= self.dropout < 1,
            "lora_dropout",
            "in [0, 1)",
            self.dropout,
        )
        targets = self.target_modules
        need(
            not isinstance(targets, str)
            and isinstance(targets, list | tuple)
            and bool(targets)
            and all(isinstance(t, str) and t for t in targets),
            "lora_target_modules",
            "a non-empty list of module names",
            targets,
        )
        need(int_at_least(self.base_version, 0), "base_version", "an int >= 0", self.base_version)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "target_modules", tuple(targets))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (what :class:`~osd.registry.VersionInfo` keeps in ``lora``)."""
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": list(self.target_modules),
            "base_version": self.base_version,
        }

    @classmethod
    def from_dict(cls, doc: Any) -> LoraSpec:
        """Parse (and validate) what :meth:`to_dict` wrote; ``ValueError`` on anything else."""
        names = {"r", "alpha", "dropout", "target_modules", "base_version"}
        if not isinstance(doc, Mapping) or set(doc) != names:
            got = sorted(doc) if isinstance(doc, Mapping) else type(doc).__name__
            raise ValueError(f"a LoRA spec needs exactly the keys {sorted(names)}; got {got}")
        return cls(**doc)

    def peft_config(self, task_type: str | None):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            task_type=task_type,
        )


def wrap_lora(module: nn.Module, spec: LoraSpec, task_type: str | None = None) -> nn.Module:
    """``module`` wrapped with fresh LoRA adapters (PEFT modifies ``module`` in place).

    ``task_type``: PEFT's task (``"CAUSAL_LM"`` for a Hugging Face causal LM; ``None`` for a
    plain ``nn.Module`` such as a head).
    """
    from peft import get_peft_model

    try:
        return get_peft_model(module, spec.peft_config(task_type))
    except ValueError as err:
        raise ValueError(
            f"cannot put LoRA adapters on {type(module).__name__} with target modules "
            f"{list(spec.target_modules)}: {err}; set lora_target_modules to the "
            "model's linear layer names"
        ) from err


def adapter_state_dict(wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of a :func:`wrap_lora` module, under PEFT's state-dict names."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(wrapped)


def load_adapter(wrapped: nn.Module, adapter: Mapping[str, torch.Tensor]) -> None:
    """Load adapter tensors (PEFT names) into a :func:`wrap_lora` module; extra names are
    an error (a spec that does not match the adapter)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(wrapped, dict(adapter))
    if result.unexpected_keys:
        raise ValueError(
            f"adapter has tensors the LoRA spec does not: {sorted(result.unexpected_keys)[:5]}"
        )


@torch.no_grad()
def merge_adapter(
    base: nn.Module,
    adapter: Mapping[str, torch.Tensor],
    spec: LoraSpec,
    task_type: str | None = None,
) -> dict[str, torch.Tensor]:
    """Weights of ``base`` with ``adapter`` merged in, under ``base``'s own names.

    ``base`` must hold the weights of ``spec.base_version``; it is not modified. The result
    loads with ``base.load_state_dict``.
    """
    model = wrap_lora(copy.deepcopy(base), spec, task_type)
    load_adapter(model, adapter)
    merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}
