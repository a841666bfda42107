"""The n-gram drafter's suffix trees and history: lossless greedy (batched, 50 prompts, the
history filled by the earlier ones), exact sampling through its point-mass trees (with a
negative control), and the history's bounds."""

import pytest
import torch

from osd.drafters import build_drafter
from osd.drafters.base import DecodeState
from osd.drafters.ngram import NgramDrafter, NgramIndex
from osd.models import load_model, load_tokenizer
from osd.specdec.engine import SpeculativeDecoder
from osd.specdec.sampling import SamplingParams
from osd.specdec.tree import TokenTree
from tests._exactness import chi2_first_two, decode_all, greedy_tau


@pytest.fixture(scope="module")
def zoo():
    return load_model("zoo:target"), load_tokenizer("zoo:target")


def _state(tokens: list[int]) -> DecodeState:
    return DecodeState(list(tokens), 1, 64, SamplingParams())


def _started(drafter: NgramDrafter, tokens: list[int]) -> DecodeState:
    s = _state(tokens)
    drafter.start(s)
    return s


def test_tree_worked_example():
    """Suffix (5, 6) occurred three times, followed by 7 9, 7 8 and 3 5: the tree keeps 7
    first (2 of 3), then 3 (1 of 3), then the grandchildren (1 of 3 each), the newest
    match's first."""
    d = NgramDrafter(k=2, max_ngram=2, nodes=4)
    s = _started(d, [5, 6, 7, 9, 5, 6, 7, 8, 5, 6, 3, 5, 6])
    tree = d.propose(s, 8)
    assert tree.tokens.tolist() == [7, 3, 5, 8]
    assert tree.parents.tolist() == [-1, -1, 1, 0]
    assert d.propose(s, 1).tokens.tolist() == [7, 3]  # depth capped by the engine
    assert NgramDrafter(k=2, max_ngram=2, nodes=1).propose(s, 8).tokens.tolist() == [7]


def test_index_grows_with_the_sequence_and_matches_a_rescan():
    d = NgramDrafter(k=3, nodes=16)
    s = _started(d, [1, 2, 3])
    g = torch.Generator().manual_seed(0)
    for _ in range(60):  # the index extends as tokens commit; same as one built at once
        s.tokens += torch.randint(0, 6, (2,), generator=g).tolist()
        incremental = d.propose(s, 3)
        fresh = d.propose(_started(d, s.tokens), 3)
        assert torch.equal(incremental.tokens, fresh.tokens)
        assert torch.equal(incremental.parents, fresh.parents)


def test_history_drafts_what_finished_sequences_generated_and_stays_bounded():
    d = NgramDrafter(k=4, nodes=6, history=40)
    assert d.propose(_started(d, [9, 1, 2]), 4).size == 0  # nothing seen yet
    done = _started(d, [9, 1, 2, 3, 4, 5])
    d.release(done)
    tree = d.propose(_started(d, [8, 1, 2]), 4)
    assert tree.tokens.tolist() == [3, 4, 5]  # the earlier sequence's continuation
    for i in range(30):  # never more than `history` tokens; the newest kept
        d.release(_started(d, [100 + i, 7, 7]))
        assert len(d._past) <= 40
    assert d.propose(_started(d, [129, 7]), 4).tokens.tolist()[0] == 7
    d.reset()
    assert d.propose(_started(d, [8, 1, 2]), 4).size == 0
    tiny = NgramDrafter(k=2, nodes=2, history=1)  # keeps nothing, never grows
    for _ in range(3):
        tiny.release(_started(tiny, [1, 2, 3]))
        assert len(tiny._past) == 0


