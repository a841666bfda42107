"""The CPU attention kernel (osd.kernels.cpu_attention): SDPA's results, batch invariance,
and the lean forward's logits with and without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from osd.kernels import cpu_attention

needs_kernel = pytest.mark.skipif(
    not cpu_attention.available(), reason=f"kernel off: {cpu_attention.why_off()}"
)


def _sdpa(q, k, v, mask, scale):
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=True
    )
    return o.transpose(1, 2)


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 2, 3])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3)])
def test_kernel_equals_sdpa_on_cache_views_and_tree_masks(tokens, heads, kv_heads):
    gen = torch.Generator().manual_seed(tokens * 10 + heads)
    b, d, cap, length = 5, 24, 40, 31
    kc = torch.randn(8, kv_heads, cap, d, generator=gen)  # a cache: slots × positions
    vc = torch.randn(8, kv_heads, cap, d, generator=gen)
    k, v = kc[2 : 2 + b, :, :length], vc[2 : 2 + b, :, :length]  # views, not copies
    q = torch.randn(b, tokens, heads + 2 * kv_heads, d, generator=gen)[:, :, :heads]  # strided
    mask = torch.rand(b, tokens, length, generator=gen) < 0.6  # ragged, tree-like holes
    mask[..., 0] = True
    out = cpu_attention._module.attend(q, k, v, mask, d**-0.5)
    assert out.shape == (b, tokens, heads, d) and out.is_contiguous()
    torch.testing.assert_close(out, _sdpa(q, k, v, mask, d**-0.5), atol=2e-6, rtol=1e-5)


@needs_kernel
def test_a_rows_result_does_not_depend_on_its_batch():
    """Batch invariance: a sequence alone equals the same sequence in a batch of longer
    ones (a longer cache view, padding in its mask), bit for bit."""
    gen = torch.Generator().manual_seed(0)
    d = 16
    k, v = torch.randn(3, 2, 50, d, generator=gen), torch.randn(3, 2, 50, d, generator=gen)
    q = torch.randn(3, 1, 2, d, generator=gen)
    mask = torch.zeros(3, 1, 50, dtype=torch.bool)
    mask[0, :, :20], mask[1, :, :50], mask[2, :, :35] = True, True, True
    batched = cpu_attention._module.attend(q, k, v, mask, 0.25)
    alone = cpu_attention._module.attend(
        q[:1], k[:1, :, :20], v[:1, :, :20], mask[:1, :, :20].contiguous(), 0.25
    )
    assert torch.equal(batched[:1], alone)


@needs_kernel
def test_bad_input_is_refused_with_the_reason():
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 2, 4, 8)
    mask = torch.ones(1, 1, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_attention._module.attend(q.double(), k.double(), k.double(), mask, 1.0)
    with pytest.raises(RuntimeError, match="mask"):
        cpu_attention._module.attend(q, k, k, mask[..., :3], 1.0)


@needs_kernel
def test_lean_forward_logits_with_and_without_the_kernel():
    from transformers import LlamaConfig, LlamaForCausalLM

    from osd.specdec.lean import LeanLM, causal_mask, prefill

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    lm = LeanLM(LlamaForCausalLM(cfg).eval())
    cache = lm.new_cache(slots=3)
    cache.reserve(32)
    for _ in range(3):
        cache.alloc()
    lens = torch.tensor([5, 9, 2])
    prefill(lm, cache, [0, 1, 2], [list(range(3, 3 + int(n))) for n in lens])
    ids = torch.tensor([[7], [8], [9]])
    pos = lens[:, None]
    mask = causal_mask(lens, torch.ones(3, dtype=torch.long), int(lens.max()) + 1)
    slots = torch.arange(3)
    with_kernel, _ = lm.forward(cache, slots, ids, pos, pos, mask)
    with_sdpa, _ = lm.forward(cache, slots, ids, pos, pos, mask, kernel=False)
    torch.testing.assert_close(with_kernel, with_sdpa, atol=1e-5, rtol=1e-5)


def test_without_the_kernel_attend_is_sdpa(monkeypatch):
    """Where the build failed (or OSD_CPU_ATTENTION=0), ``attend`` runs SDPA."""
    monkeypatch.setattr(cpu_attention, "_state", "no compiler (test)")
    assert not cpu_attention.available() and cpu_attention.why_off() == "no compiler (test)"
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(s, generator=gen) for s in [(2, 1, 4, 8), (2, 2, 6, 8), (2, 2, 6, 8)])
    mask = torch.ones(2, 1, 6, dtype=torch.bool)
    mask[0, :, 3:] = False
    assert torch.equal(cpu_attention.attend(q, k, v, mask, 0.3), _sdpa(q, k, v, mask, 0.3))


def test_a_build_lock_left_by_a_killed_process_is_cleared(monkeypatch, tmp_path):
    """A process killed mid-build leaves ``lock`` behind; torch's loader would wait on it
    forever. An old one is removed before building; a fresh one (a build in progress) is
    left alone."""
    import os
    import time

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: tmp_path)
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw["name"]) or "built")
    lock = tmp_path / "lock"
    lock.write_text("")
    assert cpu_attention._build() == "built" and lock.exists()  # fresh: another build's
    old = time.time() - cpu_attention.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    assert cpu_attention._build() == "built" and not lock.exists()
    assert calls == [cpu_attention._name()] * 2


@needs_kernel
def test_kernel_or_sdpa_is_chosen_per_batch_bucket_from_timed_forwards(monkeypatch):
    monkeypatch.setattr(cpu_attention, "_CHOICES", {})
    monkeypatch.setenv("OSD_CPU_ATTENTION", "1")  # forced: the kernel, nothing kept or timed
    forced = cpu_attention.choice(4, 2, 8, batch=3)
    assert forced.next() and not forced.trying() and cpu_attention._CHOICES == {}
    monkeypatch.delenv("OSD_CPU_ATTENTION")
    one = cpu_attention.choice(4, 2, 8, batch=2)
    assert one is cpu_attention.choice(4, 2, 8, batch=1)  # one bucket, one choice
    assert one is not cpu_attention.choice(4, 2, 8, batch=30)
    tried = []
    while one.trying():  # SDPA timed faster: SDPA from then on
        tried.append(one.next())
        one.record(tried[-1], 2.0 if tried[-1] else 1.0)
    assert tried == [True, False] * cpu_attention.Choice.TRIALS
    assert one.kernel is False and not one.next()


@needs_kernel
def test_a_lean_forward_times_its_trials_and_then_keeps_the_choice(monkeypatch):
    """Trial forwards alternate kernel and SDPA (the same logits either way), then the
    choice holds and nothing more is timed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from osd.specdec.lean import LeanLM, prefill

    monkeypatch.setattr(cpu_attention, "_CHOICES", {})
    monkeypatch.delenv("OSD_CPU_ATTENTION", raising=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    lm = LeanLM(LlamaForCausalLM(cfg).eval())
    cache = lm.new_cache(slots=1)
    cache.reserve(32)
    cache.alloc()
    prefill(lm, cache, [0], [[3, 9, 27, 17]])
    slot, step, at = torch.zeros(1, dtype=torch.long), torch.tensor([[5]]), torch.tensor([[4]])
    see = torch.ones(1, 1, 5, dtype=torch.bool)
    outs = [
        lm.forward(cache, slot, step, at, at, see)[0]
        for _ in range(2 * cpu_attention.Choice.TRIALS + 2)
    ]
    made = cpu_attention.choice(lm.heads, lm.kv_heads, lm.head_dim, 1)
    assert not made.trying()
    assert [len(t) for t in made.times.values()] == [cpu_attention.Choice.TRIALS] * 2
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)
