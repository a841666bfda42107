"""The recurrent drafter (ReDrafter): the beam → prefix-tree worked example; lossless greedy
(= HF greedy, batched, 50 prompts over the five domains) for both beam modes; exact
sampling (chi-square) through deterministic and stochastic beam trees, and a negative
control (deterministic beams labelled as if sampled, as ReDrafter's reference code does)
that the same test rejects; offline (soft and hard) and online training lower the loss;
a head version with a wrong shape or NaN is refused."""

import pytest
import torch
from _exactness import N_EXACT, chi2_first_two, greedy_tau, hidden_stream

from osd.distill.config import DistillConfig
from osd.distill.head_student import RecurrentStudent, head_student
from osd.distill.heads_train import HeadTrainConfig, Sequence_, train_heads
from osd.drafters import DRAFTERS, build_drafter, build_student
from osd.drafters.heads import HeadConfig
from osd.drafters.recurrent import (
    RecurrentDrafter,
    RecurrentHead,
    beam_search,
    beams_to_tree,
    unroll,
)
from osd.models import load_model, load_tokenizer
from osd.registry.gate import draft_acceptance
from osd.registry.versions import Registry
from osd.registry.weights import WeightValidationError
from osd.specdec.engine import SpeculativeDecoder
from osd.specdec.sampling import SamplingParams, warp_probs
from osd.specdec.tree import TokenTree, path_to, tree_block


@pytest.fixture(scope="module")
def zoo():
    return load_model("zoo:target"), load_tokenizer("zoo:target")


# ---- beams → prefix tree -----------------------------------------------------------------


def test_beams_to_tree_worked_example():
    """The module docstring's example: shared prefixes merged, equal tokens under other
    prefixes kept apart, nodes by depth then first beam, parents first."""
    tree = beams_to_tree([[17, 42, 8], [17, 42, 93], [17, 5, 8]])
    assert tree.tokens.tolist() == [17, 42, 5, 8, 93, 8]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2]
    assert tree.depths.tolist() == [1, 2, 2, 3, 3, 3]
    # each beam is one root-to-leaf path of the tree
    leaves = {tuple(tree.tokens[path_to(tree, j)].tolist()) for j in (3, 4, 5)}
    assert leaves == {(17, 42, 8), (17, 42, 93), (17, 5, 8)}
    # node 5 (token 8 under 17 → 5) attends to the root, n0, n2 and itself, not to n3
    assert tree_block(tree, 7)[6].int().tolist() == [1, 1, 0, 1, 0, 0, 1]


def test_beams_to_tree_edge_cases():
    same = beams_to_tree([[3, 4, 5], [3, 4, 5]])  # identical beams: one chain
    assert same.is_chain() and same.tokens.tolist() == [3, 4, 5]
    short = beams_to_tree([[3, 4, 5], [6]])  # ragged (depth-capped) beams
    assert short.tokens.tolist() == [3, 6, 4, 5] and short.parents.tolist() == [-1, -1, 0, 2]
    assert beams_to_tree([]).size == 0


def test_beam_search_is_batched_and_best_first(zoo):
    target, _ = zoo
    d = build_drafter("recurrent", target)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 288, generator=g)
    root = torch.tensor([5, 17, 300])
    levels, score, _ = beam_search(d.head, d.embed, d.lm_head, h, root, d.shape)
    beams = levels[-1]
    assert [lv.shape for lv in levels] == [(3, 5, t) for t in range(1, 6)]
    assert bool((score[:, :-1] >= score[:, 1:]).all())
    one, _, _ = beam_search(d.head, d.embed, d.lm_head, h[1:2], root[1:2], d.shape)
    assert torch.equal(one[-1][0], beams[1])  # batching does not change a sequence's beams
    # the best beam's score is its log-probability under the head, step by step
    with torch.no_grad():
        feats = unroll(d.head, d.embed, h[0], torch.cat([root[:1], beams[0, 0, :-1]]))
        logp = torch.log_softmax(d.lm_head(feats), -1).gather(-1, beams[0, 0, :, None]).sum()
    assert float(logp) == pytest.approx(float(score[0, 0]), abs=1e-4)
    # the drafter's tree: every level's beams (default) or the final ones, prefix-merged
    state = _State([9, 5], h[0:1])
    full = d.propose(state, 5)
    final = RecurrentDrafter(target, d.head, d.config, all_levels=False).propose(state, 5)
    assert full.size <= 5 * 5 and final.size <= full.size
    paths = {tuple(full.tokens[path_to(full, j)].tolist()) for j in range(full.size)}
    assert {tuple(b) for b in beams[0].tolist()} <= paths


