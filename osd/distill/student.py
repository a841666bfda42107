"""The student: what a drafter trains online, as the trainer, the gate and the registry see it.

A drafter that learns registers a factory ``Drafter -> Student`` beside itself
(``DrafterSpec.student`` in :mod:`osd.drafters`); everything downstream works through this
contract and never assumes a causal LM:

- :attr:`Student.module` — the trainable ``nn.Module``. Its ``state_dict`` (or, with LoRA,
  its adapter plus :class:`~osd.distill.lora.LoraSpec`) is what the registry versions.
- :meth:`Student.predict` — per record, the draft's logits ``[n, V]`` at the record's first
  ``n`` logged positions (those within the student's context), computed from the record's
  token ids (and, for head drafters, from its logged target hidden states). The target never
  runs: its part is in the record.
- :meth:`Student.objective` — what the trainer minimises: by default the KD loss on the
  sparse top-k target (:class:`KDObjective`, :mod:`osd.distill.losses`). An objective with a
  network of its own (KOALA's discriminator) keeps that network and its optimiser inside
  the :class:`Objective`, adds its term in :meth:`Objective.loss` and trains its network in
  :meth:`Objective.after_step`; the trainer loop does not change.

Temperature: each record carries its request's sampling temperature, and the default
objective and the gate compare the draft and the target at **that** temperature
(:func:`distill_temperature`), not always at T = 1.

Terms: a **logged position** ``t`` is the target's distribution over ``token_ids[t]`` given
``token_ids[:t]``; a causal LM predicts it from **row** ``t − 1`` of one forward over
``token_ids[:t]``. A student with **context** ``c`` (inputs of at most ``c`` tokens) can
predict the positions ``t <= c``; positions are increasing, so those are a prefix.

Worked example (:class:`CausalLMStudent`): ``token_ids = [5, 9, 2, 7]``, ``prompt_len = 2``,
``positions = [2, 3]``. The draft reads ``[5, 9, 2]`` (token 3 is never an input); row 1
(after ``[5, 9]``) predicts position 2, row 2 position 3, so ``predict`` returns a ``[2, V]``
tensor. With ``max_len = 2`` the input is ``[5, 9]`` and ``predict`` returns ``[1, V]``:
position 3 would need row 2.

No Ray or Redis here.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor, nn

from osd.distill.lora import LoraSpec, adapter_state_dict, load_adapter, wrap_lora
from osd.distill.losses import SparseTarget
from osd.distill.record import DistillRecord
from osd.kernels import sparse_distill_loss

if TYPE_CHECKING:
    from osd.distill.config import DistillConfig

__all__ = [
    "CausalLMStudent",
    "KDObjective",
    "Objective",
    "Snapshot",
    "Student",
    "distill_temperature",
    "predictable",
    "sparse_target",
]

ExportKind = Literal["full", "lora"]


def distill_temperature(record: DistillRecord) -> float:
    """The temperature at which ``record``'s positions are distilled and gated: the
    request's sampling temperature, and **T = 1 for greedy traffic (T = 0)**.

    Why T = 1 for greedy: greedy verification accepts a draft token iff it is the target's
    argmax, and a greedy draft proposes its own argmax. The T → 0 limit of the distributions
    is a point mass whose KD loss is the hard-label ``ce`` loss (available as ``loss="ce"``),
    which gives the draft no signal on how close the runner-up is. Matching the T = 1
    distributions makes the argmaxes agree as a by-product of matching the whole
    distribution (what the OSD paper does for greedy serving), and the gate's
    ``Σ min(p, q)`` at T = 1 is a smooth proxy for greedy acceptance, ranking versions the
    same way without being its exact value. Sampled traffic (T > 0) is distilled at its own
    T, as speculative sampling accepts with ``min(1, q_T / p_T)``; top-k / top-p are
    carried in the record but not applied (the logged top-k support is already where the
    mass that top-p keeps lies).

    >>> import numpy as np
    >>> rec = DistillRecord(request_id="r", drafter_id="d", version=0, prompt_len=1,
    ...     token_ids=np.array([5, 9], np.int32), positions=np.array([1], np.int32),
    ...     topk_ids=np.zeros((1, 1), np.int32), topk_logprobs=np.zeros((1, 1), np.float16),
    ...     tail_logmass=np.full(1, -30, np.float32), temperature=0.0)
    >>> distill_temperature(rec)  # greedy
    1.0
    >>> rec.temperature = 0.7
    >>> distill_temperature(rec)
    0.7
    """
    return float(record.temperature) if record.temperature > 0 else 1.0


def predictable(record: DistillRecord, context: int | None) -> int:
    """How many of ``record``'s logged positions a student with ``context`` can predict:
    those with ``t <= context`` (row ``t − 1`` is inside the context), a prefix.

    >>> import numpy as np
    >>> rec = DistillRecord(request_id="r", drafter_id="d", version=0, prompt_len=2,
    ...     token_ids=np.array([5, 9, 2, 7], np.int32), positions=np.array([2, 3], np.int32),
    ...     topk_ids=np.zeros((2, 1), np.int32), topk_logprobs=np.zeros((2, 1), np.float16),
    ...     tail_logmass=np.full(2, -30, np.float32))
    >>> predictable(rec, None), predictable(rec, 2), predictable(rec, 1)
    (2, 1, 0)
    """
    if context is None:
        return record.num_positions
    return int(np.searchsorted(record.positions, context, side="right"))


def sparse_target(
    record: DistillRecord, vocab_size: int | None = None, n: int | None = None
) -> SparseTarget:
    """The record's logged top-k + tail at its first ``n`` positions (default: all) as a
    :class:`SparseTarget` (``[n, k]``, ``[n, k]``, ``[n]``, on CPU).

    With ``k >= vocab_size`` the record is exact: its tail (logged as ``LOG_FLOOR``) is
    made exactly empty (``-inf``).
    """
    rows = slice(None) if n is None else slice(0, n)
    tail = torch.as_tensor(record.tail_logmass[rows], dtype=torch.float32)  # [n]
    if vocab_size is not None and record.k >= vocab_size:
        tail = torch.full_like(tail, -math.inf)
    return SparseTarget(
        topk_ids=torch.as_tensor(record.topk_ids[rows], dtype=torch.long),  # [n, k]
        topk_logprobs=torch.as_tensor(record.topk_logprobs[rows], dtype=torch.float32),
        tail_logmass=tail,
    )


@dataclass(frozen=True)
class Snapshot:
    """What a trainer publishes: detached CPU weights, their kind and, for LoRA, the spec."""

    weights: dict[str, Tensor]  # full state_dict under the module's names, or adapter tensors
    kind: ExportKind
    lora: LoraSpec | None = None  # set iff kind == "lora"


class Objective:
    """What the trainer minimises for a student; see the module docstring.

    ``loss`` returns one value per predicted position, ``[m]`` (records in order, each
    record's positions in order), with the graph into the student. ``after_step`` runs
    after the student's optimiser step, with the same (detached) predictions: an objective
    with a second network trains it there, with its own optimiser.
    """

    def loss(self, logits: Sequence[Tensor], records: Sequence[DistillRecord]) -> Tensor:
        raise NotImplementedError

    def after_step(self, logits: Sequence[Tensor], records: Sequence[DistillRecord]) -> None:
        """Nothing by default."""


class KDObjective(Objective):
    """Knowledge distillation on the sparse top-k target: :func:`~osd.distill.losses.distill_loss`
    ``name`` (``fkl``, ``rkl``, ``jsd``, ``tvd``, ``ce``) at every predicted position, at
    each record's :func:`distill_temperature` (the fused Triton loss on CUDA,
    :func:`osd.kernels.sparse_distill_loss`)."""

    def __init__(self, name: str = "fkl", beta: float = 0.5) -> None:
        self.name = name
        self.beta = beta

    def loss(self, logits: Sequence[Tensor], records: Sequence[DistillRecord]) -> Tensor:
        out = []
        for lg, rec in zip(logits, records, strict=True):  # lg: [n, V]
            if lg.shape[0] == 0:
                continue
            target = _to(sparse_target(rec, lg.shape[-1], lg.shape[0]), lg.device)
            per_pos = sparse_distill_loss(
                self.name,
                lg,
                target,
                temperature=distill_temperature(rec),
                beta=self.beta,
                reduction="none",
            )
            out.append(per_pos)  # [n]
        if not out:
            return torch.zeros(0)
        return torch.cat(out)


class Student:
    """Base class: a trainable module, its predictions at logged positions, its objective.

    Subclasses implement :meth:`predict` (and may override :meth:`objective`). The weight
    surface — LoRA wrapping, export, merge, loading — is shared. ``context``: the longest
    input the module takes (``None``: unbounded). ``lora_task_type``: PEFT's task for
    :func:`~osd.distill.lora.wrap_lora` (``None`` for a plain module).
    """

    lora_task_type: str | None = None
    gate_metric = "acceptance"  # what gate_estimate measures (the gate's reason names it)

    def __init__(self, module: nn.Module, vocab_size: int, context: int | None = None) -> None:
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        self.module = module
        self.vocab_size = vocab_size
        self.context = context
        self.lora: LoraSpec | None = None

    # ---- the contract --------------------------------------------------------------------

    def predict(self, records: Sequence[DistillRecord], max_len: int | None = None) -> list[Tensor]:
        """Per record, the draft logits ``[n, V]`` at its first ``n`` = :meth:`predictable`
        logged positions; differentiable (wrap in ``torch.no_grad()`` to evaluate)."""
        raise NotImplementedError

    def objective(self, config: DistillConfig) -> Objective:
        """The trainer's objective for this student (default: KD on the sparse target)."""
        return KDObjective(config.loss, config.beta)

    def gate_estimate(self, records: list[DistillRecord]):
        """What the promotion gate compares between versions, higher is better (an
        :class:`~osd.registry.gate.AcceptanceEstimate`): by default the expected acceptance
        ``Σ min(p, q)`` of :meth:`predict` against the logged top-k."""
        from osd.registry.gate import draft_acceptance

        return draft_acceptance(self, records)

    def limit(self, max_len: int | None = None) -> int | None:
        """The input length cap: the student's context, or ``max_len`` when shorter."""
        caps = [c for c in (self.context, max_len) if c is not None]
        return min(caps) if caps else None

    def predictable(self, record: DistillRecord, max_len: int | None = None) -> int:
        return predictable(record, self.limit(max_len))

    def sparse_target(self, record: DistillRecord, n: int) -> SparseTarget:
        """The logged rows that :meth:`predict`'s ``n`` rows of ``record`` are compared
        with: rows ``0 .. n - 1`` (a head student, which predicts one position further
        ahead, shifts them)."""
        return sparse_target(record, self.vocab_size, n)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    # ---- weights -------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def add_lora(self, spec: LoraSpec) -> None:
        """Wrap :attr:`module` with fresh LoRA adapters; only they train from now on."""
        if self.lora is not None:
            raise ValueError("this student already has LoRA adapters")
        self.module = wrap_lora(self.module, spec, self.lora_task_type)
        self.lora = spec

    def load_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Full weights under the plain module's names (strict)."""
        if self.lora is not None:
            raise ValueError("load full weights before adding LoRA adapters")
        self.module.load_state_dict(state_dict, strict=True)

    def load_adapter(self, adapter: dict[str, Tensor], spec: LoraSpec) -> None:
        """Resume LoRA training from a published adapter with the same rank and targets."""
        if self.lora is None:
            raise ValueError("add LoRA adapters (DistillConfig(lora=True)) before loading one")
        mine, theirs = self.lora.to_dict(), spec.to_dict()
        mine.pop("base_version"), theirs.pop("base_version")
        if mine != theirs:
            raise ValueError(f"the adapter's LoRA spec {theirs} differs from this one's {mine}")
        load_adapter(self.module, adapter)

    def export(self) -> Snapshot:
        """Detached CPU copies: the full ``state_dict`` under the module's own names (loads
        with ``load_state_dict`` into a serving copy), or the adapter (PEFT names) + spec."""
        if self.lora is not None:
            return Snapshot(_cpu_copy(adapter_state_dict(self.module)), "lora", self.lora)
        return Snapshot(_cpu_copy(self.module.state_dict()), "full")

    def merged_state_dict(self) -> dict[str, Tensor]:
        """Plain weights under the base module's names (adapters merged into a copy)."""
        if self.lora is None:
            return self.export().weights
        with torch.no_grad():
            merged = copy.deepcopy(self.module).merge_and_unload()
            return _cpu_copy(merged.state_dict())

    def save_adapter(self, path: str | Path) -> Path:
        """Write the adapters in PEFT format (``adapter_config.json`` +
        ``adapter_model.safetensors``), loadable with ``PeftModel.from_pretrained``."""
        if self.lora is None:
            raise ValueError(
                "save_adapter needs LoRA adapters (DistillConfig(lora=True)); for a full "
                "fine-tune publish export() or save the model with save_pretrained"
            )
        path = Path(path)
        self.module.save_pretrained(str(path), safe_serialization=True)
        return path


