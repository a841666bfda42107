"""Students of the head drafters, and KOALA's adversarial objective.

Records of head drafters carry the target's last hidden state at each logged position
(``LogConfig(mode="all", hidden=True)``): ``record.hidden[i] = h_{t_i - 1}``, the state whose
LM-head logits are the logged distribution at ``t_i``. Over a run of consecutive logged
positions ``t_0, t_0 + 1, …`` a head's prediction from ``hidden[i]`` of position
``t_i + j`` can be compared with the logged distribution at row ``i + j``:

- :class:`MedusaStudent`: head ``j`` (1-based) from ``hidden[i]`` predicts row ``i + j``;
  ``predict`` returns head 1's rows (what the gate scores: depth-1 acceptance), the
  objective trains every head.
- :class:`EagleStudent`: pairs ``(hidden[i], token t_i)`` through the head, causally,
  predict row ``i + 1``, after the pairs of everything before ``t_0`` (the prompt), as when
  it drafts. The prompt's states are not logged (they would multiply a record's size); the
  student recomputes them with one no-grad pass of the frozen target over the prefix,
  cached per record (the gate scores the same held-out records for every candidate).
- :class:`RecurrentStudent` (ReDrafter): ``hidden[i]`` and the logged tokens from ``t_i``
  on, through the recurrence, predict rows ``i + 1 .. i + L``.

So a head student's ``n`` predictions of a record are compared with rows ``1 .. n``
(:meth:`HeadStudent.sparse_target`), not ``0 .. n - 1``.

:class:`AdversarialObjective` (KOALA): a discriminator tells the head's distribution from
the target's — on the target's logged top-k support: the ``k`` log-probs there and the
log of the rest — and the head's loss is KD + ``λ`` · the non-saturating GAN loss. The
discriminator and its optimiser live in the objective; ``after_step`` trains it.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osd.distill.losses import SparseTarget, distill_loss
from osd.distill.record import DistillRecord
from osd.distill.student import KDObjective, Objective, Student, distill_temperature
from osd.drafters.heads import eagle_layers
from osd.drafters.recurrent import unroll

LOG_FLOOR = -30.0


def _run(record: DistillRecord) -> int:
    """Length of the leading run of consecutive logged positions."""
    pos = np.asarray(record.positions)
    if len(pos) == 0:
        return 0
    breaks = np.nonzero(np.diff(pos) != 1)[0]
    return int(breaks[0] + 1) if len(breaks) else len(pos)


def _rows(record: DistillRecord, rows: Sequence[int] | slice) -> SparseTarget:
    tail = torch.as_tensor(record.tail_logmass[rows], dtype=torch.float32)
    return SparseTarget(
        torch.as_tensor(record.topk_ids[rows], dtype=torch.long),
        torch.as_tensor(record.topk_logprobs[rows], dtype=torch.float32),
        tail,
    )


class Discriminator(nn.Module):
    """MLP on ``[n, k + 1]`` log-probs (top-k support + the rest) → a logit: target or not."""

    def __init__(self, k: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(k + 1, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


def support_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """``[n, k + 1]``: a distribution's log-probs at ``ids`` ``[n, k]`` and of the rest."""
    logp = torch.log_softmax(logits.float() / temperature, -1).gather(-1, ids)
    rest = torch.log1p(-logp.exp().sum(-1).clamp(max=1 - 1e-6))
    return torch.cat([logp, rest[..., None]], -1).clamp(min=LOG_FLOOR)


def target_support(target: SparseTarget) -> Tensor:
    return torch.cat([target.topk_logprobs, target.tail_logmass[..., None]], -1).clamp(
        min=LOG_FLOOR
    )