class _State:
    """The two fields a recurrent drafter reads: tokens (root last) and target_hidden."""

    def __init__(self, tokens, hidden):
        self.tokens, self.target_hidden = tokens, hidden
        self.sampling = SamplingParams()


# ---- lossless ----------------------------------------------------------------------------


def test_recurrent_is_registered_and_trainable():
    assert DRAFTERS["recurrent"].trainable
    assert {"heads", "width", "length", "stochastic"} <= set(DRAFTERS["recurrent"].options())


@pytest.fixture(scope="module")
def cases(greedy_cases):
    """50 eval prompts, 10 per domain, ragged lengths, with their HF greedy references
    (tests/conftest.py: shared with the recurrent drafter's tests)."""
    assert len(greedy_cases) == 50
    return greedy_cases


@pytest.mark.parametrize("options", [{}, {"width": 2, "length": 3, "stochastic": True}])
def test_greedy_equals_hf_greedy_batched(zoo, cases, options):
    target, tok = zoo
    dec = SpeculativeDecoder(target, build_drafter("recurrent", target, **options), tok)
    tau = greedy_tau(dec, cases)
    assert tau > 1.5, f"the shipped head should be accepted (τ {tau:.2f})"


def test_one_token_prompt(zoo):
    target, tok = zoo
    dec = SpeculativeDecoder(target, build_drafter("recurrent", target), tok)
    with torch.inference_mode():
        ref = target.generate(torch.tensor([[5]]), max_new_tokens=7, do_sample=False)
    assert dec.generate([5], max_new_tokens=6).tokens == ref[0, 1:7].tolist()


def test_stochastic_tree_carries_what_each_node_was_drawn_from(zoo):
    target, tok = zoo
    d = build_drafter("recurrent", target, stochastic=True)
    dec = SpeculativeDecoder(target, d, tok)
    sp = SamplingParams(1.0, 8, seed=3)
    state = dec.start(tok("Question: Tom has", add_special_tokens=False).input_ids, 8, sp)
    tree = d.propose(state, 4)
    assert tree.draft_probs is not None and tree.without_replacement
    assert tree.max_depth == 4 and all(int((tree.depths == k).sum()) <= 5 for k in range(1, 5))
    h = state.target_hidden[-1]
    for j in range(tree.size):
        path = path_to(tree, j)
        inputs = torch.tensor([state.tokens[-1], *tree.tokens[path[:-1]].tolist()])
        p = warp_probs(d.lm_head(unroll(d.head, d.embed, h, inputs)[-1]), sp)
        assert torch.allclose(tree.draft_probs[j], p, atol=1e-5)  # the parent's warped p
        kids = tree.tokens[tree.children(j)].tolist()
        assert len(kids) == len(set(kids))  # drawn without replacement
    dec.release(state)


# ---- exact sampling ----------------------------------------------------------------------


class _BeamsLabelledAsSampled(RecurrentDrafter):
    """NEGATIVE CONTROL: deterministic beams, labelled with the draft's warped distribution
    at each node's parent as though the node had been drawn from it — not a valid proposal."""

    def propose_batch(self, states, depths):
        trees = super().propose_batch(states, depths)
        out = []
        for s, tree in zip(states, trees, strict=True):
            if tree.size == 0:
                out.append(tree)
                continue
            # inputs of node j: the root and j's ancestors, padded; one unroll per tree
            inputs = torch.full((tree.size, tree.max_depth), s.tokens[-1])
            for j in range(tree.size):
                path = path_to(tree, j)
                inputs[j, 1 : len(path)] = tree.tokens[path[:-1]]
            h = s.target_hidden[-1].expand(tree.size, -1)
            f = unroll(self.head, self.embed, h, inputs)[torch.arange(tree.size), tree.depths - 1]
            p = warp_probs(self.lm_head(f), s.sampling)
            out.append(TokenTree(tree.tokens, tree.parents, tree.depths, p, True))
        return out


