"""The draft model drafting over a frequent-token shortlist (FR-Spec): proposals are
shortlist tokens in the target's ids, the draft's sampling distribution is zero outside
the shortlist, and the output stays exactly the target's (greedy = HF greedy, batched)."""

import json

import pytest
import torch

from osd.drafters import build_drafter
from osd.drafters.draft_model import DraftModelDrafter, draft_shortlist
from osd.models import load_model, load_tokenizer
from osd.specdec.engine import SpeculativeDecoder
from osd.specdec.sampling import SamplingParams
from osd.workloads.datasets import DOMAINS, load_domain

SHORT = list(range(0, 4096, 3))  # every third zoo token id


@pytest.fixture(scope="module")
def zoo():
    return load_model("zoo:target"), load_model("zoo:draft"), load_tokenizer("zoo:target")


def test_proposals_are_shortlist_tokens_and_output_is_the_targets(zoo, data_dir):
    target, draft, tok = zoo
    dec = SpeculativeDecoder(target, DraftModelDrafter(draft, k=4, shortlist=SHORT), tok)
    seen: list[int] = []
    orig = dec.drafter.propose_batch

    def spy(states, depths):
        trees = orig(states, depths)
        for t in trees:
            seen.extend(t.tokens.tolist())
        return trees

    dec.drafter.propose_batch = spy
    prompts = [
        tok(load_domain(d, "eval", data_dir)[i].prompt, add_special_tokens=False).input_ids[-40:]
        for d in DOMAINS
        for i in range(2)
    ]
    states = [dec.start(ids, 12) for ids in prompts]
    while any(not s.finished for s in states):
        dec.step_batch([s for s in states if not s.finished])
    for ids, s in zip(prompts, states, strict=True):
        ref = target.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id
        )[0, len(ids) :].tolist()
        assert s.tokens[s.prompt_len :] == ref
        dec.release(s)
    assert seen and set(seen) <= set(SHORT)


def test_sampled_draft_distribution_lives_on_the_shortlist(zoo):
    target, draft, tok = zoo
    drafter = DraftModelDrafter(draft, k=3, shortlist=SHORT)
    dec = SpeculativeDecoder(target, drafter, tok)
    state = dec.start([5, 17, 300, 42], 8, SamplingParams(1.0, seed=0))
    tree = drafter.propose_batch([state], [3])[0]
    assert tree.draft_probs.shape[-1] == target.config.vocab_size
    outside = torch.ones(target.config.vocab_size, dtype=torch.bool)
    outside[SHORT] = False
    assert float(tree.draft_probs[:, outside].abs().sum()) == 0.0
    assert torch.allclose(tree.draft_probs.sum(-1), torch.ones(tree.size), atol=1e-5)
    dec.release(state)


def test_a_weight_load_refreshes_the_shortlisted_head(zoo):
    _, draft, _ = zoo
    drafter = DraftModelDrafter(draft, k=2, shortlist=SHORT)
    sd = drafter.state_dict()
    tied = [k for k in sd if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    before = drafter.short.lm_head.weight.clone()
    drafter.load_state_dict({**sd, **{k: sd[k] * 2 for k in tied}}, version=1)
    assert torch.allclose(drafter.short.lm_head.weight, 2 * before)
    drafter.load_state_dict(sd, version=2)  # back to the zoo draft (shared fixture)


def test_build_by_name_reads_the_shortlist_beside_the_draft(zoo, tmp_path):
    _, draft, _ = zoo
    with pytest.raises(ValueError, match=r"shortlist\.json"):
        build_drafter("draft_model", None, draft, shortlist=True)
    draft.save_pretrained(tmp_path)
    (tmp_path / "shortlist.json").write_text(json.dumps(SHORT))
    saved = load_model(str(tmp_path), "cpu")
    assert draft_shortlist(saved) == SHORT
    drafter = build_drafter("draft_model", None, saved, shortlist=True, k=2)
    assert drafter.short is not None and len(drafter.short.ids) == len(SHORT)
