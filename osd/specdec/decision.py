"""The early-stop decision model (improved MCSD): will the next draft token be accepted?

An autoregressive drafter asks before drafting each position past the first: given the
draft distribution the token would be drawn from, what is the chance that verification
accepts it *if the walk reaches it*? Below ``threshold`` it stops drafting that sequence
(one draft forward saved per remaining level, and the verify forward gets shorter). The
labels come free from verification: a drafted position the walk reached was accepted (1)
or rejected (0); positions past the first rejection were never reached and carry no label.
So the model learns **online** from the traffic it serves.

Features per position (from the draft logits ``[a, V]``): the top-1 probability, the
margin top-1 − top-2, the entropy (nats, scaled by ``log V``), and the depth ``d / 8``.
The model is a small MLP (4 → 16 → 1, sigmoid), trained by Adam on a rolling batch every
``every`` labels (8 steps each); it starts from a prior that accepts everything it has not seen (its
bias starts at +3), so before it has learned the drafter drafts its full length.

The decision model is also a **step observer** of the engine (the engine registers a
drafter's ``stop`` itself): a drafter that consults it leaves the features of the positions
it drafted in ``DecodeState.stop_feats``; after verification :meth:`AcceptPredictor.on_step`
labels them (:func:`stop_labels`) and learns. The record collector logs the same features
and labels (``DistillRecord.stop_features`` / ``stop_labels``), so a trainer can learn the
model from the buffer and the registry can version, gate and hot-swap it like any weights
(:class:`osd.distill.decision.DecisionStudent`); a replica that follows the registry's
versions sets ``learn=False`` so that it serves exactly the promoted weights.

Stopping is a function of the draft's distribution only — fixed by the history before
the target is consulted — so greedy output and the sampled distribution are unchanged
(any proposal fixed by the history is verified losslessly); only the drafted length
changes.

>>> m = AcceptPredictor(threshold=0.5)
>>> f = m.features(torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), depth=1)
>>> f.shape, bool(m.prob(f)[0] > 0.9)  # untrained: optimistic
(torch.Size([2, 4]), True)
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["FEATURES", "AcceptPredictor", "decision_net", "stop_labels"]

FEATURES = 4  # top-1 probability, top-1 − top-2 margin, scaled entropy, depth / 8


def decision_net() -> nn.Sequential:
    """The decision model's network: ``[a, 4]`` features → ``[a, 1]`` acceptance logit."""
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.SiLU(), nn.Linear(16, 1))


def stop_labels(depth: int, accepted: int) -> list[float]:
    """Labels of one verified chain of ``depth`` drafted positions of which the first
    ``accepted`` were accepted: 1 per accepted position, then 0 for the first rejected one;
    the positions after it were never reached and carry no label.

    >>> stop_labels(4, 2), stop_labels(3, 3), stop_labels(0, 0)
    ([1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [])
    """
    return [1.0] * min(accepted, depth) + ([0.0] if accepted < depth else [])


class AcceptPredictor:
    """P(accepted | reached) per drafted position, learned online from verification."""

    wants_logits = False  # as a step observer it reads DecodeState.stop_feats only
    wants_hidden = False

    def __init__(
        self,
        threshold: float = 0.3,
        lr: float = 3e-2,
        every: int = 64,
        seed: int = 0,
        learn: bool = True,
    ) -> None:
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"early-stop threshold must be in [0, 1), got {threshold!r}")
        gen = torch.Generator().manual_seed(seed)
        self.net = decision_net()
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            self.net[2].bias.fill_(3.0)  # optimistic prior: draft everything at first
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.threshold = threshold
        self.every = every
        self._x: list[torch.Tensor] = []
        self._y: list[float] = []
        self.seen = 0  # labels learned from
        self.updates = 0
        self.learn = learn  # False: serve the registry's versions only (no local updates)
        self.version = 0

    @staticmethod
    def features(logits: torch.Tensor, depth: int) -> torch.Tensor:
        """``[a, V]`` draft logits of the position about to be drafted → ``[a, 4]``."""
        logp = torch.log_softmax(logits.detach().float(), dim=-1)
        p = logp.exp()
        top = p.topk(min(2, p.shape[-1]), dim=-1).values
        margin = top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0.0)
        ent = -(p * logp.clamp_min(-1e4)).sum(-1) / math.log(max(p.shape[-1], 2))
        d = torch.full_like(margin, depth / 8.0)
        return torch.stack([top[:, 0], margin, ent, d], dim=-1).cpu()

    @torch.no_grad()
    def prob(self, features: torch.Tensor) -> torch.Tensor:
        """``[a, 4]`` → ``[a]`` predicted acceptance."""
        return torch.sigmoid(self.net(features).squeeze(-1))

    def keep_going(self, features: torch.Tensor) -> torch.Tensor:
        """``[a]`` bool: draft this position (predicted acceptance ≥ threshold)."""
        return self.prob(features) >= self.threshold

    def cut(
        self, logits: torch.Tensor, depth: int, limits: list[int]
    ) -> tuple[torch.Tensor, list[int]]:
        """What a drafter asks before drafting ``depth`` (0-based) for ``a`` sequences:
        the features of their draft logits ``[a, V]`` there (kept for the labels), and
        ``limits`` (each sequence's drafted depth so far allowed) lowered to ``depth`` where
        the model predicts a rejection — never before depth 1.

        >>> m = AcceptPredictor(threshold=0.5)
        >>> m.cut(torch.zeros(2, 3), 0, [4, 4])[1], m.cut(torch.zeros(2, 3), 2, [4, 1])[1]
        ([4, 4], [4, 1])
        """
        f = self.features(logits, depth)
        if depth == 0:
            return f, list(limits)
        go = self.keep_going(f).tolist()
        return f, [lim if g else min(lim, depth) for lim, g in zip(limits, go, strict=True)]

    # -- as a step observer of the engine -------------------------------------------------
    def on_step(self, state, step, ledger=None) -> None:
        """Label the positions the drafter drafted for ``state`` this step and learn."""
        feats = getattr(state, "stop_feats", None)
        if feats is None or step.tree.size == 0:
            return
        self.observe(feats, stop_labels(step.tree.max_depth, step.accepted))

    def on_release(self, state) -> None:
        pass

    # -- weights (versioned by the registry) -----------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """A promoted version; labels gathered for a local update are dropped."""
        self.net.load_state_dict(state_dict, strict=True)
        self._x, self._y = [], []
        self.version = version

    def observe(self, features: torch.Tensor, labels: list[float]) -> None:
        """Positions a verification reached: their features ``[m, 4]`` and outcomes."""
        if not labels or not self.learn:
            return
        self._x.append(features[: len(labels)])
        self._y.extend(labels)
        if len(self._y) >= self.every:
            self._learn()

    def _learn(self) -> None:
        x = torch.cat(self._x)
        y = torch.tensor(self._y, dtype=torch.float32)
        self._x, self._y = [], []
        with torch.enable_grad(), torch.inference_mode(False):
            x, y = x.clone(), y.clone()
            for _ in range(8):
                self.opt.zero_grad()
                logit = self.net(x).squeeze(-1)
                loss = nn.functional.binary_cross_entropy_with_logits(logit, y)
                loss.backward()
                self.opt.step()
        self.seen += len(y)
        self.updates += 1
