"""The early-stop decision model (osd.specdec.decision) and the draft chain that uses it."""

from __future__ import annotations

import copy

import pytest
import torch

from osd.distill.record import build_record, encode
from osd.drafters import build_drafter
from osd.models import load_model, load_tokenizer
from osd.specdec.decision import AcceptPredictor
from osd.specdec.engine import DecodeStats, SpeculativeDecoder
from osd.workloads.datasets import DOMAINS, load_domain


def test_learns_a_separable_toy_stream() -> None:
    """Peaked draft distributions are accepted, flat ones rejected: after a few hundred
    labels the model tells them apart and stops on the flat ones."""
    g = torch.Generator().manual_seed(0)
    model = AcceptPredictor(threshold=0.5, every=32)
    peaked = torch.zeros(1, 50)
    peaked[0, 3] = 8.0
    flat = torch.zeros(1, 50)
    for _ in range(40):
        for depth in (1, 2, 3):
            noise = 0.3 * torch.randn(2, 50, generator=g)
            f = model.features(torch.cat([peaked, flat]) + noise, depth)
            model.observe(f, [1.0, 0.0])
    assert model.seen >= 200 and model.updates >= 7
    f = model.features(torch.cat([peaked, flat]), 2)
    p = model.prob(f)
    assert p[0] > 0.8 and p[1] < 0.2
    assert model.keep_going(f).tolist() == [True, False]


def test_bad_threshold_and_trees() -> None:
    with pytest.raises(ValueError, match="threshold"):
        AcceptPredictor(threshold=1.5)
    draft = load_model("zoo:draft", "cpu")
    # trees stop too (improved MCSD: the sliced mask cuts them at a level; tests/test_mcsd.py)
    assert build_drafter("draft_model", None, draft, tree="2,2", early_stop=0.3).stop is not None


def _decode(dec, prompts, budget, stats):
    """All prompts as one batch, each released when it finishes; the states."""
    states = dec.start_batch(prompts, [budget] * len(prompts))
    live = list(states)
    while live:
        dec.step_batch(live, [stats] * len(live))
        for s in [s for s in live if s.finished]:
            dec.release(s)
        live = [s for s in live if not s.finished]
    return states


@pytest.mark.slow
def test_early_stop_keeps_greedy_output_and_drafts_less() -> None:
    """Batched greedy decoding with the decision model on equals the target's greedy output
    (stopping is fixed by the draft's distribution: lossless), and once it has learned, it
    drafts fewer positions that verification throws away."""
    target, tok = load_model("zoo:target", "cpu"), load_tokenizer("zoo:target")
    draft = load_model("zoo:draft", "cpu")
    prompts = [
        tok(q.prompt, add_special_tokens=False).input_ids[-64:]
        for d in DOMAINS
        for q in load_domain(d, "eval")[:4]
    ]
    stopping = build_drafter("draft_model", target, draft, k=8, early_stop=0.5)
    plain = build_drafter("draft_model", target, draft, k=8)
    runs = {}
    for name, drafter in (("stop", stopping), ("plain", plain)):
        dec = SpeculativeDecoder(target, drafter, tok)
        dec.eos = set()
        stats = DecodeStats()
        outs = []
        for round_ in range(2):  # round 0 teaches the decision model, round 1 is measured
            states = _decode(dec, prompts, 24, stats if round_ else None)
            outs.append([s.tokens[s.prompt_len :] for s in states])
        runs[name] = (outs, stats)
    with torch.inference_mode():
        for p, got in zip(prompts, runs["stop"][0][1], strict=True):
            ref = target.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)
            want = ref[0, len(p) :].tolist()  # HF stops at EOS; ours ignores it here
            assert got[: len(want)] == want
    assert runs["stop"][0] == runs["plain"][0]
    assert stopping.stop.seen > 100
    wasted = {k: s.proposed - s.accepted for k, (_, s) in runs.items()}
    assert wasted["stop"] < 0.8 * wasted["plain"], wasted


# -- the decision model through the registry (trained from records, gated, hot-swapped) ----


def _stop_records(n: int, seed: int) -> list:
    """Records whose stop fields form a separable stream: peaked draft distributions are
    accepted, flat ones rejected (the toy stream above, as a replica would log it)."""
    g = torch.Generator().manual_seed(seed)
    model = AcceptPredictor()
    peaked = torch.zeros(1, 50)
    peaked[0, 3] = 8.0
    out = []
    for i in range(n):
        x = torch.cat([peaked, torch.zeros(1, 50)]) + 0.3 * torch.randn(2, 50, generator=g)
        feats = model.features(x, 1 + i % 3)
        out.append(
            build_record(
                f"r{seed}-{i}", [1, 2, 3, 4], 2, [2, 3], torch.randn(2, 8, generator=g),
                drafter_id="draft", version=0, stop_features=feats, stop_labels=[1, 0],
            )
        )  # fmt: skip
    return out