def test_sequence_boundaries_stop_continuations():
    ix = NgramIndex(1, 2)
    ix.extend([1, 2, 3, -1, 2, 3, 4])
    assert ix.continuations((2,), 3) == [[3, 4], [3]]  # newest first; cut at the boundary
    assert ix.continuations((3, -1), 2) == []  # no n-gram spans a boundary


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": -1}, "nodes"),
        ({"history": -5, "nodes": 4}, "history"),
        ({"history": 100}, "needs a tree"),
        ({"k": 0}, r"k \(draft length\)"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_drafter("ngram", None, **kwargs)


@pytest.mark.slow
def test_greedy_equals_hf_greedy_batched(zoo, greedy_cases):
    """50 prompts, one batch (the history fills as they finish), then again: the second
    pass drafts from the first one's outputs (τ rises) and still matches HF greedy. (Trees
    without a history: tests/test_batch_engine.py, shape ``ngram_tree``.)"""
    target, tok = zoo
    dec = SpeculativeDecoder(
        target, build_drafter("ngram", target, k=8, nodes=10, history=4096), tok
    )
    first = greedy_tau(dec, greedy_cases)
    assert greedy_tau(dec, greedy_cases) > first + 0.5


@pytest.mark.slow
def test_sampling_through_history_trees_is_exact(zoo):
    """The first batch of 300 fills the history; the second drafts trees of several
    siblings (point masses) from it. First two sampled tokens vs the target's joint."""
    target, tok = zoo
    d = build_drafter("ngram", target, k=4, nodes=6, history=1 << 14)
    assert chi2_first_two(target, tok, d) > 1e-3


class _FrequenciesLabelledAsSampled(NgramDrafter):
    """NEGATIVE CONTROL: the tree's deterministic nodes labelled as drawn (without
    replacement) from the trie's frequencies among siblings — not a valid proposal."""

    def __init__(self, vocab: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.vocab = vocab

    def propose(self, state, max_depth):
        tree = super().propose(state, max_depth)
        if tree.size == 0:
            return tree
        probs = torch.zeros(tree.size, self.vocab)
        parents = tree.parents.tolist()
        for i, p in enumerate(parents):
            sibs = [j for j, q in enumerate(parents) if q == p]
            weights = torch.tensor([1.0 / (1 + r) for r in range(len(sibs))])
            probs[i, tree.tokens[sibs]] = weights / weights.sum()
        return TokenTree(tree.tokens, tree.parents, tree.depths, probs, True)


@pytest.mark.slow
def test_negative_control_frequencies_labelled_as_sampled_is_caught(zoo):
    target, tok = zoo
    control = _FrequenciesLabelledAsSampled(target.config.vocab_size, k=4, nodes=6, history=1 << 14)
    assert chi2_first_two(target, tok, control) < 1e-3


def test_decode_all_releases_into_the_history(zoo):
    """The engine's release hands finished sequences to the history (batched decode)."""
    target, tok = zoo
    d = build_drafter("ngram", target, k=4, nodes=6, history=1 << 12)
    dec = SpeculativeDecoder(target, d, tok)
    dec.eos = set()  # exactly 4 new tokens each
    decode_all(dec, [[5, 6, 7], [8, 9]], 4)
    assert len(d._past) == 3 + 4 + 1 + 2 + 4 + 1  # tokens and a boundary each


def test_drift_experiment_runs_and_reports(tmp_path):
    """``experiments/ngram_drift.py`` end to end on a short stream: its JSON and figure."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
    import ngram_drift

    out = tmp_path / "d.json"
    args = ["--n", "60", "--schedules", "return", "--max-new-tokens", "6", "--window", "10"]
    rep = ngram_drift.main([*args, "--json", str(out), "--plot", str(tmp_path / "d.png")])
    run = rep["runs"]["return"]
    assert run["shifts"] == [20, 40] and len(run["windows"]) == 6
    assert set(run["time_to_recover"]) == {"online", "frozen"} and "forgetting" in run
    assert {"final_gain", "final_gain_novel", "repeats", "tau_last50"} <= set(run)
    assert out.exists() and (tmp_path / "d.png").stat().st_size > 0
