"""Worked examples from the docstrings of tree.py and kvcache.py."""

import pytest
import torch

from osd.specdec.kvcache import KVCache, moves
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


def test_moves_worked_example():
    assert moves(4, [1, 3]) == ([5, 7], [4, 5])
    assert moves(4, [0, 1, 2]) == ([], [])  # a chain's accepted nodes are in place
    assert moves(4, []) == ([], [])


def _cache(slots: int = 2, n: int = 8, layers: int = 2) -> KVCache:
    cache = KVCache(layers, 2, 3, max_length=64, dtype=torch.float32, slots=slots, length=n)
    for layer in range(layers):  # (plain tensors: the cache's own are inference tensors)
        # position p of slot s holds p + 100·layer + 1000·s
        pos = torch.arange(n, dtype=torch.float)[None, None, :, None]
        val = pos + 100 * layer + 1000 * torch.arange(slots, dtype=torch.float)[:, None, None, None]
        cache.k[layer] = val.expand(slots, 2, n, 3).clone()
        cache.v[layer] = -cache.k[layer]
    return cache


def test_commit_moves_only_the_accepted_nodes():
    cache = _cache()
    src, dst = moves(4, [1, 3])  # prefix 3, root at 3, nodes at 4..7
    cache.move(torch.tensor([1, 1]), torch.tensor(src), torch.tensor(dst))
    for i in range(2):
        assert cache.k[i][1, 0, :6, 0].tolist() == [1000 + x + 100 * i for x in (0, 1, 2, 3, 5, 7)]
        assert cache.v[i][1, 1, :6, 2].tolist() == [
            -(1000 + x + 100 * i) for x in (0, 1, 2, 3, 5, 7)
        ]
        assert cache.k[i][0, 0, :, 0].tolist() == [x + 100 * i for x in range(8)]  # other slot


def test_slots_stay_dense_when_one_is_freed():
    cache = KVCache(1, 1, 1, max_length=16, dtype=torch.float32, slots=1, length=4)
    owners = [object() for _ in range(3)]
    slots = [cache.alloc(o) for o in owners]  # grows past 1 slot
    assert slots == [0, 1, 2] and cache.slots >= 3
    with torch.inference_mode():
        cache.k[0][2] = 7.0
    assert cache.free(0) is owners[2]  # the last slot moved into the hole
    assert cache.used == 2 and cache.owners == [owners[2], owners[1]]
    assert bool((cache.k[0][0] == 7.0).all())
    assert cache.free(1) is None


def test_cache_refuses_past_the_context():
    cache = KVCache(1, 1, 1, max_length=16, dtype=torch.float32)
    cache.reserve(16)
    with pytest.raises(ValueError, match="context allows 16"):
        cache.reserve(17)


def test_bad_trees_are_refused():
    with pytest.raises(ValueError, match="parents must come first"):
        TokenTree.from_parents([1, 2], [1, -1])
    with pytest.raises(ValueError, match="shapes disagree"):
        TokenTree(torch.tensor([1, 2]), torch.tensor([-1]), torch.tensor([1, 1]))
