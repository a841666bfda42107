"""The serving loop: continuous batching, hot-swaps between steps, stop strings, records."""

import threading
from collections import Counter

import pytest
import torch

from osd.distill.collect import RecordCollector
from osd.distill.record import LogConfig
from osd.drafters.draft_model import DraftModelDrafter
from osd.models import load_model, load_tokenizer
from osd.serving import ServeRequest, ServingLoop, visible_text
from osd.specdec.engine import SpeculativeDecoder
from osd.specdec.sampling import SamplingParams

PROMPTS = ["Question: what is 2 + 3?\nAnswer:", "Instruction: write a poem\nOutput:", "SELECT"]


@pytest.fixture(scope="module")
def models(micro_zoo):
    target = load_model(str(micro_zoo / "target"), "cpu")
    draft = load_model(str(micro_zoo / "draft"), "cpu")
    return target, draft, load_tokenizer(str(micro_zoo / "target"))


class Events:
    """Collects each request's deltas; ``wait`` until all requests finished."""

    def __init__(self, n: int) -> None:
        self.by_id: dict[str, list] = {}
        self.n, self.done = n, threading.Event()
        self.order: list[str] = []

    def callback(self, rid: str):
        def on_event(delta) -> None:
            self.by_id.setdefault(rid, []).append(delta)
            if delta.final:
                self.order.append(rid)
                if len(self.order) == self.n:
                    self.done.set()

        return on_event

    def wait(self) -> None:
        assert self.done.wait(60), "requests did not finish"

    def result(self, rid: str):
        last = self.by_id[rid][-1]
        assert last.error is None, last.error
        return last.result


def make_loop(models, records=None, **kw) -> ServingLoop:
    import copy

    target, draft, tok = models
    dec = SpeculativeDecoder(target, DraftModelDrafter(copy.deepcopy(draft), k=4), tok)
    collector = RecordCollector(LogConfig(mode="all")) if records is not None else None
    return ServingLoop(
        dec, collector=collector, on_record=None if records is None else records.append, **kw
    ).start()


def target_greedy(models, ids, n):
    target = models[0]
    out = target.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def test_visible_text_worked_examples():
    assert visible_text("4 + 4 = 8\n", ("\n\n",)) == ("4 + 4 = 8", False)
    assert visible_text("4 + 4 = 8\n\nQ", ("\n\n",)) == ("4 + 4 = 8", True)
    assert visible_text("a;b;", (";", "b;")) == ("a", True)  # the earliest stop wins
    assert visible_text("abc", ()) == ("abc", False)
    assert visible_text("ab\ufffd", ()) == ("ab", False)


def test_concurrent_greedy_requests_match_target_and_survive_a_swap(models):
    records: list = []
    loop = make_loop(models, records, max_batch=2)  # 3 requests: one waits for a slot
    tok = models[2]
    ev = Events(len(PROMPTS))
    ids = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    stepped = threading.Event()
    for i, x in enumerate(ids):
        cb = ev.callback(f"r{i}")
        loop.submit(
            ServeRequest(f"r{i}", x, 24, domain="d"), lambda d, cb=cb: (cb(d), stepped.set())
        )
    assert stepped.wait(30)  # sequences are in flight now
    perturbed = {
        k: v + 0.01 * torch.randn_like(v) for k, v in loop.decoder.drafter.state_dict().items()
    }
    loop.offer_weights(perturbed, 7)  # adopted between two steps, requests in flight
    ev.wait()
    loop.stop()
    assert [s.version for s in loop.swaps] == [7] and loop.swaps[0].pause_s < 0.5
    for i, x in enumerate(ids):
        r = ev.result(f"r{i}")
        assert r.token_ids == target_greedy(models, x, 24)[: len(r.token_ids)]
        assert r.finish_reason in ("length", "stop") and r.completion_tokens > 0
        deltas = ev.by_id[f"r{i}"]
        assert "".join(d.text for d in deltas) == r.text  # streamed pieces add up
        assert r.stats.proposed > 0 and 0 <= r.stats.alpha <= 1
        assert r.version_end == 7
    assert any(ev.result(f"r{i}").version_start == 0 for i in range(3))
    assert len(records) == 3 and {r.domain for r in records} == {"d"}
    assert loop.finished == 3 and loop.failed == 0


def test_stop_strings_cut_the_text_and_finish(models):
    loop = make_loop(models)
    tok = models[2]
    ids = tok(PROMPTS[0], add_special_tokens=False).input_ids
    ev = Events(1)
    loop.submit(ServeRequest("free", ids, 24), ev.callback("free"))
    ev.wait()
    free = ev.result("free").text
    stop = free.strip()[3:5] or free[:1]  # something the text certainly contains
    ev2 = Events(1)
    loop.submit(ServeRequest("cut", ids, 24, stop=(stop,)), ev2.callback("cut"))
    ev2.wait()
    loop.stop()
    r = ev2.result("cut")
    assert r.finish_reason == "stop" and r.text == free[: free.find(stop)]
    assert "".join(d.text for d in ev2.by_id["cut"]) == r.text


