"""The capacity model of docs/capacity.md against its discrete-event simulation
(experiments/capacity_sim.py): they agree where the model's assumptions hold."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
from capacity_sim import (
    BroadcastCase,
    IngestCase,
    predict_broadcast,
    predict_ingest,
    simulate_broadcast,
    simulate_shard,
)

C = (40e-6, 15e-6)  # Redis CPU per XADD, per record read + acked


@pytest.mark.parametrize(
    "case, bound",
    [
        (IngestCase("light", 64, 1, 8, 2.0, *C, step_s=0.3), "offered load"),
        (IngestCase("trainer-bound", 512, 1, 4, 2.0, *C, step_s=0.3, maxlen=2000), "trainers"),
        (IngestCase("sharded", 2048, 4, 256, 2.0, *C, step_s=0.3), "offered load"),
    ],
)
def test_ingest_model_matches_simulation(case, bound):
    p, s = predict_ingest(case), simulate_shard(case, seed=1)
    assert p["bound"] == bound
    assert s["consumed_per_s"] == pytest.approx(p["consumed_per_s"], rel=0.05)
    assert s["trimmed"] == pytest.approx(p["trimmed"], abs=0.03)
    assert s["redis_util"] == pytest.approx(p["redis_util"], rel=0.1, abs=0.005)
    if bound == "trainers":  # a consumed record waited for a full stream to drain
        assert s["age_s"] == pytest.approx(p["age_s"], rel=0.1)


def test_past_saturation_the_model_is_an_upper_bound():
    """A saturated Redis: the sinks hold what it cannot write, and the trainers' reads queue
    behind one write per replica, so they fall behind too and the stream trims records.
    The model (ceiling 1/c) is then optimistic: plan shards for utilisation well below 1."""
    case = IngestCase("hot", 4096, 1, 256, 8.0, *C, step_s=0.05)
    p, s = predict_ingest(case), simulate_shard(case, seconds=6, seed=1)
    assert p["bound"] == "redis" and s["redis_util"] > 0.99
    assert s["unwritten"] > 0.2 and s["trimmed"] > 0.1
    assert s["consumed_per_s"] < p["consumed_per_s"]


@pytest.mark.parametrize("replicas", [16, 1024, 4096])
def test_broadcast_lag_model_matches_simulation(replicas):
    case = BroadcastCase("draft", replicas, 6_000_000, 1.25e9, 0.4, 0.02, 0.03)
    p, s = predict_broadcast(case), simulate_broadcast(case, seed=1)
    assert s["lag_last_s"] == pytest.approx(p["lag_last_s"], rel=0.1)
    assert s["lag_p50_s"] <= s["lag_last_s"]
