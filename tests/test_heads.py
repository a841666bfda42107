"""Head drafters (Medusa, EAGLE-style, KOALA): lossless greedy (= HF greedy, batched, 50
prompts over the five domains) and exact sampling (chi-square) through each drafter's
trees; offline and online head training lowers the loss and raises the acceptance
estimate; KOALA's adversarial step updates both networks, deterministically; a head
version with a wrong shape or NaN is refused."""

import pytest
import torch
from _exactness import chi2_first_two, greedy_tau, hidden_stream

from osd.distill.config import DistillConfig
from osd.distill.head_student import AdversarialObjective, head_student
from osd.distill.heads_train import HeadTrainConfig, Sequence_, train_heads
from osd.drafters import DRAFTERS, build_drafter, build_student
from osd.drafters.eagle import EagleDrafter
from osd.drafters.heads import EagleHead, HeadConfig, MedusaHeads
from osd.drafters.medusa import MedusaDrafter, medusa_tree
from osd.models import load_model, load_tokenizer
from osd.registry.gate import draft_acceptance
from osd.registry.versions import Registry
from osd.registry.weights import WeightValidationError
from osd.specdec.engine import SpeculativeDecoder

HEAD_DRAFTERS = ["medusa", "koala-medusa", "eagle", "koala-eagle"]


@pytest.fixture(scope="module")
def zoo():
    return load_model("zoo:target"), load_tokenizer("zoo:target")


@pytest.fixture(scope="module")
def cases(greedy_cases):
    """50 eval prompts, 10 per domain, ragged lengths, with their HF greedy references
    (tests/conftest.py: shared with the recurrent drafter's tests)."""
    assert len(greedy_cases) == 50
    return greedy_cases


def test_head_drafters_are_registered_and_trainable():
    assert set(HEAD_DRAFTERS) <= {n for n, s in DRAFTERS.items() if s.trainable}


def test_medusa_tree_grows_by_expected_length():
    acc = [[0.6, 0.2, 0.1], [0.4, 0.1, 0.05], [0.3, 0.1, 0.0]]
    paths = medusa_tree(acc, 6)
    assert paths == [(0,), (1,), (2,), (0, 0), (1, 0), (0, 0, 0)]
    # products: .6, .2, .1, .24, .08, .072 — the 6 largest; (0, 1) = .06 is left out
    assert all(p[:-1] in paths for p in paths if len(p) > 1)


@pytest.mark.parametrize("name", HEAD_DRAFTERS)
def test_greedy_equals_hf_greedy_batched(zoo, cases, name):
    target, tok = zoo
    big = {"nodes": 32} if "medusa" in name else {}  # the biggest tree the CLI ever used
    tau = greedy_tau(SpeculativeDecoder(target, build_drafter(name, target, **big), tok), cases)
    assert tau > 1.3, f"{name}: the shipped heads should be accepted (τ {tau:.2f})"


def test_medusa_sizes_its_tree_from_measured_costs(zoo, cases):
    from osd.drafters.medusa import AUTO_SIZES

    target, tok = zoo
    drafter = build_drafter("medusa", target)  # nodes="auto", the registry's default
    assert drafter.nodes in AUTO_SIZES and len(drafter.paths) == drafter.nodes
    assert build_drafter("koala-medusa", target).nodes in AUTO_SIZES  # costs measured once
    greedy_tau(SpeculativeDecoder(target, drafter, tok), cases[:10])  # = HF greedy
    with pytest.raises(ValueError, match="nodes"):
        build_drafter("medusa", target, nodes="many")


def test_one_token_prompt_and_depth_caps(zoo):
    target, tok = zoo
    for name in ("medusa", "eagle"):
        dec = SpeculativeDecoder(target, build_drafter(name, target), tok)
        with torch.inference_mode():
            ref = target.generate(torch.tensor([[5]]), max_new_tokens=7, do_sample=False)
        assert dec.generate([5], max_new_tokens=6).tokens == ref[0, 1:7].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("name", HEAD_DRAFTERS)
def test_sampling_through_head_trees_is_exact(zoo, name):
    """First two sampled tokens (T = 1, top-k 8) vs the target's exact joint, chi-square."""
    target, tok = zoo
    big = {"nodes": 32} if "medusa" in name else {}  # a wide tree, as in the greedy test
    assert chi2_first_two(target, tok, build_drafter(name, target, **big)) > 1e-3


# ---- training --------------------------------------------------------------------------------


def _fresh(target, kind, layers=1, adversarial=False):
    cfg = HeadConfig(kind, 288, 4096, layers=layers, adversarial=adversarial)
    torch.manual_seed(0)
    if kind == "medusa":
        return MedusaDrafter(target, MedusaHeads(288, 4, layers), cfg)
    return EagleDrafter(target, EagleHead(target.config, layers), cfg)


@pytest.fixture(scope="module")
def stream(zoo, data_dir):
    target, tok = zoo
    return hidden_stream(target, tok, data_dir, "medusa")


