"""What verifying n tokens costs relative to one decode step: c_verify(n) ÷ c(1).

Speculative decoding pays one target forward over ``n`` tokens (root + drafts) per step;
the speedup it allows is τ · c(1) / (c_verify(n) + c_draft). On a GPU c_verify(n) ≈ c(1)
for small n (memory-bound); on a CPU it grows with n. :func:`verify_costs` measures it
with the engine's own batch-1 forward (``osd.specdec.lean``) after a ``context``-token
prefix: the median of ``reps`` timed calls per n, each writing at the same positions, the
n interleaved round by round (so that drift in the machine's speed hits every n alike).
"""

from __future__ import annotations

import statistics
import time

import torch

from osd.specdec.lean import LeanLM


@torch.inference_mode()
def verify_costs(
    model, context: int = 200, ns: range = range(1, 18), reps: int = 7, warmup: int = 2
) -> dict:
    """``{"context", "c1_ms", "ms": {n: ms}, "ratio": {n: c_verify(n) / c(1)}}``."""
    lm = LeanLM(model)
    cache = lm.new_cache(slots=1, length=context + max(ns) + 1)
    cache.reserve(context + max(ns) + 1)
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    slots = torch.zeros(1, dtype=torch.long)
    ids = torch.randint(0, vocab, (1, context + max(ns)), generator=gen)
    pos = torch.arange(context)[None]
    col = torch.arange(context)
    lm.forward(cache, slots, ids[:, :context], pos, pos, (col[None, :] <= col[:, None])[None])
    calls = {}
    for n in ns:
        at = context + torch.arange(n)[None]
        c = torch.arange(context + n)
        mask = (c[None, :] <= (context + torch.arange(n))[:, None])[None]  # causal chain
        calls[n] = (ids[:, context : context + n], at, mask)
    times: dict[int, list[float]] = {n: [] for n in ns}
    for r in range(warmup + reps):
        for n in ns:
            x, at, mask = calls[n]
            start = time.perf_counter()
            lm.forward(cache, slots, x, at, at, mask)
            if r >= warmup:
                times[n].append(time.perf_counter() - start)
    ms = {n: 1e3 * statistics.median(times[n]) for n in ns}
    c1 = ms[min(ns)]
    return {
        "context": context,
        "c1_ms": c1,
        "ms": ms,
        "ratio": {n: v / c1 for n, v in ms.items()},
    }
