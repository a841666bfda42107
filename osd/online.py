"""The online loop in one process: serve → log → buffer → distil → gate → hot-swap.

``osd online`` replays a drift stream from :mod:`osd.workloads` through the whole loop,
each part the real component the Ray application wires (DESIGN §4): the speculative
decoder serves every request greedily with the **online** draft; a :class:`RecordCollector`
turns the verifier's logits into a distill record; the record goes through the Redis
stream buffer (an embedded ``redis-server`` unless ``$REDIS_URL`` is set); an
:class:`OnlineDistiller` trains a copy of the draft on the stream (a few optimiser steps
after each request: the "spare compute"); every M steps it publishes to the
:class:`Registry`, whose gate estimates acceptance on held-out recent records without a
target pass; promoted weights are loaded into the serving drafter between requests.

The **frozen** draft is measured on the same stream by replaying its greedy acceptance
against the served output (``osd.specdec.replay``: exact, and no target pass).

With ``drafter_options={"early_stop": THRESHOLD}`` (an autoregressive drafter) the early-stop
decision model goes through the same flow beside the drafter: the records carry its
features and labels, a second distiller (:class:`~osd.distill.decision.DecisionStudent`)
reads the drafter's stream through a consumer group of its own, and its versions are
published as ``draft-stop``, gated on the held-out labels' likelihood and loaded into the
serving drafter's decision model, which then serves the promoted versions only.
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from osd.distill.collect import RecordCollector
from osd.distill.config import DecisionDistillConfig, DistillConfig
from osd.distill.decision import DecisionStudent, decision_id
from osd.distill.record import LogConfig, LogMode, encode
from osd.distill.record import full_vocab_bytes_per_position as full_bytes
from osd.distill.student import Student
from osd.distill.trainer import OnlineDistiller
from osd.drafters import Drafter, build_drafter, build_student, drafter_spec
from osd.metrics import alpha_windows, pooled_alpha
from osd.registry import Promoter, PromotionGate, Registry
from osd.specdec.engine import DecodeStats, SpeculativeDecoder
from osd.specdec.replay import replay_greedy
from osd.workloads.schedule import parse_schedule

log = logging.getLogger(__name__)

DEFAULT_STREAM = "drift:instruct@100,math@350,sql"  # 100 instruct, 250 math, 250 sql
DRAFTER_ID = "draft"


# A replay publishes on trainer steps only (``publish_every_steps``), never on wall time, so
# the same stream gives the same versions on a fast or a slow machine.
REPLAY_DISTILL = DistillConfig(publish_every_s=None)
DECISION_DISTILL = DecisionDistillConfig(publish_every_s=None)  # the decision model's


@dataclass
class OnlineConfig:
    """The one-process loop: the stream, the drafter, and how it distils (``distill``, the
    same :class:`~osd.distill.config.DistillConfig` trainer actors take)."""

    drafter: str = "draft_model"  # a trainable drafter of osd.drafters.DRAFTERS
    drafter_options: dict = field(default_factory=dict)  # e.g. {"domains": "math,sql"}
    schedule: str = DEFAULT_STREAM
    n: int = 600
    seed: int = 0
    k: int = 4
    max_new_tokens: int = 48
    prompt_tokens: int = 128  # prompts are cut to their last N tokens
    distill: DistillConfig = REPLAY_DISTILL
    decision: DecisionDistillConfig = DECISION_DISTILL  # the early-stop model's, if any
    log_mode: str = "all"
    topk: int = 16
    log_rate: float = 1.0  # fraction of requests logged (by request id, as replicas do)
    steps_per_request: int = 2  # trainer steps after each request (the spare compute)
    holdout_every: int = 8  # every N-th record is held out for the gate, not trained on
    holdout_size: int = 32
    gate_margin: float = 0.01
    window: int = 50
    maxlen: int = 10_000  # buffer stream bound


@dataclass
class RequestLog:
    index: int
    domain: str
    version: int
    alpha_online: float
    alpha_frozen: float
    proposed_online: int
    accepted_online: int
    proposed_frozen: int
    accepted_frozen: int
    # target verification steps each needed for the same ``emitted`` tokens (τ = ÷)
    steps_online: int = 0
    steps_frozen: int = 0
    emitted: int = 0


@dataclass
class OnlineResult:
    config: OnlineConfig
    requests: list[RequestLog] = field(default_factory=list)
    versions: list[dict] = field(default_factory=list)
    decision_versions: list[dict] = field(default_factory=list)  # the early-stop model's
    bytes_per_position: float = 0.0
    full_vocab_bytes_per_position: int = 0
    trainer_steps: int = 0

    def windows(self) -> list[dict]:
        """α of the online and the frozen draft per window of ``config.window`` requests."""
        out = []
        for w in alpha_windows(self.requests, self.config.window, online_counts):
            out.append(
                {
                    "start": w.start,
                    "domain": w.domain,
                    "alpha_online": w.alpha or 0.0,
                    "alpha_frozen": pooled_alpha(w.rows, frozen_counts) or 0.0,
                    "version": w.rows[-1].version,
                }
            )
        return out

    def gain_by_domain(self, last: int = 100) -> dict[str, dict]:
        """Online − frozen α over each domain's last ``last`` requests."""
        out = {}
        for d in dict.fromkeys(r.domain for r in self.requests):
            rs = [r for r in self.requests if r.domain == d][-last:]
            on = pooled_alpha(rs, online_counts) or 0.0
            fr = pooled_alpha(rs, frozen_counts) or 0.0
            out[d] = {"gain": on - fr, "alpha_online": on, "alpha_frozen": fr, "requests": len(rs)}
        return out

    def to_json(self) -> dict:
        gains = self.gain_by_domain()
        return {
            "windows": self.windows(),
            "gain_by_domain": {d: g["gain"] for d, g in gains.items()},
            "by_domain": gains,
            "bytes_per_position": self.bytes_per_position,
            "full_vocab_bytes_per_position": self.full_vocab_bytes_per_position,
            "bytes_ratio": self.bytes_per_position / self.full_vocab_bytes_per_position,
            "loss": self.config.distill.loss,
            "lora": self.config.distill.lora,
            "versions": self.versions,
            "decision_versions": self.decision_versions,
            "trainer_steps": self.trainer_steps,
            "config": asdict(self.config),
        }


