"""Attention of a few new tokens per sequence over the KV cache, on the CPU: a C++ kernel.

Why: a batched decode step attends one new token per sequence (a verification step a few)
over its cached keys and values. PyTorch's CPU ``scaled_dot_product_attention`` (the
flash kernel) runs each (sequence, head) pair as small matrix products with a fixed cost
per pair, so with 32 sequences × 4 heads × 161 cached positions (the zoo target at
concurrency 32) it takes ≈ 1.2 ms a layer, where streaming those keys and values from
memory once takes ≈ 0.45 ms. :file:`cpu_attention.cpp` reads each key and value row
once for all of a pair's ``T`` new tokens with vectorised dot products, skips masked
positions, and runs the pairs over PyTorch's intra-op threads. Measured (session script,
interleaved; ``python -m osd.kernels.cpu_attention`` prints the ``T`` = 1 case): at
``T`` = 1 it takes ≈ 0.6× of SDPA's time, at 2 ≈ 0.8×, at 3 ≈ 0.9×, at 5 ≈ 1.1× and at 9
≈ 1.6× (one dot product per query and key costs more than SDPA's matrix products once
there are several queries), so it runs up to :data:`MAX_TOKENS` new tokens.

Where: the lean forward's steps of at most :data:`MAX_TOKENS` new tokens per sequence on
fp32 CPU models (:meth:`osd.specdec.lean.LeanLM.forward`): plain decode at any batch,
short verifications and draft steps; prefill, longer trees and chains, other devices and
dtypes keep SDPA.

Which: where both run, the lean forward uses the one measured faster in its own forwards
(:class:`Choice`, per batch size bucket, once per process; which wins depends on the CPU
and the batch).

Build: compiled on first use (a lean forward's model load calls :func:`available`) with
``torch.utils.cpp_extension.load`` (a C++ compiler and ``ninja``; ≈ 35 s once, cached
under ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``, named by a hash of the
source, the torch version and this CPU's feature flags since it is built with
``-march=native``). Later processes import the built library directly, without the build's
file lock, and a lock left by a process killed mid-build is cleared after
:data:`STALE_LOCK_S`. Where the build fails, or ``OSD_CPU_ATTENTION=0``, SDPA runs instead
(with one warning giving the reason). The build is checked against SDPA before use.

Numerics: the same fp32 formula as SDPA (max-subtracted softmax); summation order
differs, so results agree to ~1e-6, and a row's result depends only on its own query,
keys, values and mask — not on the batch it runs in (batch invariance).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import platform
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_attention.cpp")
_lock = threading.Lock()
_module = None
_state: str | None = None  # None: not tried; "ok"; otherwise why it is off


def _name() -> str:
    """The build's name: a hash of the source, the torch version and this CPU's feature
    flags (it is built with ``-march=native``), so a changed source, another torch (its
    C++ ABI) or another CPU gets a build of its own."""
    key = platform.machine() + torch.__version__ + _SOURCE.read_text()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                key += line
                break
    except OSError:
        pass
    return "osd_cpu_attention_" + hashlib.sha1(key.encode()).hexdigest()[:12]


STALE_LOCK_S = 600.0  # a build lock older than this was left by a process killed mid-build


def _build():
    from torch.utils import cpp_extension

    name = _name()
    folder = Path(cpp_extension._get_build_directory(name, verbose=False))
    built = folder / f"{name}.so"
    if built.exists():  # built before: import it, without the build's lock (and ninja)
        spec = importlib.util.spec_from_file_location(name, built)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    lock = folder / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)  # else every later process would wait on it forever
    return cpp_extension.load(
        name=name,
        sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def _check(module) -> bool:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 4, 8, generator=gen)  # [b, T, H, D]
    k, v = torch.randn(3, 2, 5, 8, generator=gen), torch.randn(3, 2, 5, 8, generator=gen)
    mask = torch.rand(3, 2, 5, generator=gen) < 0.7
    mask[..., 0] = True
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=mask[:, None], enable_gqa=True
    ).transpose(1, 2)
    return bool(torch.allclose(module.attend(q, k, v, mask, 8**-0.5), ref, atol=1e-5))


def available() -> bool:
    """Is the kernel built (building it on the first call) and correct here?"""
    global _module, _state
    if _state is None:
        with _lock:
            if _state is None:
                if os.environ.get("OSD_CPU_ATTENTION", "1") == "0":
                    _state = "OSD_CPU_ATTENTION=0"
                else:
                    try:
                        module = _build()
                        _state = "ok" if _check(module) else "it disagrees with SDPA"
                        _module = module if _state == "ok" else None
                    except Exception as err:  # no compiler, no ninja, a failed build
                        _state = f"{type(err).__name__}: {str(err).strip()[:300]}"
                if _state not in ("ok", "OSD_CPU_ATTENTION=0"):
                    log.warning("CPU attention kernel off (SDPA instead): %s", _state)
    return _state == "ok"


def why_off() -> str | None:
    """Why the kernel is not used (``None`` when it is, or before the first check)."""
    return None if _state in (None, "ok") else _state


MAX_TOKENS = 3  # new tokens per sequence up to which the kernel beats SDPA (see above)


def applies(q: torch.Tensor, tokens: int = 1) -> bool:
    """Does the kernel run a forward of ``tokens`` new tokens per sequence with these
    queries (fp32 on the CPU, no autograd, at most :data:`MAX_TOKENS`)?"""
    return (
        tokens <= MAX_TOKENS
        and q.device.type == "cpu"
        and q.dtype == torch.float32
        and not (torch.is_grad_enabled() and q.requires_grad)
        and available()
    )


class Choice:
    """Kernel or SDPA for one (attention shapes, thread count, batch bucket), decided from
    the forwards themselves: the first :attr:`TRIALS` × 2 forwards that can use the kernel
    alternate between the two and time their attention calls; then the one with the lower
    median runs. ``kernel`` is ``None`` while trying.

    Why in the forwards and not in a separate timing: which one wins depends on the CPU,
    the batch and what the forward's other work leaves in the caches. On one 2-core machine
    of this project the kernel took 0.6–0.7× SDPA's time at batch 32; on another it was
    faster at batch 1 in a forward (0.19 vs 0.24 ms for 8 layers), level at 8 and slower
    at 32 (5.9–6.0 vs 5.3–5.4 ms), although timed alone on hot data it won at every batch.

    >>> c = Choice()
    >>> c.next(), c.trying()  # the kernel first, then they alternate
    (True, True)
    >>> for i in range(2 * Choice.TRIALS):
    ...     c.record(c.next(), 1.0 if c.next() else 2.0)
    >>> c.kernel, c.next(), c.trying()
    (True, True, False)
    """

    TRIALS = 8

    def __init__(self, kernel: bool | None = None, label: str = "") -> None:
        self.kernel = kernel
        self.label = label
        self.times: dict[bool, list[float]] = {True: [], False: []}

    def trying(self) -> bool:
        return self.kernel is None

    def next(self) -> bool:
        """Run the kernel in this forward?"""
        if self.kernel is not None:
            return self.kernel
        return len(self.times[True]) <= len(self.times[False])

    def record(self, kernel: bool, seconds: float) -> None:
        """A trial forward's attention time with the kernel (or SDPA)."""
        if self.kernel is not None:
            return
        self.times[kernel].append(seconds)
        if min(len(t) for t in self.times.values()) >= self.TRIALS:
            med = {k: sorted(t)[len(t) // 2] for k, t in self.times.items()}
            self.kernel = med[True] <= med[False]
            log.info(
                "CPU attention (%s): kernel %.3f ms, SDPA %.3f ms a forward: %s",
                self.label,
                1e3 * med[True],
                1e3 * med[False],
                "kernel" if self.kernel else "SDPA",
            )


BATCHES = (1, 4, 12, 32)  # batch buckets: a batch takes the choice of the nearest (log scale)
_CHOICES: dict[tuple, Choice] = {}


def _bucket(batch: int) -> int:
    """The bucket nearest ``batch`` on a log scale (ties: the smaller).

    >>> [_bucket(b) for b in (1, 2, 3, 8, 16, 20, 32, 256)]
    [1, 1, 4, 12, 12, 32, 32, 32]
    """
    b = max(1, batch)
    return min(BATCHES, key=lambda m: (abs(math.log(b / m)), m))


def choice(heads: int, kv_heads: int, head_dim: int, batch: int) -> Choice:
    """The :class:`Choice` for these attention shapes at about this batch size, one per
    process per thread count. ``OSD_CPU_ATTENTION=1``: always the kernel, nothing timed;
    the kernel unavailable (or ``=0``): always SDPA."""
    if not available():
        return Choice(kernel=False)
    if os.environ.get("OSD_CPU_ATTENTION") == "1":
        return Choice(kernel=True)
    key = (heads, kv_heads, head_dim, torch.get_num_threads(), _bucket(batch))
    made = _CHOICES.get(key)
    if made is None:
        label = f"{heads} heads over {kv_heads} of {head_dim}, batch ~{key[-1]}"
        made = _CHOICES[key] = Choice(label=label)
    return made


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """``q`` [b, T, H, D], ``k``/``v`` [b, KVH, L, D] (views), ``mask`` [b, T, L] bool →
    [b, T, H, D]: the kernel where :func:`applies`, else SDPA (same result to ~1e-6).

    >>> q, k, v = torch.randn(2, 1, 4, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    >>> mask = torch.tensor([[[1, 1, 1, 0, 0, 0]], [[1, 1, 1, 1, 1, 1]]], dtype=torch.bool)
    >>> out = attend(q, k, v, mask, 8**-0.5)
    >>> ref = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None],
    ...                                      enable_gqa=True).transpose(1, 2)
    >>> out.shape, torch.allclose(out, ref, atol=1e-5)
    (torch.Size([2, 1, 4, 8]), True)
    """
    if applies(q, q.shape[1]) and k.dtype == v.dtype == torch.float32:
        return _module.attend(q, k, v, mask.contiguous(), float(scale))
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k,
        v,
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[2],
    )
    return o.transpose(1, 2)


def _bench() -> None:  # python -m osd.kernels.cpu_attention
    import time

    b, h, d, cached, layers = 32, 4, 72, 161, 8  # the zoo target at concurrency 32
    print("kernel:", "on" if available() else f"off ({why_off()})")
    ks = [torch.randn(b, h, 256, d) for _ in range(layers)]
    vs = [torch.randn(b, h, 256, d) for _ in range(layers)]
    q = torch.randn(b, 1, h, d)
    mask = torch.ones(b, 1, cached, dtype=torch.bool)
    mask[::2, :, 150:] = False

    def kernel():
        for k, v in zip(ks, vs, strict=True):
            _module.attend(q, k[:, :, :cached], v[:, :, :cached], mask, d**-0.5)

    def sdpa():
        for k, v in zip(ks, vs, strict=True):
            F.scaled_dot_product_attention(
                q.transpose(1, 2), k[:, :, :cached], v[:, :, :cached], attn_mask=mask[:, None]
            )

    def stream():
        for k, v in zip(ks, vs, strict=True):
            k[:, :, :cached].sum(), v[:, :, :cached].sum()

    runs = {"sdpa": sdpa, "stream K+V": stream} | ({"kernel": kernel} if available() else {})
    times: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(5):  # interleaved rounds: the machine's speed drifts
        for name, fn in runs.items():
            fn()
            t = time.perf_counter()
            for _ in range(20):
                fn()
            times[name].append((time.perf_counter() - t) / 20 * 1e3)
    for name, ts in times.items():
        print(f"{name:>11}: {sorted(ts)[len(ts) // 2]:.2f} ms for {layers} layers (median of 5)")


if __name__ == "__main__":
    _bench()