def test_seeded_sampling_is_reproducible(models):
    loop = make_loop(models)
    ids = models[2](PROMPTS[1], add_special_tokens=False).input_ids
    ev = Events(2)
    for rid in ("a", "b"):
        sampling = SamplingParams(temperature=0.8, top_p=0.95, seed=11)
        loop.submit(ServeRequest(rid, ids, 16, sampling), ev.callback(rid))
    ev.wait()
    loop.stop()
    assert ev.result("a").text == ev.result("b").text


def test_errors_are_delivered_and_the_loop_keeps_serving(models):
    loop = make_loop(models)
    context = loop.decoder.context
    ev = Events(2)
    loop.submit(ServeRequest("long", [1] * (context + 5), 4), ev.callback("long"))
    loop.submit(ServeRequest("fine", [1, 2, 3], 4), ev.callback("fine"))
    ev.wait()
    loop.stop()
    err = ev.by_id["long"][-1].error
    assert isinstance(err, ValueError) and "context" in str(err)
    assert ev.result("fine").completion_tokens == 4 and loop.failed == 1


def test_cancelled_request_is_dropped_without_a_record(models):
    records: list = []
    loop = make_loop(models, records)
    ids = models[2](PROMPTS[0], add_special_tokens=False).input_ids
    ev = Events(1)
    loop.cancel("gone")  # cancelled before admission: never decoded
    loop.submit(ServeRequest("gone", ids, 200), lambda d: None)
    loop.submit(ServeRequest("kept", ids, 8), ev.callback("kept"))
    ev.wait()
    loop.stop()
    assert [r.request_id for r in records] == ["kept"]


def test_bad_weights_keep_the_old_version(models):
    loop = make_loop(models)
    loop.offer_weights({"nope": torch.zeros(1)}, 3)
    ev = Events(1)
    loop.submit(ServeRequest("x", [1, 2, 3], 4), ev.callback("x"))
    ev.wait()
    loop.stop()
    assert loop.version == 0 and loop.swaps == [] and ev.result("x").version_end == 0


# -- continuous batching, on the shipped zoo -------------------------------------------------


@pytest.fixture(scope="module")
def zoo():
    return (
        load_model("zoo:target", "cpu"),
        load_model("zoo:draft", "cpu"),
        load_tokenizer("zoo:target"),
    )


class Spy:
    """A real decoder that records each step_batch's size and counts release() per state."""

    def __init__(self, decoder: SpeculativeDecoder, max_batch: int | None = None) -> None:
        self.inner = decoder
        if max_batch is not None:
            self.max_batch = max_batch
        self.started: list = []
        self.released: Counter = Counter()
        self.batches: list[int] = []
        self.fail_next = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def start_batch(self, *args, **kw):
        states = self.inner.start_batch(*args, **kw)
        self.started += states
        return states

    def step_batch(self, states, stats):
        assert not any(s.finished or s.released for s in states), "stepped a retired sequence"
        assert len(states) <= getattr(self, "max_batch", len(states))
        self.batches.append(len(states))
        if self.fail_next:
            self.fail_next = False
            raise IndexError("injected engine bug")
        return self.inner.step_batch(states, stats)

    def release(self, state):
        self.released[id(state)] += 1
        self.inner.release(state)

    def released_once(self) -> bool:
        return all(self.released[id(s)] == 1 for s in self.started) and len(self.released) == len(
            self.started
        )


def spy_loop(zoo, max_batch: int = 32, engine_max: int | None = None) -> tuple[ServingLoop, Spy]:
    target, draft, tok = zoo
    spy = Spy(SpeculativeDecoder(target, DraftModelDrafter(draft, k=4), tok), engine_max)
    return ServingLoop(spy, max_batch=max_batch).start(), spy


def ragged_prompts(tok, lengths: list[int]) -> list[list[int]]:
    text = " ".join(PROMPTS) + " Instruction: list three colours.\nOutput: red, green"
    ids = tok(text * 3, add_special_tokens=False).input_ids
    return [ids[i : i + n] for i, n in enumerate(lengths)]


def test_requests_admitted_mid_flight_match_their_output_alone(zoo):
    loop, spy = spy_loop(zoo)
    tok = zoo[2]
    first, *later = ragged_prompts(tok, [9, 4, 15, 22])
    ev = Events(4)
    streaming = threading.Event()
    cb = ev.callback("r0")
    loop.submit(ServeRequest("r0", first, 40), lambda d: (cb(d), streaming.set()))
    assert streaming.wait(30)  # r0 is in flight: the others join its batch
    for i, ids in enumerate(later, 1):
        loop.submit(ServeRequest(f"r{i}", ids, 16 + 4 * i), ev.callback(f"r{i}"))
    ev.wait()
    loop.stop()
    for i, ids in enumerate([first, *later]):
        r = ev.result(f"r{i}")
        assert r.token_ids == target_greedy(zoo, ids, 40 if i == 0 else 16 + 4 * i)
        assert "".join(d.text for d in ev.by_id[f"r{i}"]) == r.text
    assert max(spy.batches) >= 2  # they were stepped together
    assert spy.released_once() and loop.failed == 0


