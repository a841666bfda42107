"""The engine's core promise: greedy output equals the target's own greedy decoding,
token for token, for every drafter and tree shape; sampling follows the target's
distribution. Uses the shipped zoo."""

import pytest
import torch
from _exactness import (
    BATCH,
    N_EXACT,
    chi2_pvalue,
    decode_all,
    first_two_counts,
    first_two_joint,
)

from osd.drafters.draft_model import DraftModelDrafter
from osd.drafters.ngram import NgramDrafter, lookup
from osd.models import load_model, load_tokenizer
from osd.specdec.engine import SpeculativeDecoder
from osd.specdec.sampling import SamplingParams
from osd.workloads.datasets import DOMAINS, load_domain

MAX_NEW = 24


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(0)
    return load_model("zoo:target"), load_model("zoo:draft"), load_tokenizer("zoo:target")


@pytest.fixture(scope="module")
def prompts(zoo, data_dir):
    """10 eval prompts per domain (50), each cut to its last 96 tokens."""
    tok = zoo[2]
    out = []
    for d in DOMAINS:
        for q in load_domain(d, "eval", data_dir)[:10]:
            out.append(tok(q.prompt, add_special_tokens=False).input_ids[-96:])
    return out


@pytest.fixture(scope="module")
def references(zoo, prompts):
    target, _, tok = zoo
    refs = []
    for ids in prompts:
        x = torch.tensor([ids])
        out = target.generate(
            x, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id
        )
        refs.append(out[0, len(ids) :].tolist())
    return refs


DRAFTERS = {
    "draft_chain_k4": lambda t, d: DraftModelDrafter(d, k=4),
    "draft_chain_k1": lambda t, d: DraftModelDrafter(d, k=1),
    "draft_tree_4_2_2": lambda t, d: DraftModelDrafter(d, tree=(4, 2, 2)),
    "draft_tree_2_2_2_1": lambda t, d: DraftModelDrafter(d, tree=(2, 2, 2, 1)),
    "self_draft_tree_3_2": lambda t, d: DraftModelDrafter(t, tree=(3, 2)),  # α = 1: deep commits
    "ngram_k4": lambda t, d: NgramDrafter(k=4),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DRAFTERS))
def test_greedy_equals_target_greedy(zoo, prompts, references, name):
    target, draft, tok = zoo
    # all 50 in one batch (each released as it finishes); the serial path is held to HF
    # greedy references, shape by shape, in tests/test_batch_engine.py
    dec = SpeculativeDecoder(target, DRAFTERS[name](target, draft), tok)
    states, stats = decode_all(dec, prompts, MAX_NEW)
    accepted = sum(st.accepted for st in stats)
    mismatches = []
    for ids, state, ref in zip(prompts, states, references, strict=True):
        out = state.tokens[state.prompt_len :]
        if out != ref:
            mismatches.append((ids[-5:], out, ref))
    assert not mismatches, f"{len(mismatches)} of {len(prompts)} differ, first: {mismatches[0]}"
    if name != "ngram_k4":
        assert accepted > 0  # the drafter really drafted


def test_k_larger_than_tokens_left_and_one_token_prompt(zoo):
    target, draft, tok = zoo
    for ids, max_new in (
        ([tok.eos_token_id], 5),
        (tok("Question:").input_ids, 1),
        (tok("SELECT").input_ids, 2),
    ):
        ref = target.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new,
            do_sample=False,
            min_new_tokens=max_new,
            eos_token_id=None,
            pad_token_id=tok.pad_token_id,
        )[0, len(ids) :].tolist()
        for drafter in (DraftModelDrafter(draft, k=8), DraftModelDrafter(target, tree=(2, 2, 2))):
            dec = SpeculativeDecoder(target, drafter, tok)
            dec.eos = set()  # count exactly max_new tokens, as HF with eos_token_id=None
            out = dec.generate(ids, max_new_tokens=max_new)
            assert out.tokens == ref and out.finish_reason == "length"


def test_eos_inside_an_accepted_draft_stops_like_target(zoo, data_dir):
    """With the target as its own draft every token is accepted, so EOS lands mid-draft."""
    target, _, tok = zoo
    dec = SpeculativeDecoder(target, DraftModelDrafter(target, k=6), tok)
    found = 0
    for q in load_domain("sql", "eval", data_dir)[:20]:
        ids = tok(q.prompt).input_ids
        ref = target.generate(
            torch.tensor([ids]), max_new_tokens=60, do_sample=False, pad_token_id=tok.pad_token_id
        )[0, len(ids) :].tolist()
        if tok.eos_token_id not in ref:
            continue
        found += 1
        out = dec.generate(ids, max_new_tokens=60)
        assert out.tokens == ref[: ref.index(tok.eos_token_id) + 1]
        assert out.finish_reason == "stop"
        if found == 5:  # enough EOS cases; the rest of the 20 only cost time
            break
    assert found >= 3, "the zoo target should end short SQL answers with EOS"


@pytest.mark.slow
def test_sampling_end_to_end_matches_target_distribution(zoo):
    """First two sampled tokens: spec decoding with a tree vs the exact target joint
    (N_EXACT sequences; 3 new tokens: the (2, 2) tree is drafted in full)."""
    target, draft, tok = zoo
    ids, joint = first_two_joint(target, tok)
    dec = SpeculativeDecoder(target, DraftModelDrafter(draft, tree=(2, 2)), tok)
    counts, _ = first_two_counts(dec, ids, N_EXACT, BATCH)
    assert chi2_pvalue(counts, joint, N_EXACT) > 1e-3


def test_bad_input_is_refused_clearly(zoo):
    target, draft, tok = zoo
    dec = SpeculativeDecoder(target, DraftModelDrafter(draft, k=2), tok)
    with pytest.raises(ValueError, match="prompt is empty"):
        dec.generate("")
    with pytest.raises(ValueError, match="context is"):
        dec.generate([5] * target.config.max_position_embeddings)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate("hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dec.generate([target.config.vocab_size + 3])
    with pytest.raises(ValueError, match=r"k \(draft length\)"):
        DraftModelDrafter(draft, k=0)
    with pytest.raises(ValueError, match=r"k \(draft length\)"):
        NgramDrafter(k=-1)
    with pytest.raises(ValueError, match="tree"):
        DraftModelDrafter(draft, tree="4,0")
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-0.5)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            SamplingParams(temperature=1.0, top_p=bad)


def test_ngram_lookup_worked_example():
    assert lookup([5, 6, 7, 9, 5, 6], k=3, max_ngram=2) == [7, 9, 5]
    assert lookup([1, 2, 3], k=3) == []
    assert lookup([4], k=3) == []
