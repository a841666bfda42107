"""The topology of an OSD deployment: models, buffer, registry, replicas, trainers.

One :class:`ClusterConfig` describes everything ``osd serve``, ``osd launch`` and
``osd demo`` start; ``deploy/local.yaml`` is its YAML form (every key optional)::

    target: zoo:target
    draft: zoo:draft
    buffer: {url: null, log_mode: all}      # null: $REDIS_URL, else a private redis-server
    serve: {replicas: 1, num_cpus: 1, port: 8000, max_batch: 32}
    trainer: {count: 1, num_cpus: 0.5, distill: {loss: fkl, lr: null}}

Unknown keys are errors (a typo must not silently fall back to a default). How trainers
distil is ``trainer.distill``: an :class:`osd.distill.config.DistillConfig`, the one
definition (and defaults) that ``osd online`` uses too. The config travels to the actors
as a plain dict (:meth:`ClusterConfig.to_dict`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from osd.distill.config import DecisionDistillConfig, DistillConfig

__all__ = [
    "REGISTRY_ACTOR",
    "BufferConfig",
    "ClusterConfig",
    "RegistryConfig",
    "ServeConfig",
    "TrainerConfig",
    "load_config",
    "runtime_env",
]

REGISTRY_ACTOR = "osd-registry"
TRAINER_ACTOR = "osd-trainer-{}"
SERVE_APP = "osd"


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _resources(v: Any, where: str) -> None:
    """Custom Ray resources: names to amounts > 0 (CPU and GPU have keys of their own)."""
    _need(isinstance(v, dict), f"{where} must be a mapping of resource name to amount")
    for name, amount in v.items():
        _need(isinstance(name, str) and bool(name), f"{where}: names must be strings")
        _need(
            name not in ("CPU", "GPU"),
            f"{where}: {name} is set by num_cpus / num_gpus, not in resources",
        )
        _need(_num(amount) and amount > 0, f"{where}.{name} must be a number > 0")


@dataclass
class BufferConfig:
    """The Redis stream buffer and what replicas log into it."""

    url: str | None = None  # redis://[:password@]host:port/db; None: $REDIS_URL, else embedded
    maxlen: int = 10_000  # stream bound (XADD MAXLEN ~)
    log_mode: str = "all"  # all | rejected (OSD)
    topk: int = 16  # target top-k logged per position
    log_rate: float = 1.0  # fraction of requests logged
    holdout_every: int = 8  # 1 record in N goes to the gate's held-out stream
    # which ones: a hash of (holdout_seed, request id), not arrival order (a client cannot
    # aim its requests at the held-out set or away from it)
    holdout_seed: int = 0
    # no API key's records may exceed this share of the records admitted over the last
    # key_window records offered, while another key is active (1.0: no cap)
    key_max_share: float = 0.5
    key_window: int = 512
    # the embedded Redis's append-only file: None = $OSD_REDIS_DIR, else a private temp dir
    # (survives Redis restarts, removed at shutdown); a directory keeps it across launches
    data_dir: str | None = None
    # always: a write Redis acknowledged is on disk (survives a crash of Redis or of the
    # machine; ~3 ms a write here); everysec: 10× cheaper, may lose the last second on a crash
    appendfsync: str = "always"

    def validate(self) -> None:
        _need(self.url is None or isinstance(self.url, str), "buffer.url must be a string")
        _need(self.data_dir is None or isinstance(self.data_dir, str), "buffer.data_dir: a path")
        _need(
            self.appendfsync in ("always", "everysec", "no"),
            "buffer.appendfsync must be always, everysec or no",
        )
        _need(_int(self.maxlen, 1), f"buffer.maxlen must be an int >= 1, got {self.maxlen!r}")
        _need(self.log_mode in ("all", "rejected"), "buffer.log_mode must be all or rejected")
        _need(_int(self.topk, 1), f"buffer.topk must be an int >= 1, got {self.topk!r}")
        _need(_num(self.log_rate) and 0 <= self.log_rate <= 1, "buffer.log_rate must be in [0, 1]")
        _need(_int(self.holdout_every, 2), "buffer.holdout_every must be an int >= 2")
        _need(_int(self.holdout_seed, 0), "buffer.holdout_seed must be an int >= 0")
        _need(
            _num(self.key_max_share) and 0 < self.key_max_share <= 1,
            "buffer.key_max_share must be in (0, 1]",
        )
        _need(_int(self.key_window, 1), "buffer.key_window must be an int >= 1")


@dataclass
class RegistryConfig:
    """Where versions persist, the promotion gate, and how replicas learn of versions."""

    store: str = "redis"  # "redis" (the buffer's Redis) or a directory (DiskStore)
    gate_margin: float = 0.01  # promote iff candidate >= live - margin
    gate_min_records: int = 1
    holdout_size: int = 32  # recent held-out records the gate evaluates on
    poll_s: float = 0.2  # replicas poll the live version this often (a dict lookup)
    num_cpus: float = 0.25
    # post-swap watch: roll back a new live version whose acceptance on live traffic falls
    # more than this (absolute α) below its predecessor's; null turns the watch off
    watch_margin: float | None = 0.05
    watch_min_tokens: int = 512  # draft tokens of live traffic per version before judging
    maintain_s: float = 1.0  # the registry checks its store (epoch) and the watch this often
    # the store keeps the newest N versions (and always the base, live, rollback target and
    # the bases of kept LoRA versions); older ones are deleted, weights and entry (a soak
    # found Redis growing by every published version); null keeps all
    keep_versions: int | None = 32

    def validate(self) -> None:
        _need(isinstance(self.store, str) and bool(self.store), "registry.store must be set")
        _need(_num(self.gate_margin), "registry.gate_margin must be a number")
        _need(_int(self.gate_min_records, 1), "registry.gate_min_records must be an int >= 1")
        _need(_int(self.holdout_size, 1), "registry.holdout_size must be an int >= 1")
        _need(_num(self.poll_s) and self.poll_s > 0, "registry.poll_s must be > 0")
        _need(_num(self.num_cpus) and self.num_cpus >= 0, "registry.num_cpus must be >= 0")
        _need(
            self.watch_margin is None or (_num(self.watch_margin) and 0 <= self.watch_margin < 1),
            "registry.watch_margin must be in [0, 1) or null",
        )
        _need(_int(self.watch_min_tokens, 1), "registry.watch_min_tokens must be an int >= 1")
        _need(_num(self.maintain_s) and self.maintain_s > 0, "registry.maintain_s must be > 0")
        _need(
            self.keep_versions is None or _int(self.keep_versions, 2),
            "registry.keep_versions must be an int >= 2 or null",
        )


@dataclass
class ServeConfig:
    """Ray Serve replicas, their HTTP endpoint, how they batch and the drafter's options."""

    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # fractional: several replicas (and trainers) share a GPU
    drafter_options: dict[str, Any] = field(default_factory=dict)  # e.g. {tree: "4,2,2"}
    max_batch: int = 32  # sequences stepped together per replica (continuous batching)
    load_aware: bool = False  # the controller picks the draft depth per step (0 = off) by load
    max_ongoing_requests: int = 32  # per replica; more wait in Serve's queue
    threads: int = 1  # torch intra-op threads per replica (1 on small CPUs)
    # Bearer keys for /v1/* (and /metrics with metrics_auth); empty: $OSD_API_KEY (commas
    # separate several), else no authentication
    api_keys: list[str] = field(default_factory=list)
    metrics_auth: bool = False
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    body_timeout_s: float = 10.0  # a body not complete by then gets 408
    max_json_depth: int = 32
    max_prompt_chars: int | None = None  # None: context × the longest token's characters
    # custom Ray resources each replica asks for, e.g. {osd_replica: 1}: replicas go only
    # to nodes that offer them (one per node when each offers 1)
    resources: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        _need(isinstance(self.host, str) and bool(self.host), "serve.host must be set")
        _resources(self.resources, "serve.resources")
        _need(_int(self.port, 1) and self.port < 65536, f"serve.port invalid: {self.port!r}")
        _need(_int(self.replicas, 1), "serve.replicas must be an int >= 1")
        _need(_num(self.num_cpus) and self.num_cpus >= 0, "serve.num_cpus must be >= 0")
        _need(_num(self.num_gpus) and self.num_gpus >= 0, "serve.num_gpus must be >= 0")
        _need(
            isinstance(self.drafter_options, dict),
            f"serve.drafter_options must be a mapping, got {self.drafter_options!r}",
        )
        _need(_int(self.max_batch, 1), "serve.max_batch must be an int >= 1")
        _need(isinstance(self.load_aware, bool), "serve.load_aware must be true or false")
        _need(_int(self.max_ongoing_requests, 1), "serve.max_ongoing_requests must be >= 1")
        _need(_int(self.threads, 1), "serve.threads must be an int >= 1")
        _need(
            isinstance(self.api_keys, list)
            and all(isinstance(k, str) and k.strip() == k and k for k in self.api_keys),
            "serve.api_keys must be a list of non-empty strings without spaces",
        )
        _need(isinstance(self.metrics_auth, bool), "serve.metrics_auth must be true or false")
        _need(_int(self.max_body_bytes, 1024), "serve.max_body_bytes must be an int >= 1024")
        _need(_num(self.body_timeout_s) and self.body_timeout_s > 0, "serve.body_timeout_s > 0")
        _need(_int(self.max_json_depth, 4), "serve.max_json_depth must be an int >= 4")
        _need(
            self.max_prompt_chars is None or _int(self.max_prompt_chars, 1),
            "serve.max_prompt_chars must be an int >= 1 or null",
        )

    @property
    def keys(self) -> list[str]:
        """The API keys in force: ``api_keys``, else ``$OSD_API_KEY`` (comma-separated)."""
        if self.api_keys:
            return list(self.api_keys)
        return [k.strip() for k in os.environ.get("OSD_API_KEY", "").split(",") if k.strip()]

    def drafter_config(self, drafter: str, k: int) -> dict[str, Any]:
        """The options a replica passes to ``osd.drafters.build_drafter(drafter, ...)``: the
        topology's draft length ``k`` where the drafter takes one, then ``drafter_options``
        (which win). Raises ``ValueError`` for an option the drafter does not take."""
        from osd.drafters import drafter_spec

        allowed = drafter_spec(drafter).options()
        bad = sorted(set(self.drafter_options) - set(allowed))
        if bad:
            raise ValueError(
                f"serve.drafter_options: drafter {drafter!r} takes no option {bad[0]!r}; it "
                f"takes: {', '.join(allowed) or 'nothing'}"
            )
        config = {"k": k} if "k" in allowed else {}
        return {**config, **self.drafter_options}