class CausalLMStudent(Student):
    """The draft-model drafter's student: a causal LM returning ``.logits`` ``[B, L, V]``.

    ``predict`` runs ONE forward over the batch, right-padded to the longest input, and
    projects only the needed rows onto the vocabulary when the model takes
    ``logits_to_keep`` (Hugging Face models do).
    """

    lora_task_type = "CAUSAL_LM"

    def __init__(
        self, model: nn.Module, vocab_size: int | None = None, context: int | None = None
    ) -> None:
        config = getattr(model, "config", None)
        super().__init__(
            model,
            vocab_size or _model_vocab(model),
            context or getattr(config, "max_position_embeddings", None),
        )
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def predict(self, records: Sequence[DistillRecord], max_len: int | None = None) -> list[Tensor]:
        dev = self.device
        counts = [self.predictable(r, max_len) for r in records]
        if not any(counts):
            return [torch.zeros(0, self.vocab_size, device=dev) for _ in records]
        # inputs token_ids[:t_last]: the last predicted position's token is never an input
        lengths = [
            int(r.positions[n - 1]) if n else 1 for r, n in zip(records, counts, strict=True)
        ]
        ids = torch.zeros(len(records), max(lengths), dtype=torch.long)  # [B, L] right-padded
        mask = torch.zeros_like(ids)  # [B, L]
        b_idx, r_idx = [], []  # per predicted position: batch index, row t − 1
        for b, (rec, n, length) in enumerate(zip(records, counts, lengths, strict=True)):
            ids[b, :length] = torch.from_numpy(rec.token_ids[:length].astype(np.int64))
            mask[b, :length] = 1
            b_idx += [b] * n
            r_idx += [int(t) - 1 for t in rec.positions[:n]]
        rows = torch.tensor(r_idx, device=dev)  # [m]
        kwargs = {}
        if self._keeps_logits:  # project only the needed rows onto the vocabulary
            keep = torch.unique(rows)  # sorted
            kwargs["logits_to_keep"] = keep
            rows = torch.searchsorted(keep, rows)
        out = self.module(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]  # [B, L or |keep|, V]
        picked = logits[torch.tensor(b_idx, device=dev), rows]  # [m, V]
        return list(picked.split(counts))


# ---- helpers -------------------------------------------------------------------------------


def _model_vocab(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        raise ValueError("cannot tell the draft's vocabulary size; pass vocab_size=")
    return int(vocab)


def _to(target: SparseTarget, device: torch.device) -> SparseTarget:
    return SparseTarget(
        target.topk_ids.to(device), target.topk_logprobs.to(device), target.tail_logmass.to(device)
    )


def _cpu_copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.detach().to("cpu", copy=True) for name, t in state.items()}
