"""The online trainer: pull logged records from the buffer, distil the draft, publish (DESIGN §4).

Terms:

- **record**: one finished request (``osd.distill.record``): token ids, the logged
  positions ``t`` and the target's top-``k`` + tail mass at each.
- **row** ``t − 1``: the draft's logits at index ``t − 1`` predict token ``t``, so logged
  position ``t`` is trained from row ``t − 1`` of one draft forward over
  ``token_ids[:t]``. Only the **draft** runs: the target's part is in the record.
- **step**: one optimiser update on up to ``batch_records`` records. A record is **acked
  only after the optimiser step that consumed it** (at-least-once): a trainer that dies
  mid-step leaves its records pending, and another trainer :meth:`~SampleBuffer.reclaim` s
  them once they have been idle ``reclaim_idle_ms``.
- **publish**: hand the current weights to the registry, every ``publish_every_steps``
  steps or ``publish_every_s`` seconds, whichever comes first.

Worked example (the indexing): ``token_ids = [5, 9, 2, 7]``, ``prompt_len = 2``,
``positions = [2, 3]``. The draft reads ``[5, 9, 2]`` (token 3 is never an input); row 1
(after ``[5, 9]``) is compared with the target's top-``k`` for token 2, row 2 with the
top-``k`` for token 3. With ``max_len = 2`` the input is ``[5, 9]`` and position 3 is
dropped (it would need row 2).

Full fine-tune trains every parameter of the draft; ``lora=True`` wraps it with PEFT LoRA
adapters and trains only those (the caller's model object is modified in place by PEFT).
:meth:`OnlineDistiller.export` gives what a registry stores (the full ``state_dict``, or
the adapter weights); :meth:`OnlineDistiller.merged_state_dict` gives plain weights for
replicas that hold a plain model. The distiller is not thread-safe: export between steps
(the ``on_publish`` callback of :meth:`OnlineDistiller.run` does).

This module imports neither Ray nor Redis: the buffer is injected (``osd.buffer``).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from osd.buffer.base import Entry, SampleBuffer
from osd.distill.losses import LOSS_NAMES, SparseTarget, distill_loss
from osd.distill.record import DistillRecord, RecordError, decode

__all__ = ["DEFAULT_LORA_TARGETS", "DistillConfig", "OnlineDistiller", "StepReport"]

log = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LR_FULL = 1e-4
DEFAULT_LR_LORA = 1e-3

ExportKind = Literal["full", "lora"]


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def _nonneg(value: object) -> bool:
    return (value == 0 and not isinstance(value, bool)) or _positive(value)


def _pos_int(value: object, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


@dataclass(frozen=True)
class DistillConfig:
    """How the draft is distilled online. ``None`` where allowed means "off" / "default".

    >>> DistillConfig(lora=True).learning_rate, DistillConfig().learning_rate
    (0.001, 0.0001)
    """

    loss: str = "fkl"  # one of LOSS_NAMES: fkl, rkl, jsd, tvd, ce
    beta: float = 0.5  # jsd only: β·KL(q||μ) + (1 − β)·KL(p||μ)
    temperature: float = 1.0  # train at the serving temperature
    lr: float | None = None  # None: 1e-4 for full fine-tune, 1e-3 for LoRA
    weight_decay: float = 0.0
    batch_records: int = 8  # records per optimiser step
    max_len: int | None = None  # None: the model's max_position_embeddings (if it has one)
    grad_clip: float | None = 1.0  # max grad norm; None: no clipping
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    publish_every_steps: int | None = 50  # M
    publish_every_s: float | None = 30.0  # T; either M or T triggers a publish
    max_steps_per_s: float | None = None  # compute budget; None: unlimited
    reclaim_idle_ms: int = 60_000  # XAUTOCLAIM threshold: well above one step's duration

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

        need(self.loss in LOSS_NAMES, "loss", f"one of {LOSS_NAMES}")
        need(_positive(self.beta) and self.beta < 1, "beta", "in (0, 1) (the jsd mixture weight)")
        need(_positive(self.temperature), "temperature", "finite and > 0")
        need(self.lr is None or _positive(self.lr), "lr", "finite and > 0 (None: the default)")
        need(_nonneg(self.weight_decay), "weight_decay", "finite and >= 0")
        need(_pos_int(self.batch_records), "batch_records", "an int >= 1")
        need(self.max_len is None or _pos_int(self.max_len, 2), "max_len", "an int >= 2 or None")
        need(self.grad_clip is None or _positive(self.grad_clip), "grad_clip", "> 0 or None")
        need(_pos_int(self.lora_r), "lora_r", "an int >= 1")
        need(_positive(self.lora_alpha), "lora_alpha", "> 0")
        need(_nonneg(self.lora_dropout) and self.lora_dropout < 1, "lora_dropout", "in [0, 1)")
        targets = self.lora_target_modules
        need(
            not isinstance(targets, str)
            and bool(targets)
            and all(isinstance(t, str) for t in targets),
            "lora_target_modules",
            "a non-empty list of module names",
        )
        object.__setattr__(self, "lora_target_modules", tuple(targets))
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

    @property
    def learning_rate(self) -> float:
        """``lr``, or the default for the mode (LoRA adapters take a ~10× higher rate)."""
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR_LORA if self.lora else DEFAULT_LR_FULL


@dataclass(frozen=True)
class StepReport:
    """What one :meth:`OnlineDistiller.step` did."""

    step: int  # optimiser steps so far (unchanged when the batch had no usable position)
    loss: float  # mean over the batch's positions, before the update; nan when none
    records: int  # valid records consumed (and acked)
    positions: int  # logged positions trained on
    skipped: int  # malformed entries acked and dropped
    seconds: float  # wall time of the step, budget sleep excluded
    waited_s: float = 0.0  # sleep spent respecting max_steps_per_s
    reclaimed: int = 0  # entries taken over from an idle (dead) consumer


@dataclass
class _Batch:
    """A padded draft input and, per logged position, its row and sparse target."""

    input_ids: Tensor  # [B, L] right-padded
    attention_mask: Tensor  # [B, L]
    rows: list[tuple[int, int]]  # per position: (batch index, t − 1)
    records: list[DistillRecord]
    positions: list[np.ndarray]  # per record: the kept positions


class OnlineDistiller:
    """Distil one draft from its record stream; see the module docstring.

    ``model``: a causal LM returning ``.logits`` ``[B, L, V]`` (a Hugging Face model).
    ``vocab_size``: bounds the ids in records; default: the model's output vocabulary.
    ``clock`` / ``sleep``: injectable for tests (publish timer and compute budget).
    """

    def __init__(
        self,
        model: nn.Module,
        buffer: SampleBuffer,
        drafter_id: str,
        config: DistillConfig | None = None,
        vocab_size: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not isinstance(drafter_id, str) or not drafter_id:
            raise ValueError(f"drafter_id must be a non-empty string, got {drafter_id!r}")
        self.config = config = config or DistillConfig()
        self.buffer = buffer
        self.drafter_id = drafter_id
        self.clock = clock
        self.sleep = sleep
        self.vocab_size = vocab_size or _model_vocab(model)
        self.max_len = config.max_len or getattr(
            getattr(model, "config", None), "max_position_embeddings", None
        )
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        if config.lora:
            self.model = wrap_lora(model, config)
        else:
            self.model = model
            model.requires_grad_(True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.steps = 0
        self.records_seen = 0
        self.positions_seen = 0
        self.skipped = 0
        self.publishes = 0
        self._published_step = 0
        self._published_at = clock()
        self._last_update_at = -math.inf
        log.info(
            "distiller for %r: %s, loss %s, lr %g, %d trainable parameters",
            drafter_id,
            "LoRA" if config.lora else "full fine-tune",
            config.loss,
            config.learning_rate,
            sum(p.numel() for p in params),
        )

    @property
    def kind(self) -> ExportKind:
        return "lora" if self.config.lora else "full"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> StepReport | None:
        """Pull up to ``batch_records`` records, take one optimiser step, then ack them.

        Returns ``None`` when the buffer had no valid record. Malformed entries are logged,
        acked and skipped. Exceptions from the forward/backward/optimiser propagate and
        leave the batch pending (it is redelivered, to this consumer or by reclaim).
        """
        waited = self._respect_budget()
        start = self.clock()
        entries, reclaimed = self._pull()
        if not entries:
            return None
        records, ids, skipped = self._decode(entries)
        if not records:
            return None
        batch = self._collate(records)
        loss, n_pos = float("nan"), len(batch.rows)
        if n_pos:
            self._last_update_at = start
            loss = self._update(batch)
        self.buffer.ack(self.drafter_id, ids)  # only after the optimiser step
        self.records_seen += len(records)
        self.positions_seen += n_pos
        if n_pos == 0:
            log.debug("%d records with no position within max_len: acked", len(records))
        report = StepReport(
            step=self.steps,
            loss=loss,
            records=len(records),
            positions=n_pos,
            skipped=skipped,
            seconds=self.clock() - start,
            waited_s=waited,
            reclaimed=reclaimed,
        )
        log.debug("step %s", report)
        return report

    def _respect_budget(self) -> float:
        """Sleep until ``1 / max_steps_per_s`` has passed since the last update began."""
        if self.config.max_steps_per_s is None:
            return 0.0
        wait = self._last_update_at + 1.0 / self.config.max_steps_per_s - self.clock()
        if wait <= 0:
            return 0.0
        self.sleep(wait)
        return wait

    def _pull(self) -> tuple[list[Entry], int]:
        """Entries of a dead consumer first (reclaim), then this consumer's own and new ones."""
        n = self.config.batch_records
        out = self.buffer.reclaim(self.drafter_id, self.config.reclaim_idle_ms, n)
        reclaimed = len(out)
        if reclaimed:
            log.info("reclaimed %d idle entries of %r", reclaimed, self.drafter_id)
        if len(out) < n:
            seen = {e.id for e in out}  # read() re-serves own pending: reclaimed ones too
            out += [e for e in self.buffer.read(self.drafter_id, n - len(out)) if e.id not in seen]
        return out, reclaimed

    def _decode(self, entries: Sequence[Entry]) -> tuple[list[DistillRecord], list[str], int]:
        """Valid records and the ids to ack after the step; malformed ones are acked now."""
        records, ids, bad = [], [], []
        for entry in entries:
            try:
                records.append(decode(entry.data, self.vocab_size))
                ids.append(entry.id)
            except RecordError as err:
                log.warning(
                    "dropping malformed record %s of %r: %s", entry.id, self.drafter_id, err
                )
                bad.append(entry.id)
        if bad:  # poison entries: never redeliver them
            self.buffer.ack(self.drafter_id, bad)
            self.skipped += len(bad)
        return records, ids, len(bad)

    def _collate(self, records: list[DistillRecord]) -> _Batch:
        """Right-padded inputs ``token_ids[:max(t)]`` (≤ max_len) and one row per position."""
        cap = self.max_len or math.inf
        kept = [r.positions[r.positions <= cap] for r in records]  # row t − 1 < max_len
        lengths = [int(p.max()) if p.size else 1 for p in kept]  # inputs up to t − 1 only
        ids = torch.zeros(len(records), max(lengths), dtype=torch.long)  # [B, L]
        mask = torch.zeros_like(ids)
        rows = []
        for b, (rec, pos, n) in enumerate(zip(records, kept, lengths, strict=True)):
            ids[b, :n] = torch.from_numpy(rec.token_ids[:n].astype(np.int64))
            mask[b, :n] = 1
            rows += [(b, int(t) - 1) for t in pos]
        return _Batch(ids, mask, rows, records, kept)

    def _targets(self, batch: _Batch) -> list[tuple[Tensor, SparseTarget]]:
        """Sparse targets grouped by ``k`` (records may log different k): (row index, target)."""
        groups: dict[int, tuple[list[int], list[np.ndarray], list[np.ndarray], list[np.ndarray]]]
        groups, i = {}, 0
        for rec, pos in zip(batch.records, batch.positions, strict=True):
            sel = np.searchsorted(rec.positions, pos)  # kept positions' rows in the record
            g = groups.setdefault(rec.k, ([], [], [], []))
            g[0].extend(range(i, i + len(pos)))
            g[1].append(rec.topk_ids[sel])
            g[2].append(rec.topk_logprobs[sel])
            g[3].append(rec.tail_logmass[sel])
            i += len(pos)
        out = []
        for k, (idx, top_ids, top_lp, tail) in groups.items():
            tail_t = torch.from_numpy(np.concatenate(tail).astype(np.float32))  # [m_k]
            if k >= self.vocab_size:  # no tail: logged as LOG_FLOOR, here exactly empty
                tail_t = torch.full_like(tail_t, -math.inf)
            target = SparseTarget(
                topk_ids=torch.from_numpy(np.concatenate(top_ids).astype(np.int64)),  # [m_k, k]
                topk_logprobs=torch.from_numpy(np.concatenate(top_lp).astype(np.float32)),
                tail_logmass=tail_t,
            )
            out.append((torch.tensor(idx), target))
        return out

    def _logits(self, batch: _Batch) -> Tensor:
        """One draft forward; the logits at every position's row: [m, V]."""
        dev = self.device
        b_idx = torch.tensor([b for b, _ in batch.rows], device=dev)  # [m]
        r_idx = torch.tensor([r for _, r in batch.rows], device=dev)  # [m]
        kwargs = {}
        if self._keeps_logits:  # project only the needed rows onto the vocabulary
            keep = torch.unique(r_idx)  # sorted
            kwargs["logits_to_keep"] = keep
            r_idx = torch.searchsorted(keep, r_idx)
        out = self.model(
            input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev), **kwargs
        )
        logits = out.logits if hasattr(out, "logits") else out[0]  # [B, L or |keep|, V]
        return logits[b_idx, r_idx]

    def _update(self, batch: _Batch) -> float:
        cfg = self.config
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        logits = self._logits(batch)  # [m, V]
        per_pos = [
            distill_loss(
                cfg.loss,
                logits[idx.to(logits.device)],
                _to(target, logits.device),
                temperature=cfg.temperature,
                beta=cfg.beta,
                reduction="none",
            )
            for idx, target in self._targets(batch)
        ]
        loss = torch.cat(per_pos).mean()
        if not torch.isfinite(loss):
            # A diverged draft or a poison batch: no update, but ack (the caller does) so
            # the batch is not redelivered forever.
            log.warning(
                "non-finite loss %s on %d records; update skipped", loss.item(), len(batch.records)
            )
            return float(loss.item())
        loss.backward()
        if cfg.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return float(loss.item())

    # ---- publishing ----------------------------------------------------------------------

    def should_publish(self) -> bool:
        """At least one step since the last publish, and M steps or T seconds have passed."""
        since = self.steps - self._published_step
        if since < 1:
            return False
        cfg = self.config
        by_steps = cfg.publish_every_steps is not None and since >= cfg.publish_every_steps
        by_time = (
            cfg.publish_every_s is not None
            and self.clock() - self._published_at >= cfg.publish_every_s
        )
        return by_steps or by_time

    def mark_published(self) -> None:
        """Restart the publish timer and step count (call after a successful publish)."""
        self._reset_publish_timer()
        self.publishes += 1

    def _reset_publish_timer(self) -> None:
        self._published_step = self.steps
        self._published_at = self.clock()

    def export(self) -> tuple[dict[str, Tensor], ExportKind]:
        """The weights to publish: detached CPU copies.

        ``"full"``: the draft's ``state_dict`` under its own names (loads with
        ``load_state_dict`` into a serving copy). ``"lora"``: the adapter weights only,
        as ``peft.get_peft_model_state_dict`` names them.
        """
        if self.config.lora:
            from peft import get_peft_model_state_dict

            state = get_peft_model_state_dict(self.model)
        else:
            state = self.model.state_dict()
        return _cpu_copy(state), self.kind

    def merged_state_dict(self) -> dict[str, Tensor]:
        """Plain weights under the base model's names: LoRA adapters merged into a copy.

        For a full fine-tune this is the ``state_dict`` (as :meth:`export`).
        """
        if not self.config.lora:
            return self.export()[0]
        with torch.no_grad():
            merged = copy.deepcopy(self.model).merge_and_unload()
            return _cpu_copy(merged.state_dict())

    def save_adapter(self, path: str | Path) -> Path:
        """Write the adapters in PEFT format (``adapter_config.json`` +
        ``adapter_model.safetensors``), loadable with ``PeftModel.from_pretrained``."""
        if not self.config.lora:
            raise ValueError(
                "save_adapter needs a LoRA distiller (DistillConfig(lora=True)); for a full "
                "fine-tune publish export() or save the model with save_pretrained"
            )
        path = Path(path)
        self.model.save_pretrained(str(path), safe_serialization=True)
        return path

    # ---- loop ----------------------------------------------------------------------------

    def run(
        self,
        max_steps: int | None = None,
        until: float | Callable[[], bool] | None = None,
        idle_sleep_s: float = 0.05,
        on_publish: Callable[[OnlineDistiller], None] | None = None,
    ) -> int:
        """Step until ``max_steps`` optimiser steps were taken, or ``until`` (a deadline on
        :attr:`clock`, or a predicate returning True to stop); returns the steps taken.

        After each step, when :meth:`should_publish`, calls ``on_publish(self)`` (which calls
        :meth:`export` and hands the weights to the registry) and then :meth:`mark_published`.
        A failing ``on_publish`` is logged and retried at the next trigger; training goes on.
        """
        first = self.steps

        def done() -> bool:
            if max_steps is not None and self.steps - first >= max_steps:
                return True
            if until is None:
                return False
            return until() if callable(until) else self.clock() >= until

        while not done():
            if self.step() is None:
                self.sleep(idle_sleep_s)
                continue
            if on_publish is not None and self.should_publish():
                try:
                    on_publish(self)
                except Exception:
                    log.exception("publishing %r at step %d failed", self.drafter_id, self.steps)
                    self._reset_publish_timer()
                else:
                    self.mark_published()
        return self.steps - first


# ---- helpers -------------------------------------------------------------------------------


def _model_vocab(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        raise ValueError("cannot tell the draft's vocabulary size; pass vocab_size=")
    return int(vocab)


def wrap_lora(model: nn.Module, config: DistillConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise ValueError(
            f"cannot put LoRA adapters on {type(model).__name__} with target modules "
            f"{list(config.lora_target_modules)}: {err}; set lora_target_modules to the "
            "model's linear layer names"
        ) from err


def _to(target: SparseTarget, device: torch.device) -> SparseTarget:
    return SparseTarget(
        target.topk_ids.to(device), target.topk_logprobs.to(device), target.tail_logmass.to(device)
    )


def _cpu_copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.detach().to("cpu", copy=True) for name, t in state.items()}