@dataclass
class TrainerConfig:
    """Trainer actors (consumers of one group on the buffer): their resources, and how they
    distil (``distill``; it validates itself with its own messages)."""

    count: int = 1  # 0: serve without online learning
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    threads: int = 1
    # the training threads' nice value (0 normal … 19 lowest): at 19 the OS runs them only on
    # cycles the replicas of the node leave (spare compute; osd.distill.budget)
    nice: int = 19
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources, per actor
    distill: DistillConfig = field(default_factory=DistillConfig)
    # the drafter's early-stop decision model, when it has one (serve.drafter_options)
    decision: DecisionDistillConfig = field(default_factory=DecisionDistillConfig)

    def validate(self) -> None:
        _need(_int(self.count, 0), "trainer.count must be an int >= 0")
        _resources(self.resources, "trainer.resources")
        _need(_num(self.num_cpus) and self.num_cpus >= 0, "trainer.num_cpus must be >= 0")
        _need(_num(self.num_gpus) and self.num_gpus >= 0, "trainer.num_gpus must be >= 0")
        _need(_int(self.threads, 1), "trainer.threads must be an int >= 1")
        _need(_int(self.nice, 0) and self.nice <= 19, "trainer.nice must be an int in 0..19")
        _need(isinstance(self.distill, DistillConfig), "trainer.distill must be a mapping")
        _need(isinstance(self.decision, DistillConfig), "trainer.decision must be a mapping")


