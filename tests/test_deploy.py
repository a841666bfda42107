"""deploy/: the `ray up` config passes Ray's own validator; manifests have what they need."""

import copy
import importlib
import re
import time
from pathlib import Path

import pytest
import yaml
from osd.actors.config import ClusterConfig, load_config

DEPLOY = Path(__file__).parent.parent / "deploy"


def load(name: str):
    return yaml.safe_load((DEPLOY / name).read_text())


# ---- ray up ----------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))  # raises on any schema error


def test_ray_validator_catches_a_broken_config():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("cluster.yaml")
    config["available_node_types"]["gpu_worker"]["min_workers"] = "one"
    with pytest.raises(ValidationError):
        validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_has_gpu_workers_and_installs_the_package():
    config = load("cluster.yaml")
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    assert any(n.get("resources", {}).get("GPU", 0) >= 1 for n in nodes.values())
    assert any("pip install" in c and "/home/ubuntu/osd" in c for c in config["setup_commands"])
    assert "/home/ubuntu/osd" in config["file_mounts"]
    head = " ".join(config["head_setup_commands"] + config["head_start_ray_commands"])
    assert "redis.conf" in head and "redis_password" in head
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])


# ---- redis.conf ------------------------------------------------------------------------------


def test_redis_conf_persists_and_requires_a_password():
    lines = {
        ln.split()[0]: ln.split(None, 1)[1]
        for ln in (DEPLOY / "redis.conf").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    assert lines["appendonly"] == "yes" and lines["appendfsync"] == "everysec"
    assert lines["requirepass"] and lines["maxmemory-policy"] == "noeviction"
    assert lines["port"] != "6379"  # Ray's GCS port on the head node


def test_redis_conf_runs_a_real_server(tmp_path):
    """redis-server accepts the file; the password is required and AOF is on."""
    import subprocess

    import redis

    from osd.buffer import find_redis_server

    try:
        exe = find_redis_server()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    conf = (DEPLOY / "redis.conf").read_text()
    conf = re.sub(r"(?m)^port .*$", "port 0", conf)  # no TCP in a test: a Unix socket
    conf = re.sub(r"(?m)^requirepass .*$", "requirepass test-pw", conf)
    conf += f'\ndir "{tmp_path}"\nunixsocket "{tmp_path}/r.sock"\n'
    (tmp_path / "r.conf").write_text(conf)
    proc = subprocess.Popen(
        [exe, str(tmp_path / "r.conf")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        sock = str(tmp_path / "r.sock")
        deadline = time.monotonic() + 10
        while not Path(sock).exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(unix_socket_path=sock).ping()
        client = redis.Redis(unix_socket_path=sock, password="test-pw")
        assert client.ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    finally:
        proc.terminate()
        proc.wait(10)


# ---- KubeRay ---------------------------------------------------------------------------------


def kube_docs():
    return {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "rayservice.yaml").read_text())}


def test_rayservice_has_the_required_fields():
    rs = kube_docs()["RayService"]
    assert rs["apiVersion"] == "ray.io/v1" and rs["metadata"]["name"]
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"]
    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"][0]["image"]
    assert cluster["workerGroupSpecs"], "no worker groups"
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] and container["resources"]["limits"]["nvidia.com/gpu"]
    for container in [head["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]
    ]:
        env = {e["name"]: e for e in container["env"]}
        assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "osd-redis"


def test_rayservice_serve_config_points_at_a_real_app_builder():
    rs = kube_docs()["RayService"]
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    app = serve_cfg["applications"][0]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    cfg = ClusterConfig.from_dict(app["args"])  # a valid topology
    assert cfg.serve.port == serve_cfg["http_options"]["port"]
    assert rs["spec"]["rayClusterConfig"]["rayVersion"].split(".")[0] == "2"


def test_redis_statefulset_and_service_match():
    docs = kube_docs()
    sts, svc = docs["StatefulSet"], docs["Service"]
    assert sts["spec"]["volumeClaimTemplates"], "Redis data must be on a persistent volume"
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert "$(REDIS_PASSWORD)" in container["args"]
    port = container["ports"][0]["containerPort"]
    assert svc["spec"]["ports"][0]["port"] == port == 6380
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]


def test_topologies_load():
    for name in ("local.yaml", "gpu.yaml"):
        load_config(DEPLOY / name)


def test_runbook_covers_each_file():
    text = (DEPLOY / "RUNBOOK.md").read_text()
    for name in ("local.yaml", "gpu.yaml", "cluster.yaml", "rayservice.yaml", "redis.conf"):
        assert name in text
