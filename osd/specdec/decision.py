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

__all__ = ["AcceptPredictor"]


class AcceptPredictor:
    """P(accepted | reached) per drafted position, learned online from verification."""

    def __init__(
        self, threshold: float = 0.3, lr: float = 3e-2, every: int = 64, seed: int = 0
    ) -> None:
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"early-stop threshold must be in [0, 1), got {threshold!r}")
        gen = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 1))
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

    def observe(self, features: torch.Tensor, labels: list[float]) -> None:
        """Positions a verification reached: their features ``[m, 4]`` and outcomes."""
        if not labels:
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
