"""Commit a verification into a Hugging Face KV cache: keep prefix + accepted path.

After verifying ``[root] + nodes`` the cache holds ``prefix_len + 1 + n`` entries. Only the
prefix, the root and the accepted nodes stay. For a chain the accepted nodes are the first
``m``, so the commit is a crop; for a tree the kept entries are gathered into contiguous
slots (*compaction*).

Worked example — prefix 3, root at slot 3, tree nodes at slots 4..7, accepted path = nodes
[1, 3] (slots 5 and 7)::

    keep_slots(prefix_len=3, path=[1, 3])  ->  [0, 1, 2, 3, 5, 7]

and after ``compact(cache, keep)`` entry 4 holds what was in slot 5, entry 5 what was in 7.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def cache_len(cache: DynamicCache | None) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def keep_slots(prefix_len: int, path: list[int]) -> torch.Tensor:
    """Cache slots to keep: the prefix and root (``0..prefix_len``) and the path's nodes."""
    return torch.tensor(
        list(range(prefix_len + 1)) + [prefix_len + 1 + i for i in path], dtype=torch.long
    )


def _select(t: torch.Tensor, keep: torch.Tensor, prefix: int | None) -> torch.Tensor:
    if prefix is not None:
        return t[..., :prefix, :]  # a view: cropping copies nothing
    return t.index_select(-2, keep.to(t.device))


def compact(cache: DynamicCache, keep: torch.Tensor) -> None:
    """Keep only the slots ``keep`` (ascending), in order; a crop when they are a prefix.

    Works on the per-layer tensors directly (``crop`` changed meaning across transformers
    releases): ``layers[i].keys`` (≥ 4.56) or ``key_cache[i]`` (older).
    """
    n = keep.numel()
    prefix = n if torch.equal(keep, torch.arange(n)) else None
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            layer.keys = _select(layer.keys, keep, prefix)
            layer.values = _select(layer.values, keep, prefix)
    else:  # pragma: no cover - transformers < 4.56
        for i in range(len(cache.key_cache)):
            cache.key_cache[i] = _select(cache.key_cache[i], keep, prefix)
            cache.value_cache[i] = _select(cache.value_cache[i], keep, prefix)
