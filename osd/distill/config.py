"""How a drafter is distilled online: the one :class:`DistillConfig` (DESIGN §4).

Every place that trains — :class:`~osd.distill.trainer.OnlineDistiller`, the trainer actors
(``trainer.distill`` in a cluster config, ``deploy/*.yaml``), ``osd online``
(``OnlineConfig.distill``) — takes this dataclass, nested, with these defaults.

>>> DistillConfig(lora=True).learning_rate, DistillConfig().learning_rate
(0.001, 0.0003)
>>> DistillConfig(lora=True).lora_spec(base_version=2).base_version
2
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from osd.distill.lora import DEFAULT_LORA_TARGETS, LoraSpec
from osd.distill.losses import LOSS_NAMES

__all__ = ["DEFAULT_LR_FULL", "DEFAULT_LR_LORA", "DecisionDistillConfig", "DistillConfig"]

DEFAULT_LR_FULL = 3e-4
DEFAULT_LR_LORA = 1e-3


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def _nonneg(value: object) -> bool:
    return (value == 0 and not isinstance(value, bool)) or _positive(value)


def _pos_int(value: object, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


@dataclass(frozen=True)
class DistillConfig:
    """How the draft is distilled online. ``None`` where allowed means "off" / "default"."""

    loss: str = "fkl"  # one of LOSS_NAMES: fkl, rkl, jsd, tvd, ce
    beta: float = 0.5  # jsd only: β·KL(q||μ) + (1 − β)·KL(p||μ)
    lr: float | None = None  # None: 3e-4 for full fine-tune, 1e-3 for LoRA
    weight_decay: float = 0.0
    batch_records: int = 8  # records per optimiser step
    max_len: int | None = None  # None: the student's own context (e.g. max_position_embeddings)
    grad_clip: float | None = 1.0  # max grad norm; None: no clipping
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    publish_every_steps: int | None = 16  # M
    publish_every_s: float | None = 30.0  # T; either M or T triggers a publish
    max_steps_per_s: float | None = None  # compute budget; None: unlimited
    # spare compute only: a trainer that shares its node with replicas waits while the other
    # processes use more than this fraction of the node's CPUs (osd.distill.budget), at most
    # yield_max_s before each step; None (default): never waits — a trainer on devices of
    # its own, or one whose learning must not depend on how busy the node is
    yield_cpu: float | None = None
    yield_max_s: float = 2.0
    reclaim_idle_ms: int = 60_000  # XAUTOCLAIM threshold: well above one step's duration
    # rehearsal, against forgetting a domain the traffic leaves and comes back to: each step
    # adds this many records drawn from a uniform reservoir of the ones trained on before
    # (replay_size of them, kept in memory); 0 (default): off
    replay: int = 0
    replay_size: int = 1024

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

        need(self.loss in LOSS_NAMES, "loss", f"one of {LOSS_NAMES}")
        need(_positive(self.beta) and self.beta < 1, "beta", "in (0, 1) (the jsd mixture weight)")
        need(self.lr is None or _positive(self.lr), "lr", "finite and > 0 (None: the default)")
        need(_nonneg(self.weight_decay), "weight_decay", "finite and >= 0")
        need(_pos_int(self.batch_records), "batch_records", "an int >= 1")
        need(self.max_len is None or _pos_int(self.max_len, 2), "max_len", "an int >= 2 or None")
        need(self.grad_clip is None or _positive(self.grad_clip), "grad_clip", "> 0 or None")
        need(isinstance(self.lora, bool), "lora", "true or false")
        spec = self.lora_spec()  # checks lora_r, lora_alpha, lora_dropout, lora_target_modules
        object.__setattr__(self, "lora_target_modules", spec.target_modules)
        every_steps, every_s = self.publish_every_steps, self.publish_every_s
        need(every_steps is None or _pos_int(every_steps), "publish_every_steps", "an int >= 1")
        need(every_s is None or _positive(every_s), "publish_every_s", "> 0 or None")
        if every_steps is None and every_s is None:
            raise ValueError(
                "publish_every_steps and publish_every_s are both None: nothing would ever be "
                "published; set at least one"
            )
        limit = self.max_steps_per_s
        need(limit is None or _positive(limit), "max_steps_per_s", "> 0 or None (unlimited)")
        need(_pos_int(self.reclaim_idle_ms, 0), "reclaim_idle_ms", "an int >= 0")
        share = self.yield_cpu
        need(share is None or (_positive(share) and share <= 1), "yield_cpu", "in (0, 1] or None")
        need(_positive(self.yield_max_s), "yield_max_s", "> 0")
        need(_pos_int(self.replay, 0), "replay", "an int >= 0 (0: no rehearsal)")
        need(_pos_int(self.replay_size), "replay_size", "an int >= 1")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the default for the mode (LoRA adapters take a ~10× higher rate)."""
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR_LORA if self.lora else DEFAULT_LR_FULL

    def lora_spec(self, base_version: int = 0) -> LoraSpec:
        """The adapters' :class:`LoraSpec`, on top of registry version ``base_version``."""
        return LoraSpec(
            r=self.lora_r,
            alpha=self.lora_alpha,
            target_modules=self.lora_target_modules,
            dropout=self.lora_dropout,
            base_version=base_version,
        )


@dataclass(frozen=True)
class DecisionDistillConfig(DistillConfig):
    """How the early-stop decision model (:mod:`osd.distill.decision`) is trained: the same
    fields, defaults for a 4 → 16 → 1 MLP that starts from an optimistic prior and learns
    at a far larger rate than a draft (``trainer.decision`` in a cluster config,
    ``OnlineConfig.decision``).

    >>> DecisionDistillConfig().learning_rate, DecisionDistillConfig(lr=0.1).batch_records
    (0.03, 8)
    """

    lr: float | None = 3e-2