class AdversarialObjective(Objective):
    """KD + ``lam`` · adversarial loss; a seeded discriminator trained in ``after_step``.

    :meth:`head_loss` / :meth:`disc_step` take tensors (the offline warm start uses them);
    :meth:`loss` / :meth:`after_step` take records (the online trainer)."""

    def __init__(
        self,
        student: HeadStudent | None = None,
        base: Objective | None = None,
        k: int = 16,
        lam: float = 0.1,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> None:
        self.student, self.base, self.k, self.lam = student, base, k, lam
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.disc = Discriminator(k)
        self.opt = torch.optim.Adam(self.disc.parameters(), lr=lr)

    def head_loss(self, logits: Tensor, target: SparseTarget, temperature: float = 1.0) -> Tensor:
        """``[n]``: the head's GAN term (it wants the discriminator to say "target")."""
        ids = target.topk_ids[:, : self.k]
        fake = self.disc(support_logprobs(logits, ids, temperature))
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake), reduction="none")

    def disc_step(self, logits: Tensor, target: SparseTarget, temperature: float = 1.0) -> float:
        ids = target.topk_ids[:, : self.k]
        real = self.disc(_truncate(target, self.k))
        fake = self.disc(support_logprobs(logits.detach(), ids, temperature))
        loss = F.binary_cross_entropy_with_logits(
            real, torch.ones_like(real)
        ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def loss(self, logits: Sequence[Tensor], records: Sequence[DistillRecord]) -> Tensor:
        kd = self.base.loss(logits, records)
        adv = [
            self.head_loss(lg, self.student.sparse_target(r, lg.shape[0]), distill_temperature(r))
            for lg, r in zip(logits, records, strict=True)
            if lg.shape[0]
        ]
        if not adv:
            return kd
        adv_t = torch.cat(adv)  # the head-1 rows: they come first in ``kd``
        return torch.cat([kd[: len(adv_t)] + self.lam * adv_t, kd[len(adv_t) :]])

    def after_step(self, logits: Sequence[Tensor], records: Sequence[DistillRecord]) -> None:
        used = [(lg, r) for lg, r in zip(logits, records, strict=True) if lg.shape[0]]
        if not used:
            return
        lg = torch.cat([lg for lg, _ in used])
        tg = [self.student.sparse_target(r, lg.shape[0]) for lg, r in used]
        target = SparseTarget(
            torch.cat([t.topk_ids for t in tg]),
            torch.cat([t.topk_logprobs for t in tg]),
            torch.cat([t.tail_logmass for t in tg]),
        )
        self.disc_step(lg, target, distill_temperature(used[0][1]))


def _truncate(target: SparseTarget, k: int) -> Tensor:
    """The target's support vector on its first ``k`` ids (the rest folded into the tail)."""
    if target.topk_ids.shape[-1] == k:
        return target_support(target)
    lp = target.topk_logprobs[:, :k]
    rest = torch.log1p(-lp.exp().sum(-1).clamp(max=1 - 1e-6))
    return torch.cat([lp, rest[:, None]], -1).clamp(min=LOG_FLOOR)


class _ShiftedKD(KDObjective):
    """KD against the student's own target rows (:meth:`HeadStudent.sparse_target`)."""

    def __init__(self, student: HeadStudent, name: str, beta: float) -> None:
        super().__init__(name, beta)
        self.student = student

    def loss(self, logits: Sequence[Tensor], records: Sequence[DistillRecord]) -> Tensor:
        out = []
        for lg, rec in zip(logits, records, strict=True):
            if lg.shape[0] == 0:
                continue
            target = self.student.sparse_target(rec, lg.shape[0])
            out.append(
                distill_loss(
                    self.name,
                    lg,
                    target,
                    temperature=distill_temperature(rec),
                    beta=self.beta,
                    reduction="none",
                )
            )
        extra = getattr(self.student, "deeper_losses", None)
        if extra is not None:
            out += extra(records, self.name, self.beta)
        return torch.cat(out) if out else torch.zeros(0)


class HeadStudent(Student):
    """A head drafter's student: the heads train, the target's LM head stays frozen."""

    def __init__(self, drafter) -> None:
        self.drafter = drafter
        self.lm_head = drafter.lm_head
        module = drafter.heads if hasattr(drafter, "heads") else drafter.head
        super().__init__(module, int(self.lm_head.weight.shape[0]), None)
        for p in drafter.target.parameters():  # frozen: no gradient into the target
            p.requires_grad_(False)

    def __deepcopy__(self, memo) -> HeadStudent:
        """A copy with its own heads; the frozen target (and the drafter's caches) shared."""
        drafter = copy.copy(self.drafter)
        setattr(
            drafter, "heads" if hasattr(drafter, "heads") else "head", copy.deepcopy(self.module)
        )
        return type(self)(drafter)

    def predictable(self, record: DistillRecord, max_len: int | None = None) -> int:
        if record.hidden is None:
            return 0
        n = max(0, _run(record) - 1)
        if max_len is not None:
            n = min(n, max(0, int(np.searchsorted(record.positions, max_len, side="right")) - 1))
        return n

    def sparse_target(self, record: DistillRecord, n: int) -> SparseTarget:
        return _rows(record, slice(1, n + 1))

    def objective(self, config) -> Objective:
        base = _ShiftedKD(self, config.loss, config.beta)
        if getattr(self.drafter.config, "adversarial", False):
            return AdversarialObjective(self, base, seed=getattr(config, "seed", 0) or 0)
        return base

    def _hidden(self, record: DistillRecord, n: int) -> Tensor:
        return torch.as_tensor(record.hidden[:n].astype(np.float32)).to(self.device)


class MedusaStudent(HeadStudent):
    def predict(self, records: Sequence[DistillRecord], max_len: int | None = None) -> list[Tensor]:
        out = []
        for rec in records:
            n = self.predictable(rec, max_len)
            if n == 0:
                out.append(torch.zeros(0, self.vocab_size, device=self.device))
                continue
            feats = self.module(self._hidden(rec, n))[:, 0]  # head 1: [n, H]
            out.append(self.lm_head(feats))
        return out

    def deeper_losses(self, records: Sequence[DistillRecord], name: str, beta: float) -> list:
        """Per-position KD losses of heads 2..K: head j from row i against row i + j."""
        out = []
        for rec in records:
            run = _run(rec) if rec.hidden is not None else 0
            for j in range(2, self.module.num_heads + 1):
                if run <= j:
                    break
                feats = self.module(self._hidden(rec, run - j))[:, j - 1]
                out.append(
                    distill_loss(
                        name,
                        self.lm_head(feats),
                        _rows(rec, slice(j, run)),
                        temperature=distill_temperature(rec),
                        beta=beta,
                        reduction="none",
                    )
                )
        return out


class EagleStudent(HeadStudent):
    PREFIX_CACHE = 512  # records whose prefix features are kept

    def __init__(self, drafter) -> None:
        super().__init__(drafter)
        self._prefix: OrderedDict[tuple[str, int], Tensor] = OrderedDict()

    def _prefix_features(self, rec: DistillRecord, first: int) -> Tensor:
        """``[first - 1, H]``: the target's last hidden states ``f_0 .. f_{first-2}`` of the
        tokens before the first logged pair (one no-grad target pass, cached)."""
        key = (rec.request_id, first)
        if first <= 1:
            return torch.zeros(0, self.module.fc.out_features, device=self.device)
        if key not in self._prefix:
            ids = torch.as_tensor(rec.token_ids[: first - 1].astype(np.int64))[None]
            with torch.no_grad():
                h = self.drafter.base(input_ids=ids.to(self.device)).last_hidden_state[0]
            self._prefix[key] = h.float()
            while len(self._prefix) > self.PREFIX_CACHE:
                self._prefix.popitem(last=False)
        self._prefix.move_to_end(key)
        return self._prefix[key]

    def _features(self, rec: DistillRecord, n: int) -> Tensor:
        """``[n, H]``: the head's predicted features ``f̂`` at the logged pairs, after the
        prefix's pairs ``(e(x_{j+1}), f_j)``, ``j < t_0 - 1``, as the drafter's cache holds
        them when it drafts."""
        base = self.drafter.base
        first = int(rec.positions[0])
        feats = torch.cat([self._prefix_features(rec, first), self._hidden(rec, n)])[None]
        ids = torch.as_tensor(rec.token_ids[1 : first + n].astype(np.int64))[None]
        x = self.module.fc(torch.cat([base.embed_tokens(ids.to(self.device)), feats], -1))
        length = first - 1 + n
        pos = torch.arange(length, device=self.device)[None]
        mask = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()[None]
        return eagle_layers(self.module, x, base.rotary_emb(x, pos), mask)[0, first - 1 :]

    def predict(self, records: Sequence[DistillRecord], max_len: int | None = None) -> list[Tensor]:
        out = []
        for rec in records:
            n = self.predictable(rec, max_len)
            if n == 0:
                out.append(torch.zeros(0, self.vocab_size, device=self.device))
                continue
            out.append(self.lm_head(self._features(rec, n)))
        return out

    def deeper_losses(self, records: Sequence[DistillRecord], name: str, beta: float) -> list:
        """EAGLE's feature regression: smooth-L1 of ``f̂`` to the next logged hidden state
        (row ``i + 1`` holds the true feature the head predicts from row ``i``), which keeps
        the features it drafts deeper levels from on the target's."""
        out = []
        for rec in records:
            n = self.predictable(rec)
            if n == 0:
                continue
            true = self._hidden(rec, n + 1)[1:]
            loss = F.smooth_l1_loss(self._features(rec, n), true, reduction="none")
            out.append(loss.mean(-1))
        return out


class RecurrentStudent(HeadStudent):
    """ReDrafter's head: from ``hidden[i]`` and the logged tokens ``t_i, t_i + 1, …``
    (teacher forced through the recurrence), depth ``j`` predicts row ``i + j``;
    ``predict`` returns depth 1 (what the gate scores), the objective trains depths 1..L."""

    def _unrolled(self, rec: DistillRecord, n: int, length: int) -> Tensor:
        """``[n, length, H]`` features of depths ``1 .. length`` from rows ``0 .. n - 1``."""
        pos = np.asarray(rec.positions[:n], dtype=np.int64)[:, None] + np.arange(length)
        pos = np.minimum(pos, len(rec.token_ids) - 1)  # past the end: rows not used
        ids = torch.as_tensor(rec.token_ids[pos].astype(np.int64)).to(self.device)
        return unroll(self.module, self.drafter.embed, self._hidden(rec, n), ids)

    def predict(self, records: Sequence[DistillRecord], max_len: int | None = None) -> list[Tensor]:
        out = []
        for rec in records:
            n = self.predictable(rec, max_len)
            if n == 0:
                out.append(torch.zeros(0, self.vocab_size, device=self.device))
                continue
            out.append(self.lm_head(self._unrolled(rec, n, 1)[:, 0]))
        return out

    def deeper_losses(self, records: Sequence[DistillRecord], name: str, beta: float) -> list:
        """Per-position KD losses of depths 2..L: depth j from row i against row i + j."""
        out = []
        length = self.drafter.shape.length
        for rec in records:
            run = _run(rec) if rec.hidden is not None else 0
            if run <= 2:
                continue
            feats = self._unrolled(rec, run - 2, min(length, run - 1))
            for j in range(2, feats.shape[1] + 1):
                out.append(
                    distill_loss(
                        name,
                        self.lm_head(feats[: run - j, j - 1]),
                        _rows(rec, slice(j, run)),
                        temperature=distill_temperature(rec),
                        beta=beta,
                        reduction="none",
                    )
                )
        return out


def head_student(drafter) -> HeadStudent:
    kind = drafter.config.kind
    if kind == "recurrent":
        return RecurrentStudent(drafter)
    return MedusaStudent(drafter) if kind == "medusa" else EagleStudent(drafter)
