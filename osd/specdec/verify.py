"""Verification: one target forward over ``[root] + tree nodes`` with tree attention.

The same cached forward serves drafters that decode a tree level by level, so it is a
free function over any Hugging Face causal LM.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from osd.specdec.kvcache import cache_len
from osd.specdec.tree import TokenTree, tree_attention_mask, tree_position_ids


def cached_forward(
    model,
    cache: DynamicCache,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    hidden: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Append ``input_ids`` ([L]) to ``cache``; return logits [L, V] and last hidden [L, H].

    Without a mask the new tokens attend causally to the cache and to each other.
    """
    device = next(model.parameters()).device
    out = model(
        input_ids=input_ids.to(device)[None],
        position_ids=None if position_ids is None else position_ids.to(device),
        attention_mask=None if attention_mask is None else attention_mask.to(device),
        past_key_values=cache,
        use_cache=True,
        output_hidden_states=hidden,
    )
    h = out.hidden_states[-1][0] if hidden else None
    return out.logits[0], h


def prefill(
    model, cache: DynamicCache, tokens: list[int], hidden: bool = False
) -> torch.Tensor | None:
    """Fill ``cache`` with every token but the last (the pending root). Returns hidden [L, H]."""
    start = cache_len(cache)
    todo = tokens[start:-1]
    if not todo:
        return None
    _, h = cached_forward(model, cache, torch.tensor(todo, dtype=torch.long), hidden=hidden)
    return h


def verify_tree(
    model, cache: DynamicCache, root: int, tree: TokenTree, hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Target logits [n + 1, V] after the root and after each node (see ``tree.py``).

    The cache must hold exactly the prefix before ``root``; afterwards it also holds the
    root and all nodes (the commit stage drops the rejected ones).
    """
    prefix = cache_len(cache)
    ids = torch.cat([torch.tensor([root], dtype=torch.long), tree.tokens])
    if tree.is_chain():  # a chain is causal: let the model build its own mask
        return cached_forward(model, cache, ids, hidden=hidden)
    dtype = next(model.parameters()).dtype
    mask = tree_attention_mask(tree, prefix, dtype=dtype)
    return cached_forward(model, cache, ids, tree_position_ids(tree, prefix), mask, hidden)
