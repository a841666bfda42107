"""The topology config: defaults, YAML, overrides, and clear errors for bad values."""

from pathlib import Path

import pytest
from osd.actors.config import ClusterConfig, load_config, runtime_env

from osd.distill.config import DistillConfig

DEPLOY = Path(__file__).parent.parent / "deploy"


def test_local_yaml_is_the_default_topology():
    assert load_config(DEPLOY / "local.yaml") == ClusterConfig()


def test_gpu_yaml_packs_replicas_and_trainer_on_one_gpu():
    cfg = load_config(DEPLOY / "gpu.yaml")
    assert cfg.serve.replicas * cfg.serve.num_gpus + cfg.trainer.num_gpus <= 1.0
    assert cfg.trainer.distill.lora and cfg.trainer.num_gpus > 0


def test_round_trip_and_overrides(tmp_path):
    cfg = ClusterConfig.from_dict(
        {"k": 3, "serve": {"port": 8123}, "trainer": {"distill": {"loss": "jsd"}}}
    )
    assert ClusterConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.trainer.distill == DistillConfig(loss="jsd")  # the one set of defaults
    path = tmp_path / "t.yaml"
    path.write_text("serve:\n  replicas: 2\n")
    got = load_config(path, **{"serve.port": 9000, "trainer.count": 0, "buffer.url": None})
    assert got.serve.replicas == 2 and got.serve.port == 9000 and got.trainer.count == 0
    assert got.trainer_names == []
    assert ClusterConfig.from_dict({"trainer": {"count": 2}}).trainer_names == [
        "osd-trainer-0",
        "osd-trainer-1",
    ]


@pytest.mark.parametrize(
    "doc, words",
    [
        ({"targt": "x"}, "unknown config keys"),
        ({"serve": {"prot": 1}}, "unknown keys in serve"),
        ({"serve": {"port": 0}}, "serve.port"),
        ({"serve": {"replicas": 0}}, "serve.replicas"),
        ({"serve": 3}, "serve must be a mapping"),
        ({"trainer": {"distill": {"loss": "mse"}}}, "loss must be one of"),
        ({"trainer": {"distill": {"lr": -1}}}, "lr must be"),
        ({"trainer": {"distill": {"lrate": 1}}}, "unknown keys in trainer.distill: .'lrate'"),
        ({"trainer": {"distill": 3}}, "trainer.distill must be a mapping"),
        ({"trainer": {"nice": 20}}, "trainer.nice must be an int in 0..19"),
        ({"trainer": {"nice": -5}}, "trainer.nice must be an int in 0..19"),
        ({"trainer": {"lr": 1e-3}}, "distillation settings go under trainer.distill"),
        ({"buffer": {"log_mode": "some"}}, "log_mode"),
        ({"buffer": {"holdout_every": 1}}, "holdout_every"),
        ({"drafter_id": "bad id/"}, "drafter id"),
        ({"k": 0}, "k must be"),
        ({"serve": {"max_batch": 0}}, "serve.max_batch"),
        ({"serve": {"drafter_options": {"depth": 3}}}, "takes no option 'depth'; it takes: k"),
        ({"serve": {"drafter_options": "tree=4,2,2"}}, "drafter_options must be a mapping"),
    ],
)
def test_bad_config_says_what_is_wrong(doc, words):
    with pytest.raises(ValueError, match=words):
        ClusterConfig.from_dict(doc)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_redis_url_falls_back_to_env(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://:pw@h:6380/0")
    assert ClusterConfig().redis_url == "redis://:pw@h:6380/0"
    assert ClusterConfig.from_dict({"buffer": {"url": "redis://x"}}).redis_url == "redis://x"


def test_runtime_env_passes_the_zoo_and_one_thread(monkeypatch):
    monkeypatch.setenv("OSD_ZOO_DIR", "/zoo")
    env = runtime_env()["env_vars"]
    assert env["OSD_ZOO_DIR"] == "/zoo" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert "REDIS_URL" not in env  # secrets travel in the config, not in every env


def test_drafter_options_join_k_where_the_drafter_takes_it():
    cfg = ClusterConfig.from_dict({"serve": {"drafter_options": {"tree": "4,2,2"}}})
    assert cfg.serve.drafter_config(cfg.drafter, cfg.k) == {"k": 4, "tree": "4,2,2"}
    assert ClusterConfig().serve.drafter_config("none", 4) == {}  # "none" takes no k
    ngram = ClusterConfig.from_dict(
        {
            "drafter": "ngram",
            "trainer": {"count": 0},
            "serve": {"drafter_options": {"k": 2, "max_ngram": 2}},
        }
    )
    assert ngram.serve.drafter_config("ngram", 5) == {"k": 2, "max_ngram": 2}  # options win


def test_one_distill_config_with_one_set_of_defaults():
    from dataclasses import replace

    from osd.online import OnlineConfig

    assert ClusterConfig().trainer.distill == DistillConfig()
    assert load_config(DEPLOY / "local.yaml").trainer.distill == DistillConfig()
    # the replay publishes on steps only (deterministic); everything else is the same
    assert OnlineConfig().distill == replace(DistillConfig(), publish_every_s=None)
    assert DistillConfig().learning_rate == 3e-4 and DistillConfig().publish_every_steps == 16