def test_many_ragged_concurrent_requests_all_finish_correctly(zoo):
    loop, spy = spy_loop(zoo, max_batch=5)  # 12 requests: most wait for a slot
    tok = zoo[2]
    lengths = [3, 17, 6, 28, 11, 2, 23, 8, 14, 5, 30, 9]
    budgets = [1, 12, 20, 3, 16, 7, 24, 2, 9, 18, 5, 13]
    prompts = ragged_prompts(tok, lengths)
    ev = Events(len(prompts))
    for i, (ids, n) in enumerate(zip(prompts, budgets, strict=True)):
        loop.submit(ServeRequest(f"r{i}", ids, n), ev.callback(f"r{i}"))
    ev.wait()
    loop.stop()
    for i, (ids, n) in enumerate(zip(prompts, budgets, strict=True)):
        r = ev.result(f"r{i}")
        assert r.token_ids == target_greedy(zoo, ids, n), f"r{i}"
        assert r.finish_reason == ("length" if r.completion_tokens == n else "stop")
        assert r.prompt_tokens == len(ids)
    assert max(spy.batches) == 5 and min(spy.batches) >= 1
    assert len(spy.started) == 12 and spy.released_once()
    assert loop.finished == 12 and loop.failed == 0 and loop.steps == len(spy.batches)


def test_release_once_for_cancelled_stopped_and_failed_requests(zoo):
    loop, spy = spy_loop(zoo)
    tok = zoo[2]
    ids = tok(PROMPTS[0], add_special_tokens=False).input_ids
    ev = Events(1)
    streaming = threading.Event()
    loop.submit(ServeRequest("gone", ids, 200), lambda d: streaming.set())
    assert streaming.wait(30)
    loop.cancel("gone")  # in flight: dropped between two steps
    loop.submit(ServeRequest("cut", ids, 24, stop=(" ",)), ev.callback("cut"))
    ev.wait()
    assert ev.result("cut").finish_reason == "stop"
    spy.fail_next = True  # the next batch raises: both of its sequences fail ...
    ev2 = Events(2)
    for rid in ("a", "b"):
        loop.submit(ServeRequest(rid, ids, 8), ev2.callback(rid))
    ev2.wait()
    errors = [ev2.by_id[rid][-1].error for rid in ("a", "b") if ev2.by_id[rid][-1].error]
    assert errors and all(isinstance(e, RuntimeError) and "injected" in str(e) for e in errors)
    ev3 = Events(1)  # ... and the loop keeps serving
    loop.submit(ServeRequest("after", ids, 6), ev3.callback("after"))
    ev3.wait()
    loop.stop()
    assert ev3.result("after").token_ids == target_greedy(zoo, ids, 6)
    assert spy.released_once() and loop.load == (0, 0)


def test_max_batch_is_bounded_by_the_engine(zoo):
    loop, spy = spy_loop(zoo, max_batch=32, engine_max=2)
    assert loop.max_batch == 2
    tok = zoo[2]
    ev = Events(4)
    for i, ids in enumerate(ragged_prompts(tok, [5, 6, 7, 8])):
        loop.submit(ServeRequest(f"r{i}", ids, 6), ev.callback(f"r{i}"))
    ev.wait()
    loop.stop()
    assert max(spy.batches) <= 2 and spy.released_once()
    with pytest.raises(ValueError, match="max_batch"):
        ServingLoop(spy, max_batch=0)


def test_a_refused_request_admitted_with_others_fails_alone(zoo):
    """Admission prefills the waiting requests together; one the engine refuses (ids
    outside the vocabulary) fails with the reason, the others are served as if alone."""
    loop, spy = spy_loop(zoo)
    tok = zoo[2]
    good = ragged_prompts(tok, [7, 12])
    ev = Events(3)
    loop.submit(ServeRequest("g0", good[0], 8), ev.callback("g0"))
    loop.submit(ServeRequest("bad", [5, 10**9], 8), ev.callback("bad"))
    loop.submit(ServeRequest("g1", good[1], 8), ev.callback("g1"))
    ev.wait()
    loop.stop()
    err = ev.by_id["bad"][-1].error
    assert isinstance(err, ValueError) and "vocabulary" in str(err)
    for rid, ids in (("g0", good[0]), ("g1", good[1])):
        assert ev.result(rid).token_ids == target_greedy(zoo, ids, 8)
    assert loop.failed == 1 and spy.released_once()