def _train_online(student, records, steps, config=None):
    config = config or DistillConfig()
    obj = student.objective(config)
    opt = torch.optim.Adam(student.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        student.module.train()
        logits = student.predict(records)
        loss = obj.loss(logits, records).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj.after_step([lg.detach() for lg in logits], records)
        losses.append(float(loss.detach()))
    return losses, obj


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_online_head_training_lowers_loss_and_raises_acceptance(zoo, stream, kind):
    target, _ = zoo
    student = head_student(_fresh(target, kind))
    assert all(r.hidden is not None for r in stream)
    before = draft_acceptance(student, stream)
    losses, _ = _train_online(student, stream, 25)
    after = draft_acceptance(student, stream)
    assert before.positions > 100 and losses[-1] < losses[0]
    assert after.mean > before.mean + 0.05, (before, after)


def test_offline_warm_start_lowers_validation_loss(zoo, tmp_path):
    target, tok = zoo
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        seqs = []
        for _ in range(12):
            ids = torch.randint(4, 4096, (30,), generator=g)
            out = target.generate(ids[None], max_new_tokens=20, do_sample=False)[0]
            feats = target.model(input_ids=out[None]).last_hidden_state[0].clone()
            seqs.append(Sequence_(out.clone(), feats, 30))
    for kind in ("medusa", "eagle"):
        cfg = HeadTrainConfig(kind=kind, epochs=3, batch=4, held_out=0.25, lr=3e-3)
        _, hc, info = train_heads(target, tok, cfg, tmp_path / kind, seqs=seqs)
        assert info["val_loss_after"] < info["val_loss_before"]
        assert (tmp_path / kind / "heads.safetensors").is_file() and hc.accuracy
        again = build_drafter(kind, target, heads=str(tmp_path / kind))
        assert again.state_dict().keys() == (_fresh(target, kind).state_dict().keys())


def test_warm_start_reads_only_the_domains_asked(zoo, data_dir):
    """``osd heads train --domains prose,instruct``: the target continues those domains'
    train prompts only (a drift study keeps the others new to the heads)."""
    from osd.distill.heads_train import self_distill
    from osd.workloads.datasets import load_domain

    target, tok = zoo
    cfg = HeadTrainConfig(domains="sql,prose", prompts_per_domain=2, max_new_tokens=3)
    seqs = self_distill(target, tok, cfg, data_dir)
    want = [
        tok(q.prompt, add_special_tokens=False).input_ids[-cfg.prompt_tokens :]
        for d in ("sql", "prose")
        for q in load_domain(d, "train", data_dir)[:2]
    ]
    assert [s.ids[: s.prompt_len].tolist() for s in seqs] == want
    with pytest.raises(ValueError, match="unknown domain"):
        self_distill(target, tok, HeadTrainConfig(domains="poetry"), data_dir)


def test_adversarial_step_updates_both_networks_deterministically(zoo, stream):
    target, _ = zoo
    runs = []
    for _ in range(2):
        student = head_student(_fresh(target, "medusa", layers=2, adversarial=True))
        w0 = {k: v.clone() for k, v in student.module.state_dict().items()}
        obj = student.objective(DistillConfig())
        assert isinstance(obj, AdversarialObjective)
        d0 = {k: v.clone() for k, v in obj.disc.state_dict().items()}
        _, obj = _train_online(student, stream[:4], 2)
        w1, d1 = student.module.state_dict(), obj.disc.state_dict()
        assert any(not torch.equal(w0[k], w1[k]) for k in w0), "the head did not move"
        assert any(not torch.equal(d0[k], d1[k]) for k in d0), "the discriminator did not move"
        runs.append((w1, d1))
    for a, b in zip(runs[0], runs[1], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", HEAD_DRAFTERS)
def test_head_version_with_wrong_shape_or_nan_is_refused(zoo, name):
    target, _ = zoo
    drafter = build_drafter(name, target)
    student = build_student(name, drafter)
    reg = Registry()
    base = student.export().weights
    reg.register_base(name, base)
    key = sorted(base)[0]
    bad_shape = dict(base, **{key: torch.zeros(*base[key].shape[:-1], base[key].shape[-1] + 1)})
    nan = {k: v.clone() for k, v in base.items()}
    nan[key].view(-1)[0] = float("nan")
    for weights, msg in ((bad_shape, "shape"), (nan, "NaN")):
        with pytest.raises(WeightValidationError, match=msg):
            reg.publish(name, weights)
    with pytest.raises(RuntimeError, match="size mismatch"):  # the drafter refuses it too
        drafter.load_state_dict(bad_shape, 1)
    assert [v.version for v in reg.versions(name)] == [0]


@pytest.mark.parametrize("name", ["medusa", "eagle"])
def test_online_loop_trains_gates_and_swaps_heads(zoo, data_dir, name):
    """``osd online --drafter medusa|eagle`` in small: records carry hidden states, the
    trainer publishes head versions through the gate, and the frozen heads' replay (fed
    the target's hidden states) scores what the engine measured while both were v0."""
    from dataclasses import replace

    from osd.buffer.memory import MemoryBuffer
    from osd.online import REPLAY_DISTILL, OnlineConfig, run_online

    target, tok = zoo
    cfg = OnlineConfig(
        drafter=name,
        schedule="switch:instruct>sql@4",
        n=12,
        max_new_tokens=16,
        distill=replace(REPLAY_DISTILL, publish_every_steps=6, lr=1e-3),
        holdout_every=3,
        window=4,
    )
    result = run_online(target, None, tok, MemoryBuffer(consumer="t0"), cfg, data_dir=data_dir)
    assert result.versions, "no head version was published"
    first = [r for r in result.requests if r.version == 0][:3]
    assert first and all(r.proposed_frozen > 0 for r in first)
    for r in first:
        assert abs(r.alpha_online - r.alpha_frozen) < 0.1, r