def online_counts(row: RequestLog) -> tuple[int, int]:
    """(accepted, proposed) of the online draft, for :func:`osd.metrics.pooled_alpha`."""
    return row.accepted_online, row.proposed_online


def frozen_counts(row: RequestLog) -> tuple[int, int]:
    """(accepted, proposed) of the frozen draft, for :func:`osd.metrics.pooled_alpha`."""
    return row.accepted_frozen, row.proposed_frozen


def run_online(
    target,
    draft,
    tokenizer,
    buffer,
    config: OnlineConfig | None = None,
    data_dir=None,
    registry: Registry | None = None,
    progress: Callable[[RequestLog, OnlineResult], None] | None = None,
) -> OnlineResult:
    """Replay ``config.schedule`` through the loop; ``buffer`` is a SampleBuffer."""
    cfg = config or OnlineConfig()
    result = OnlineResult(cfg, full_vocab_bytes_per_position=full_bytes(target.config.vocab_size))
    schedule = parse_schedule(cfg.schedule, cfg.n, cfg.seed).build(data_dir=data_dir)
    serving = _drafter(cfg, target, copy.deepcopy(draft))
    frozen = _drafter(cfg, target, draft)
    dec = SpeculativeDecoder(target, serving, tokenizer)
    heads = serving.needs_hidden_states  # head drafters train on the target's hidden states
    log_cfg = LogConfig(mode=LogMode(cfg.log_mode), k=cfg.topk, rate=cfg.log_rate, hidden=heads)
    collector = RecordCollector(log_cfg)
    dec.add_observer(collector)
    trainer = OnlineDistiller(_student(cfg, target, draft), buffer, DRAFTER_ID, cfg.distill)
    promoter = Promoter(
        registry or Registry(),
        DRAFTER_ID,
        _student(cfg, target, draft),  # version 0: the untouched initial draft
        PromotionGate(margin=cfg.gate_margin),
        provenance={"source": "zoo", "role": "initial draft"},
    )
    stops = None
    if serving.stop is not None:
        stops = _DecisionLoop(serving, buffer, promoter.registry, cfg, target)
    holdout: deque = deque(maxlen=cfg.holdout_size)
    record_bytes, record_positions = 0, 0

    for req in schedule:
        ids = tokenizer(req.query.prompt, add_special_tokens=False).input_ids[-cfg.prompt_tokens :]
        state = dec.start(ids, cfg.max_new_tokens, domain=req.domain)
        stats = DecodeStats()
        while not state.finished:
            dec.step(state, stats)
        rec = collector.finish(
            state, f"req-{req.index}", DRAFTER_ID, serving.version, domain=req.domain
        )
        hidden = _hidden(target, state.tokens) if heads else None
        logits = _logits(target, state.tokens) if frozen.defers_bonus else None
        frozen_stats = replay_greedy(
            frozen, state.tokens, state.prompt_len, serving.k, hidden=hidden, logits=logits
        )
        entry = RequestLog(
            req.index,
            req.domain,
            serving.version,
            stats.alpha,
            frozen_stats.alpha,
            stats.proposed,
            stats.accepted,
            frozen_stats.proposed,
            frozen_stats.accepted,
            stats.steps,
            frozen_stats.steps,
            stats.emitted,
        )
        result.requests.append(entry)
        if rec is not None:
            data = encode(rec)
            record_bytes += len(data)
            record_positions += rec.num_positions
            if req.index % cfg.holdout_every == cfg.holdout_every - 1:
                holdout.append(rec)
            else:
                buffer.put(DRAFTER_ID, data)
        for _ in range(cfg.steps_per_request):
            if trainer.step() is None:
                break
            if trainer.should_publish():
                _publish(promoter, trainer, serving, list(holdout), result)
                trainer.mark_published()
        if stops is not None:
            stops.train(cfg.steps_per_request, list(holdout), result)
        result.trainer_steps = trainer.steps
        result.bytes_per_position = record_bytes / max(record_positions, 1)
        if progress is not None:
            progress(entry, result)
        if (req.index + 1) % cfg.window == 0:
            w = result.windows()[-1]
            log.info(
                "request %d (%s): α online %.3f frozen %.3f, live v%d, %d trainer steps",
                req.index + 1,
                w["domain"],
                w["alpha_online"],
                w["alpha_frozen"],
                serving.version,
                trainer.steps,
            )
    return result


