"""Serving side of LoRA: turn a published adapter into plain weights for the base draft."""

from __future__ import annotations

import copy

import torch
from peft import set_peft_model_state_dict

from osd.distill.trainer import DistillConfig, wrap_lora


@torch.no_grad()
def merge_adapter(
    base: torch.nn.Module, adapter: dict[str, torch.Tensor], config: DistillConfig
) -> dict[str, torch.Tensor]:
    """Weights of ``base`` with ``adapter`` (PEFT state-dict names) merged in.

    ``base`` is not modified; the result loads with ``base.load_state_dict``.
    """
    model = wrap_lora(copy.deepcopy(base), config)
    result = set_peft_model_state_dict(model, adapter)
    if result.unexpected_keys:
        raise ValueError(
            f"adapter has tensors the LoRA config does not: {sorted(result.unexpected_keys)[:5]}"
        )
    merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}