_SECTIONS = {
    "buffer": BufferConfig,
    "registry": RegistryConfig,
    "serve": ServeConfig,
    "trainer": TrainerConfig,
}
_NESTED = {  # sub-sections, parsed the same way
    (TrainerConfig, "distill"): DistillConfig,
    (TrainerConfig, "decision"): DecisionDistillConfig,
}


def _section(cls: type, value: Any, where: str) -> Any:
    """``cls`` from a YAML mapping (or an instance), unknown keys named as errors."""
    if isinstance(value, cls):
        return value
    value = value or {}
    _need(isinstance(value, dict), f"{where} must be a mapping, got {type(value).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(value) - fields)
    moved = cls is TrainerConfig and set(bad) <= {f.name for f in dataclasses.fields(DistillConfig)}
    hint = "; distillation settings go under trainer.distill" if bad and moved else ""
    _need(not bad, f"unknown keys in {where}: {bad}; known: {sorted(fields)}{hint}")
    kwargs = {}
    for key, v in value.items():
        nested = _NESTED.get((cls, key))
        kwargs[key] = v if nested is None else _section(nested, v, f"{where}.{key}")
    return cls(**kwargs)


@dataclass
class ClusterConfig:
    """The whole topology; see the module docstring."""

    model_name: str = "osd"  # the id clients pass as ``model``
    target: str = "zoo:target"
    draft: str = "zoo:draft"
    drafter: str = "draft_model"  # what replicas serve and trainers train: osd.drafters.DRAFTERS
    drafter_id: str = "draft"
    k: int = 4  # draft length (chain)
    namespace: str = "osd"  # Ray namespace of the named actors
    buffer: BufferConfig = field(default_factory=BufferConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self) -> ClusterConfig:
        from osd.registry import check_drafter_id

        for name in ("model_name", "target", "draft", "namespace"):
            value = getattr(self, name)
            _need(isinstance(value, str) and bool(value), f"{name} must be a non-empty string")
        check_drafter_id(self.drafter_id)
        from osd.drafters import drafter_spec

        spec = drafter_spec(self.drafter)  # raises, listing the drafters
        _need(
            spec.trainable or self.trainer.count == 0,
            f"drafter {self.drafter!r} has nothing to train; set trainer.count: 0",
        )
        _need(_int(self.k, 1), f"k must be an int >= 1, got {self.k!r}")
        for name in _SECTIONS:
            getattr(self, name).validate()
        self.serve.drafter_config(self.drafter, self.k)  # options the drafter does not take
        return self

    @property
    def redis_url(self) -> str | None:
        return self.buffer.url or os.environ.get("REDIS_URL") or None

    @property
    def trainer_names(self) -> list[str]:
        return [TRAINER_ACTOR.format(i) for i in range(self.trainer.count)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any] | None) -> ClusterConfig:
        doc = dict(doc or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - known)
        _need(not unknown, f"unknown config keys {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in doc.items():
            section = _SECTIONS.get(key)
            kwargs[key] = value if section is None else _section(section, value, key)
        return cls(**kwargs).validate()


def runtime_env() -> dict[str, Any]:
    """The Ray ``runtime_env`` of replicas and actors: what they need from this process's
    environment (zoo location, offline Hub, one OpenMP thread on small CPUs)."""
    env = {
        "OSD_ZOO_DIR": os.environ.get("OSD_ZOO_DIR"),
        "OSD_DATA_DIR": os.environ.get("OSD_DATA_DIR"),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    return {"env_vars": {k: v for k, v in env.items() if v is not None}}


def load_config(path: str | os.PathLike[str] | None, **overrides: Any) -> ClusterConfig:
    """Read a YAML topology (``None``: the defaults) and apply dotted overrides,
    e.g. ``load_config("deploy/local.yaml", **{"serve.port": 8001})``."""
    doc: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        _need(isinstance(loaded, dict), f"{p} must hold a mapping at the top level")
        doc = loaded
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = doc
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return ClusterConfig.from_dict(doc)