@torch.inference_mode()
def _hidden(target, tokens: list[int]) -> torch.Tensor:
    """The target's last hidden states over ``tokens`` (what a frozen head replay reads)."""
    return target.model(input_ids=torch.tensor([tokens])).last_hidden_state[0]


@torch.inference_mode()
def _logits(target, tokens: list[int]) -> torch.Tensor:
    """The target's logits over ``tokens``: the kept rows a target-initialised replay reads."""
    return target(input_ids=torch.tensor([tokens])).logits[0]


def _drafter(cfg: OnlineConfig, target, draft) -> Drafter:
    """``cfg.drafter`` with ``cfg.k`` (where it takes one) and ``cfg.drafter_options``."""
    k = {"k": cfg.k} if "k" in drafter_spec(cfg.drafter).options() else {}
    return build_drafter(cfg.drafter, target, draft, **k, **cfg.drafter_options)


def _student(cfg: OnlineConfig, target, draft) -> Student:
    """A student of ``cfg.drafter`` on its own copy of ``draft``."""
    return build_student(cfg.drafter, _drafter(cfg, target, copy.deepcopy(draft)))


class _DecisionLoop:
    """The early-stop decision model's own distil → gate → hot-swap (module docstring)."""

    def __init__(self, serving: Drafter, buffer, registry: Registry, cfg: OnlineConfig, target):
        vocab = int(target.config.vocab_size)
        self.serving = serving.stop
        self.serving.learn = False  # it serves the registry's versions only
        self.trainer = OnlineDistiller(
            DecisionStudent(copy.deepcopy(self.serving.net), vocab),
            buffer.for_group("decision"),
            decision_id(DRAFTER_ID),
            cfg.decision,
            stream=DRAFTER_ID,
        )
        self.promoter = Promoter(
            registry,
            decision_id(DRAFTER_ID),
            DecisionStudent(copy.deepcopy(self.serving.net), vocab),
            PromotionGate(margin=0.0),
            provenance={"source": "prior", "role": "initial decision model"},
        )

    def train(self, steps: int, holdout: list, result: OnlineResult) -> None:
        for _ in range(steps):
            if self.trainer.step() is None:
                return
            if self.trainer.should_publish():
                _publish(self.promoter, self.trainer, self.serving, holdout, result, "decision")
                self.trainer.mark_published()


def _publish(
    promoter: Promoter,
    trainer: OnlineDistiller,
    serving,
    holdout: list,
    result: OnlineResult,
    what: str = "drafter",
) -> None:
    """Hand the trainer's export to the promotion flow; hot-swap ``serving`` (the drafter,
    or its decision model: ``what``) if promoted (between requests: never mid-step). A LoRA
    adapter is cumulative (trained on the initial draft, its base version), so the promoter
    merges it into that base."""
    snap = trainer.student.export()
    outcome = promoter.submit(
        snap.weights, snap.kind, trainer.provenance("in-process"), holdout, snap.lora
    )
    if outcome.promoted:
        serving.load_state_dict(promoter.weights(outcome.version), outcome.version)
    (result.decision_versions if what == "decision" else result.versions).append(
        {
            "version": outcome.version,
            "promoted": outcome.promoted,
            "candidate": outcome.candidate,
            "live": outcome.live,
            "at_request": len(result.requests),
            "steps": trainer.steps,
        }
    )


def plot_online(result: OnlineResult, path) -> None:
    """α per window, online vs frozen, with domain switches and promotions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wins = result.windows()
    xs = [w["start"] + result.config.window / 2 for w in wins]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(xs, [w["alpha_online"] for w in wins], "o-", label="online draft")
    ax.plot(xs, [w["alpha_frozen"] for w in wins], "s--", label="frozen draft")
    prev = None
    for r in result.requests:
        if r.domain != prev:
            ax.axvline(r.index, color="grey", lw=0.8)
            ax.text(r.index + 3, 0.97, r.domain, va="top", fontsize=9, color="grey")
            prev = r.domain
    for v in result.versions:
        if v["promoted"]:
            ax.axvline(v["at_request"], color="tab:green", lw=0.5, alpha=0.4)
    ax.set(
        xlabel="request",
        ylabel="acceptance rate α",
        ylim=(0, 1),
        title=f"online distillation ({result.config.distill.loss}"
        f"{', LoRA' if result.config.distill.lora else ''}): α per {result.config.window} "
        "requests; green = promoted version",
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
