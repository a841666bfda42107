"""Worked examples from the docstrings of tree.py and kvcache.py."""

import pytest
import torch
from transformers import DynamicCache

from osd.specdec.kvcache import compact, keep_slots
from osd.specdec.tree import (
    TokenTree,
    ancestor_matrix,
    path_to,
    tree_attention_mask,
    tree_position_ids,
)

A, B, C = 11, 12, 13


def docstring_tree() -> TokenTree:
    #   r ── a(0) ── c(2)
    #   └─── b(1)
    return TokenTree.from_parents([A, B, C], [-1, -1, 0])


def test_depths_children_and_paths():
    t = docstring_tree()
    assert t.depths.tolist() == [1, 1, 2]
    assert t.children(-1) == [0, 1] and t.children(0) == [2] and t.children(1) == []
    assert path_to(t, 2) == [0, 2] and path_to(t, -1) == []
    assert t.max_depth == 2 and not t.is_chain()
    assert TokenTree.chain([1, 2, 3]).is_chain()


def test_position_ids_worked_example():
    assert tree_position_ids(docstring_tree(), prefix_len=3).tolist() == [[3, 4, 4, 5]]


def test_attention_mask_worked_example():
    mask = tree_attention_mask(docstring_tree(), prefix_len=3)
    assert mask.shape == (1, 1, 4, 7)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 1, 1, 1, 0, 0, 0],  # r
        [1, 1, 1, 1, 1, 0, 0],  # a
        [1, 1, 1, 1, 0, 1, 0],  # b
        [1, 1, 1, 1, 1, 0, 1],  # c
    ]
    assert mask.min() == torch.finfo(torch.float32).min


def test_ancestor_matrix_of_a_chain_is_lower_triangular():
    anc = ancestor_matrix(torch.tensor([-1, 0, 1, 2]))
    assert torch.equal(anc, torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_keep_slots_worked_example():
    assert keep_slots(prefix_len=3, path=[1, 3]).tolist() == [0, 1, 2, 3, 5, 7]
    assert keep_slots(prefix_len=2, path=[]).tolist() == [0, 1, 2]


def _cache_with_slots(n: int, layers: int = 2) -> DynamicCache:
    cache = DynamicCache()
    for layer in range(layers):
        # [batch 1, heads 2, slots n, head_dim 3]; slot s holds the value s (+100·layer)
        kv = (
            torch.arange(n, dtype=torch.float)[None, None, :, None].expand(1, 2, n, 3) + 100 * layer
        )
        cache.update(kv.clone(), -kv.clone(), layer)
    return cache


def test_compaction_gathers_kept_slots_in_order():
    cache = _cache_with_slots(8)
    compact(cache, keep_slots(prefix_len=3, path=[1, 3]))
    assert cache.get_seq_length() == 6
    for i, layer in enumerate(cache.layers):
        assert layer.keys[0, 0, :, 0].tolist() == [x + 100 * i for x in (0, 1, 2, 3, 5, 7)]
        assert layer.values[0, 1, :, 2].tolist() == [-(x + 100 * i) for x in (0, 1, 2, 3, 5, 7)]


def test_chain_commit_is_a_crop():
    cache = _cache_with_slots(8)
    compact(cache, keep_slots(prefix_len=3, path=[0, 1]))  # chain: first two nodes
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_bad_trees_are_refused():
    with pytest.raises(ValueError, match="parents must come first"):
        TokenTree.from_parents([1, 2], [1, -1])
    with pytest.raises(ValueError, match="shapes disagree"):
        TokenTree(torch.tensor([1, 2]), torch.tensor([-1]), torch.tensor([1, 1]))
