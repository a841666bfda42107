"""Sampling parameters and the logits warps shared by target-only and speculative sampling.

Terms:

- **logits**: unnormalised scores over the vocabulary, ``[..., V]``.
- **warp**: the transformation from logits to the distribution actually sampled from:
  temperature, then top-k, then top-p — the order and semantics of Hugging Face's
  ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and ``TopPLogitsWarper``:

  * temperature ``T``: ``logits / T`` (``T == 0`` means greedy, see below);
  * top-k ``k``: keep every token whose logit is ≥ the k-th largest logit (ties at the
    boundary are kept, so more than ``k`` tokens may survive); ``k == 0`` is off;
  * top-p ``P``: sort ascending, drop every token whose cumulative probability from the
    bottom is ≤ ``1 − P``; the most likely token is always kept. Equivalently, keep the
    smallest set of most likely tokens whose cumulative probability is ≥ ``P``.
    ``P == 1`` is off.

- **greedy**: ``temperature == 0``; the warped distribution is the one-hot vector at the
  argmax (first index on ties, like ``torch.argmax``).

Speculative decoding applies the *same* warp to the target distribution ``q`` and to the
draft distribution ``p`` before acceptance (DESIGN §3), so that the accepted tokens follow
exactly the distribution target-only sampling with these parameters would produce.

Worked example (``V = 4``)::

    logits = [2.0, 1.0, 0.0, -1.0], SamplingParams(temperature=1.0, top_k=3, top_p=0.9)
    temperature 1.0   -> [2.0, 1.0, 0.0, -1.0]
    top-k 3           -> [2.0, 1.0, 0.0, -inf]          probs ≈ [0.665, 0.245, 0.090, 0]
    top-p 0.9         ascending cumsum [0, 0.090, 0.335, 1.0]; drop ≤ 0.1 -> token 2 goes
                      -> [2.0, 1.0, -inf, -inf]         probs ≈ [0.731, 0.269, 0, 0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "sample", "warp_logits", "warp_probs"]


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen.

    Attributes:
        temperature: softmax temperature; ``0.0`` means greedy (argmax).
        top_k: keep the ``top_k`` most likely tokens (ties kept); ``0`` turns it off.
        top_p: nucleus mass in ``(0, 1]``; ``1.0`` turns it off.
        seed: seed for this request's random generator; ``None`` uses a fresh generator.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float):
            raise ValueError(f"temperature must be a number, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 means greedy), "
                f"got {self.temperature!r}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an int (0 turns it off), got {self.top_k!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (``temperature == 0``)."""
        return self.temperature == 0.0

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator seeded with ``seed`` on ``device``, or ``None`` when no seed is set."""
        if self.seed is None:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        return generator


def _as_float(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are warped in float32 (as Hugging Face generation does)."""
    if logits.dtype in (torch.float32, torch.float64):
        return logits
    return logits.float()


def _top_k_mask(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mask out every logit below the ``top_k``-th largest; ties at the boundary survive."""
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [..., 1]
    return logits.masked_fill(logits < kth, -math.inf)


def _top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask out the tokens outside the nucleus of mass ``top_p``; the argmax always stays."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)  # [..., V]
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [..., V], ascending
    remove_sorted = cumulative <= (1.0 - top_p)
    remove_sorted[..., -1] = False  # keep at least the most likely token
    remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, -math.inf)


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, then top-k, then top-p over the last dim; removed tokens get -inf.

    Args:
        logits: ``[..., V]`` raw scores.
        params: the sampling parameters; for greedy ones the logits are returned unscaled
            (only their argmax matters).

    Returns:
        ``[..., V]`` warped logits (float32, or float64 if given float64).
    """
    logits = _as_float(logits)
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0:
        logits = _top_k_mask(logits, params.top_k)
    if params.top_p < 1.0:
        logits = _top_p_mask(logits, params.top_p)
    return logits


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution target-only sampling draws from: ``softmax(warp_logits(logits))``.

    Greedy parameters give the one-hot vector at the argmax.

    Args:
        logits: ``[..., V]`` raw scores.
        params: the sampling parameters.

    Returns:
        ``[..., V]`` probabilities, rows summing to 1.
    """
    logits = _as_float(logits)
    if params.greedy:
        argmax = logits.argmax(dim=-1, keepdim=True)  # [..., 1]
        return torch.zeros_like(logits).scatter_(-1, argmax, 1.0)
    return warp_logits(logits, params).softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row of ``probs``.

    Args:
        probs: ``[..., V]`` probabilities (rows need not be normalised, must be non-negative
            with a positive sum).
        generator: random generator on ``probs.device``; ``None`` uses the global one.

    Returns:
        ``[...]`` int64 token ids.
    """
    if probs.dim() == 0:
        raise ValueError("probs must have a vocabulary dimension, got a scalar")
    flat = probs.reshape(-1, probs.shape[-1])  # [rows, V]
    tokens = torch.multinomial(flat, num_samples=1, generator=generator)  # [rows, 1]
    return tokens.reshape(probs.shape[:-1])