def test_decision_model_is_trained_gated_and_hot_swapped_through_the_registry() -> None:
    """A trainer reading the drafter's stream through its own consumer group learns the
    decision model from the records' stop fields (the drafter's trainer still gets every
    record); the registry promotes the trained version over the prior on held-out labels,
    refuses a worse one, a NaN one and a wrong shape; a replica's predictor loads it."""
    from dataclasses import replace

    from osd.buffer import MemoryBuffer
    from osd.distill.decision import DecisionStudent, decision_id
    from osd.distill.trainer import OnlineDistiller
    from osd.online import DECISION_DISTILL
    from osd.registry import Promoter, PromotionGate, Registry, WeightValidationError

    buffer = MemoryBuffer()
    for rec in _stop_records(160, seed=0):
        buffer.put("draft", encode(rec))
    serving = AcceptPredictor(threshold=0.5, learn=False)
    cfg = replace(DECISION_DISTILL, publish_every_steps=8)
    trainer = OnlineDistiller(
        DecisionStudent(copy.deepcopy(serving.net), 8),
        buffer.for_group("decision"),
        decision_id("draft"),
        cfg,
        stream="draft",
    )
    losses = []
    while (report := trainer.step()) is not None:
        losses.append(report.loss)
    assert trainer.records_seen == 160 and trainer.positions_seen == 320
    assert losses[-1] < 0.5 * losses[0], losses
    assert len(buffer.read("draft", 200)) == 160  # the drafter's own group still has them all
    promoter = Promoter(
        Registry(), "draft-stop", DecisionStudent(copy.deepcopy(serving.net), 8), PromotionGate()
    )
    holdout = _stop_records(16, seed=1)
    good = trainer.student.export().weights
    out = promoter.submit(good, "full", {"trainer": "test"}, holdout)
    assert out.promoted and out.candidate > out.live + 0.2, out
    assert "stop-likelihood" in out.reason
    worse = {k: -v for k, v in good.items()}  # predicts the opposite
    assert not promoter.submit(worse, "full", {"trainer": "test"}, holdout).promoted
    with pytest.raises(WeightValidationError):
        promoter.submit({k: v * float("nan") for k, v in good.items()}, "full", {}, holdout)
    with pytest.raises(WeightValidationError):
        promoter.submit({**good, "0.weight": torch.zeros(16, 5)}, "full", {}, holdout)
    x = torch.as_tensor(holdout[0].stop_features.astype("float32"))  # [peaked, flat]
    assert serving.keep_going(x).tolist() == [True, True]  # the optimistic prior
    serving.load_state_dict(promoter.weights(out.version), out.version)
    assert serving.version == out.version and serving.keep_going(x).tolist() == [True, False]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["eagle", "recurrent"])
def test_head_drafters_stop_early_losslessly_and_log_labels(name) -> None:
    """The EAGLE-style head and the recurrent drafter consult the decision model too:
    batched greedy output with it = the same drafter without it = HF greedy; once it has
    learned it drafts fewer wasted positions; the record collector logs one label per
    position verification reached (as many as the model learned from)."""
    from osd.distill.collect import RecordCollector

    target, tok = load_model("zoo:target", "cpu"), load_tokenizer("zoo:target")
    prompts = [
        tok(q.prompt, add_special_tokens=False).input_ids[-48:]
        for d in DOMAINS
        for q in load_domain(d, "eval")[:2]
    ]
    runs = {}
    # θ 0.7: the zoo heads accept 0.65–0.9 a position, so a stop at 0.5 has little to cut
    for kind, opts in (("stop", {"early_stop": 0.7}), ("plain", {})):
        drafter = build_drafter(name, target, **opts)
        collector = RecordCollector()
        dec = SpeculativeDecoder(target, drafter, tok, observers=[collector])
        dec.eos = set()
        stats, outs, labels = DecodeStats(), [], 0
        for round_ in range(2):  # round 0 teaches the decision model, round 1 is measured
            states = _decode(dec, prompts, 16, stats if round_ else None)
            outs = [s.tokens[s.prompt_len :] for s in states]
            for i, s in enumerate(states):
                rec = collector.finish(s, f"{round_}-{i}", "d", 0)
                labels += 0 if rec is None or rec.stop_labels is None else len(rec.stop_labels)
        runs[kind] = (outs, stats, drafter, labels)
    with torch.inference_mode():
        for p, got in zip(prompts, runs["stop"][0], strict=True):
            want = target.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False)
            assert got[: len(want[0]) - len(p)] == want[0, len(p) :].tolist()
    assert runs["stop"][0] == runs["plain"][0]
    stop = runs["stop"][2].stop
    assert stop.seen > 50 and runs["stop"][3] == stop.seen + len(stop._y)
    assert runs["plain"][3] == 0  # no decision model, no stop fields
    wasted = {k: s.proposed - s.accepted for k, (_, s, _, _) in runs.items()}
    assert wasted["stop"] < wasted["plain"], wasted


@pytest.mark.slow
def test_online_loop_trains_and_promotes_the_decision_model(data_dir) -> None:
    """``osd online --early-stop``: the decision model's versions go through the registry
    beside the draft's, and the serving drafter adopts the promoted ones."""
    from dataclasses import replace

    from osd.buffer import MemoryBuffer
    from osd.online import DECISION_DISTILL, OnlineConfig, run_online

    target, draft = load_model("zoo:target", "cpu"), load_model("zoo:draft", "cpu")
    tok = load_tokenizer("zoo:target")
    cfg = OnlineConfig(
        schedule="switch:instruct>sql@8",
        n=24,
        max_new_tokens=16,
        drafter_options={"early_stop": 0.5},
        decision=replace(DECISION_DISTILL, publish_every_steps=4),
        holdout_every=4,
    )
    rep = run_online(target, draft, tok, MemoryBuffer(), cfg, data_dir=data_dir).to_json()
    dv = rep["decision_versions"]
    assert dv and any(v["promoted"] for v in dv), dv
    assert [v["version"] for v in dv] == list(range(1, len(dv) + 1))
