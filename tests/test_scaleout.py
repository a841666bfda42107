"""Scale-out (issue 15, point 3): the `osd serve` topology on a simulated 3-node Ray cluster.

``ray.cluster_utils.Cluster`` starts a head and two worker nodes in this machine (a raylet
each). The worker nodes offer one ``osd_replica`` and one ``osd_trainer`` slot each, and
the topology asks for them (``serve.resources``, ``trainer.resources``), so Ray places the
two Serve replicas on different nodes and the two trainers on different nodes; the
registry actor, Serve's controller and proxy and the driver stay on the head; Redis is
one private redis-server every node reaches (its Unix socket; in production, ``REDIS_URL``).

The test drives requests through the one HTTP entry point, lets both trainers publish and
the registry promote, and checks that replicas on different nodes end up serving the same
``(epoch, version, checksum)`` as the registry's live version — and still answer.
"""

from __future__ import annotations

import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.integration

PROMPTS = [
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
    "-- Database: shop (orders, customers)\n-- Question: How many orders are there?\n",
    "Question: A train travels 60 miles in 2 hours. What is its speed?\nAnswer:",
    "-- Database: school (students)\n-- Question: List the names of all students.\n",
    "Instruction: name three colours\nOutput:",
    "Question: What is 12 times 4?\nAnswer:",
]
N_REQUESTS = 24
MAX_TOKENS = 16
WORKER = {"osd_replica": 1, "osd_trainer": 1}  # one replica and one trainer per worker node


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout_s: float, what) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out: {what() if callable(what) else what}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def topology():
    import ray
    from osd.actors.cluster import launch
    from osd.actors.config import ClusterConfig
    from ray.cluster_utils import Cluster

    from osd.buffer import EmbeddedRedis

    assert not ray.is_initialized(), "another test left Ray running in this process"
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    workers = [nodes.add_node(num_cpus=2, resources=WORKER) for _ in range(2)]
    nodes.wait_for_nodes()
    redis_server = EmbeddedRedis(password=secrets.token_urlsafe(16)).start()
    cfg = ClusterConfig.from_dict(
        {
            "buffer": {"url": redis_server.url, "holdout_every": 3},
            "registry": {"poll_s": 0.1, "gate_margin": 0.05, "watch_margin": None},
            "serve": {
                "port": free_port(),
                "replicas": 2,
                "num_cpus": 0.5,
                "resources": {"osd_replica": 1},
                "max_batch": 4,
            },
            "trainer": {
                "count": 2,
                "num_cpus": 0.5,
                "resources": {"osd_trainer": 1},
                "distill": {
                    "lr": 1e-3,
                    "batch_records": 2,
                    "publish_every_steps": 2,
                    "publish_every_s": 5.0,
                },
            },
        }
    )
    cluster = None
    try:
        cluster = launch(cfg, address=nodes.address)
        yield cluster, nodes, workers
    finally:
        if cluster is not None:
            cluster.shutdown()
        ray.shutdown()
        nodes.shutdown()
        redis_server.stop()


def complete(url: str, prompt: str) -> dict:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def replicas_seen(url: str, want: int = 2, tries: int = 60) -> dict[str, dict]:
    """``/v1/osd/stats`` of each replica (the proxy picks one per request: ask until every
    replica has answered)."""
    seen: dict[str, dict] = {}
    for _ in range(tries):
        stats = httpx.get(f"{url}/v1/osd/stats", timeout=30).json()
        seen[stats["replica"]] = stats
        if len(seen) >= want:
            break
    return seen


def actor_nodes(class_prefix: str) -> dict[str, str]:
    """Ray actor name → node id of the live actors whose class name starts with the prefix."""
    from ray.util.state import list_actors

    rows = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    return {a.name: a.node_id for a in rows if a.class_name.startswith(class_prefix)}


def test_replicas_on_different_nodes_adopt_the_same_version(topology):
    import ray

    cluster, nodes, workers = topology
    worker_ids = {w.node_id for w in workers}

    # placement: one replica per worker node, one trainer per worker node
    replicas = actor_nodes("ServeReplica")
    assert len(replicas) == 2 and set(replicas.values()) == worker_ids, replicas
    trainers = actor_nodes("TrainerActor")
    assert len(trainers) == 2 and set(trainers.values()) == worker_ids, trainers
    registry_node = actor_nodes("RegistryActor")
    assert list(registry_node.values()) == [nodes.head_node.node_id], registry_node

    # traffic through the one entry point; both trainers learn from it and publish
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(N_REQUESTS)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: complete(cluster.url, p), prompts))
    assert all(a["usage"]["completion_tokens"] > 0 for a in answers)
    wait_for(
        lambda: all(s["publishes"] >= 1 for s in cluster.trainer_stats()),
        120,
        lambda: cluster.trainer_stats(),
    )
    wait_for(
        lambda: cluster.report()["live_version"] >= 1, 60, lambda: cluster.report()["decisions"]
    )
    report = cluster.report()
    publishers = {v["provenance"].get("trainer") for v in report["versions"] if v["version"] > 0}
    assert publishers == set(cluster.cfg.trainer_names), publishers

    # settle: no more publishes, then both replicas serve the registry's live ref
    ray.get([t.set_publishing.remote(False) for t in cluster.trainers])
    time.sleep(1.0)  # a publish already in flight lands
    live = ray.get(cluster.registry.poll.remote(cluster.cfg.drafter_id, None))
    ref = {k: live[k] for k in ("epoch", "version", "checksum")}
    assert ref["version"] >= 1

    def both_serve_live() -> bool:
        seen = replicas_seen(cluster.url)
        return len(seen) == 2 and all(s["serving"] == ref for s in seen.values())

    wait_for(both_serve_live, 60, lambda: (ref, replicas_seen(cluster.url)))
    before = replicas_seen(cluster.url)
    assert set(before) == {name.rsplit("#", 1)[-1] for name in replicas}  # the placed ones
    adopted = {(a["replica"], a["version"]) for a in cluster.report()["adoptions"]}
    assert {(r, ref["version"]) for r in before} <= adopted, adopted

    # and they still serve, with that version, on both nodes
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda p: complete(cluster.url, p), PROMPTS * 2))
    assert {a["osd"]["drafter_version"] for a in answers} == {ref["version"]}
    after = replicas_seen(cluster.url)
    served = {r: after[r]["finished"] - before[r]["finished"] for r in before}
    assert sum(served.values()) >= len(answers) and all(n > 0 for n in served.values()), served
    assert all(after[r]["failed"] == before[r]["failed"] for r in before), after
    assert all(after[r]["serving"] == ref for r in before), after
