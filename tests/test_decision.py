"""The early-stop decision model (osd.specdec.decision) and the draft chain that uses it."""

from __future__ import annotations

import pytest
import torch

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
            states = [dec.start(p, 24) for p in prompts]
            live = list(states)
            while live:
                dec.step_batch(live, [stats if round_ else None] * len(live))
                for s in [s for s in live if s.finished]:
                    dec.release(s)
                live = [s for s in live if not s.finished]
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
