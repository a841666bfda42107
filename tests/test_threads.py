"""One OpenMP team per process (osd/specdec/threads.py): who gets the intra-op threads."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from osd.specdec import threads


def test_apart_returns_the_value_and_runs_in_another_thread():
    main = threading.get_ident()
    assert threads.apart(lambda a, b=0: (a + b, threading.get_ident()), 40, b=2)[0] == 42
    assert threads.apart(threading.get_ident) != main


def test_apart_reraises_the_builders_error():
    def bad() -> None:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        threads.apart(bad)


def test_side_and_compute_set_only_the_calling_threads_count():
    seen: dict[str, int] = {}

    def side() -> None:
        threads.side()
        seen["side"] = torch.get_num_threads()

    def compute() -> None:
        threads.compute(3)
        seen["compute"] = torch.get_num_threads()
        threads.compute(0)  # clamped: at least one
        seen["clamped"] = torch.get_num_threads()

    before = torch.get_num_threads()
    for fn in (side, compute):
        t = threading.Thread(target=fn)
        t.start()
        t.join()
    assert seen == {"side": 1, "compute": 3, "clamped": 1}
    assert torch.get_num_threads() == before  # per thread: the caller's is unchanged


@pytest.mark.parametrize("made, after", [(1, 1), (2, 1)])
def test_the_serving_loop_thread_keeps_its_creators_thread_count(micro_zoo, made, after):
    """The loop's steps run on the count of the thread that made it, also when that
    thread sets another afterwards: PyTorch (and the CPU attention kernel's library, at
    its first parallel op in the loop's thread) would otherwise take the count last set
    anywhere."""
    from osd.drafters.draft_model import DraftModelDrafter
    from osd.models import load_model, load_tokenizer
    from osd.serving import ServeRequest, ServingLoop
    from osd.specdec.engine import SpeculativeDecoder

    target = load_model(str(micro_zoo / "target"), "cpu")
    draft = load_model(str(micro_zoo / "draft"), "cpu")
    decoder = SpeculativeDecoder(
        target, DraftModelDrafter(draft, k=2), load_tokenizer(str(micro_zoo / "target"))
    )
    seen, done = [], threading.Event()
    orig = decoder.step_batch

    def step_batch(*a, **k):
        seen.append(torch.get_num_threads())
        return orig(*a, **k)

    decoder.step_batch = step_batch
    before = torch.get_num_threads()
    torch.set_num_threads(made)
    try:
        loop = ServingLoop(decoder, max_batch=2).start()
        torch.set_num_threads(after)
        try:
            for i in range(2):
                done.clear()
                loop.submit(ServeRequest(f"r{i}", [1, 2, 3], 6), lambda d: d.final and done.set())
                assert done.wait(60)
        finally:
            loop.stop()
    finally:
        torch.set_num_threads(before)
    assert len(seen) >= 4 and set(seen) == {made}


def test_importing_osd_sets_a_bounded_spin_and_keeps_the_users_choice():
    code = "import os, osd; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == threads.SPIN_COUNT
    env["GOMP_SPINCOUNT"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "0"


def test_a_compute_thread_keeps_its_count_when_another_thread_sets_one_later():
    """PyTorch sets a thread's count at its first parallel op from the count last set
    anywhere; compute() must not be undone by a side() that runs before that op."""
    ready, go, seen = threading.Event(), threading.Event(), []

    def loop() -> None:
        threads.compute(2)
        ready.set()
        go.wait()
        torch.ones(1 << 20).sum()  # the first parallel op of this thread
        seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    t = threading.Thread(target=loop)
    t.start()
    ready.wait()
    try:
        threads.side()  # another thread (the main one) drops to one afterwards
    finally:
        go.set()
        t.join()
        torch.set_num_threads(before)
    assert seen == [2]
