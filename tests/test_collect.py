"""Records carry the target's distribution at the right positions, from the verifier."""

import numpy as np
import pytest
import torch

from osd.distill.collect import RecordCollector
from osd.distill.record import LogConfig, LogMode, decode, encode
from osd.drafters.draft_model import DraftModelDrafter
from osd.models import load_model
from osd.specdec.engine import SpeculativeDecoder
from osd.specdec.sampling import SamplingParams


@pytest.fixture(scope="module")
def models(micro_zoo):
    return load_model(str(micro_zoo / "target")), load_model(str(micro_zoo / "draft"))


@pytest.mark.parametrize("mode", [LogMode.ALL, LogMode.REJECTED])
@pytest.mark.parametrize("tree", [None, (2, 2), "target_init"])
def test_logged_topk_equals_target_forward(models, mode, tree):
    target, draft = models
    if tree == "target_init":  # steps keep their last token for the next one's first level
        drafter = DraftModelDrafter(draft, tree=(1, 2), target_init=True)
    else:
        drafter = DraftModelDrafter(draft, k=3, tree=tree)
    dec = SpeculativeDecoder(target, drafter)
    dec.eos = set()
    collector = RecordCollector(LogConfig(mode=mode, k=8))
    dec.add_observer(collector)
    state = dec.start([5, 9, 17, 33, 2], max_new_tokens=20)
    steps = 0
    while not state.finished:
        dec.step(state)
        steps += 1
    rec = collector.finish(state, "req-1", "draft", version=3, domain="math")
    rec = decode(encode(rec), vocab_size=target.config.vocab_size)
    assert rec.version == 3 and rec.domain == "math" and rec.drafter_id == "draft"
    assert rec.token_ids.tolist() == state.tokens
    if mode == LogMode.ALL:
        assert rec.positions.tolist() == list(range(5, 25))
    else:  # one per step (the last step may be cut by the budget)
        assert steps - 1 <= len(rec.positions) <= steps
    with torch.inference_mode():
        full = target(torch.tensor([state.tokens])).logits[0].log_softmax(-1)  # [T, V]
    for i, t in enumerate(rec.positions.tolist()):
        ref = full[t - 1]  # row t-1 predicts token t
        top = ref.topk(8)
        assert rec.topk_ids[i].tolist() == top.indices.tolist()
        np.testing.assert_allclose(
            rec.topk_logprobs[i].astype(np.float32), top.values.numpy(), atol=2e-2
        )


def test_sampling_rate_zero_logs_nothing(models):
    target, draft = models
    dec = SpeculativeDecoder(target, DraftModelDrafter(draft, k=2))
    collector = RecordCollector(LogConfig(rate=0.0))
    dec.add_observer(collector)
    state = dec.start([5, 9, 17], max_new_tokens=5)
    while not state.finished:
        dec.step(state)
    assert collector.finish(state, "r", "draft", 0) is None


def test_hidden_states_are_logged_from_the_verifier(models):
    target, draft = models
    dec = SpeculativeDecoder(target, DraftModelDrafter(draft, tree=(2, 2)))
    dec.eos = set()
    collector = RecordCollector(LogConfig(mode=LogMode.ALL, k=4, hidden=True))
    dec.add_observer(collector)
    state = dec.start([5, 9, 17, 33], max_new_tokens=12)
    while not state.finished:
        dec.step(state)
    rec = decode(encode(collector.finish(state, "r", "draft", 0)))
    assert rec.hidden.shape == (12, target.config.hidden_size)
    with torch.inference_mode():
        out = target(torch.tensor([state.tokens]), output_hidden_states=True)
    ref = out.hidden_states[-1][0]  # [T, H]; row t-1 is the state that predicts token t
    for i, t in enumerate(rec.positions.tolist()):
        np.testing.assert_allclose(
            rec.hidden[i].astype(np.float32), ref[t - 1].numpy(), atol=2e-2, rtol=1e-2
        )


def test_records_carry_the_requests_sampling_parameters(models):
    target, draft = models
    dec = SpeculativeDecoder(target, DraftModelDrafter(draft, k=2))
    collector = RecordCollector(LogConfig(mode=LogMode.ALL, k=4))
    dec.add_observer(collector)
    sampling = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3)
    state = dec.start([5, 9, 17], max_new_tokens=6, sampling=sampling)
    while not state.finished:
        dec.step(state)
    rec = decode(encode(collector.finish(state, "r", "draft", 0)))
    assert (rec.temperature, rec.top_k, rec.top_p) == (0.7, 5, 0.9)

    greedy = dec.start([5, 9, 17], max_new_tokens=3)
    while not greedy.finished:
        dec.step(greedy)
    rec = decode(encode(collector.finish(greedy, "g", "draft", 0)))
    assert (rec.temperature, rec.top_k, rec.top_p) == (0.0, 0, 1.0)