def _chi2_first_two(zoo, drafter, n=N_EXACT):
    target, tok = zoo
    return chi2_first_two(target, tok, drafter, n)  # 300 a batch


@pytest.mark.slow
@pytest.mark.parametrize("stochastic", [False, True])
def test_sampling_through_beam_trees_is_exact(zoo, stochastic):
    target, _ = zoo
    drafter = build_drafter("recurrent", target, stochastic=stochastic)
    assert _chi2_first_two(zoo, drafter) > 1e-3


@pytest.mark.slow
def test_negative_control_beams_labelled_as_sampled_is_caught(zoo):
    target, _ = zoo
    d = build_drafter("recurrent", target)
    control = _BeamsLabelledAsSampled(target, d.head, d.config, stochastic=False)
    # w² ≈ 6.8 (tests/_exactness.py): X² in the thousands at n = 300
    assert _chi2_first_two(zoo, control, n=300) < 1e-3


# ---- training ----------------------------------------------------------------------------


def _fresh(target):
    torch.manual_seed(0)
    return RecurrentDrafter(target, RecurrentHead(288), HeadConfig("recurrent", 288, 4096))


def test_offline_training_lowers_validation_loss_soft_and_hard(zoo, tmp_path):
    target, tok = zoo
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        seqs = []
        for _ in range(8):
            ids = torch.randint(4, 4096, (30,), generator=g)
            out = target.generate(ids[None], max_new_tokens=20, do_sample=False)[0]
            feats = target.model(input_ids=out[None]).last_hidden_state[0].clone()
            seqs.append(Sequence_(out.clone(), feats, 30))
    for loss in ("soft", "hard"):
        cfg = HeadTrainConfig(
            kind="recurrent", epochs=3, batch=4, held_out=0.25, lr=3e-3, target_loss=loss
        )
        _, hc, info = train_heads(target, tok, cfg, tmp_path / loss, seqs=seqs)
        assert info["val_loss_after"] < info["val_loss_before"], loss
        assert len(hc.accuracy) == cfg.length  # one row per trained depth
        again = build_drafter("recurrent", target, heads=str(tmp_path / loss))
        assert again.state_dict().keys() == _fresh(target).state_dict().keys()


@pytest.fixture(scope="module")
def stream(zoo, data_dir):
    target, tok = zoo
    return hidden_stream(target, tok, data_dir, "recurrent")


def test_online_student_lowers_loss_and_raises_acceptance(zoo, stream):
    target, _ = zoo
    student = head_student(_fresh(target))
    assert isinstance(student, RecurrentStudent)
    before = draft_acceptance(student, stream)
    obj = student.objective(DistillConfig())
    opt = torch.optim.Adam(student.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        student.module.train()
        loss = obj.loss(student.predict(stream), stream).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    after = draft_acceptance(student, stream)
    assert before.positions > 100 and losses[-1] < losses[0]
    assert after.mean > before.mean + 0.05, (before, after)


def test_head_version_with_wrong_shape_or_nan_is_refused(zoo):
    target, _ = zoo
    drafter = build_drafter("recurrent", target)
    student = build_student("recurrent", drafter)
    reg = Registry()
    base = student.export().weights
    reg.register_base("recurrent", base)
    key = sorted(base)[0]
    bad_shape = dict(base, **{key: torch.zeros(*base[key].shape[:-1], base[key].shape[-1] + 1)})
    nan = {k: v.clone() for k, v in base.items()}
    nan[key].view(-1)[0] = float("nan")
    for weights, msg in ((bad_shape, "shape"), (nan, "NaN")):
        with pytest.raises(WeightValidationError, match=msg):
            reg.publish("recurrent", weights)
    with pytest.raises(RuntimeError, match="size mismatch"):  # the drafter refuses it too
        drafter.load_state_dict(bad_shape, 1)
    assert [v.version for v in reg.versions("recurrent")] == [0]
