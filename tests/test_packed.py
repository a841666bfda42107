"""The packed oneDNN linear (osd/specdec/packed.py) computes F.linear, and never serves a
stale copy: a weight changed in place — a hot-swap's load_state_dict into a merged q/k/v
view, an optimiser step — is packed again before the next forward."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import osd.specdec.packed as packed
from osd.specdec.lean import LeanLM

needs_onednn = pytest.mark.skipif(not packed.available(), reason="no oneDNN in this build")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 17])
def test_linear_equals_f_linear(rows):
    gen = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    for x in (torch.randn(rows, 64, generator=gen), torch.randn(2, rows, 64, generator=gen)):
        with torch.no_grad():
            torch.testing.assert_close(packed.linear(x, w, b), F.linear(x, w, b))
            # a non-contiguous input (a transposed view)
            xt = x.transpose(0, -2).contiguous().transpose(0, -2)
            torch.testing.assert_close(packed.linear(xt, w), F.linear(x, w))


def test_autograd_falls_back_and_gradients_flow():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    packed.linear(x, lin.weight, lin.bias).sum().backward()
    assert lin.weight.grad is not None and x.grad is not None


def test_switched_off_by_env(monkeypatch):
    monkeypatch.setenv("OSD_PACKED_LINEAR", "0")
    monkeypatch.setattr(packed, "_AVAILABLE", None)
    assert not packed.available()
    monkeypatch.setattr(packed, "_AVAILABLE", None)  # the next caller checks again


def _tiny(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def _lean_logits(lm, ids):
    cache = lm.new_cache(slots=1, length=32)
    cache.reserve(len(ids))
    t = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    col = torch.arange(len(ids))
    mask = (col[None, :] <= col[:, None])[None]
    logits, _ = lm.forward(cache, torch.zeros(1, dtype=torch.long), t, pos, pos, mask)
    return logits[0]


@needs_onednn
def test_hot_swap_in_place_is_seen_by_the_next_forward():
    """The served draft's weights are loaded in place (load_state_dict copies into the
    parameters, which are views of the merged q/k/v and gate/up weights): the lean forward
    must use the new weights, not the copy packed before the swap."""
    model, new = _tiny(0), _tiny(1)
    lm = LeanLM(model)
    ids = [3, 9, 27, 17, 51, 2]
    with torch.no_grad():
        ref_old, ref_new = model(torch.tensor([ids])).logits[0], new(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_lean_logits(lm, ids), ref_old, atol=1e-5, rtol=1e-4)
    model.load_state_dict(new.state_dict())
    torch.testing.assert_close(_lean_logits(lm, ids), ref_new, atol=1e-5, rtol=1e-4)
    # an optimiser step on one merged view (q_proj) only
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.zero_grad()
    model(torch.tensor([ids])).logits.sum().backward()
    for name, p in model.named_parameters():
        if "q_proj" not in name:
            p.grad = None
    opt.step()
    with torch.no_grad():
        ref_step = model(torch.tensor([ids])).logits[0]
    assert not torch.allclose(ref_step, ref_new, atol=1e-3)
    torch.testing.assert_close(_lean_logits(lm, ids), ref_step, atol=1e-5, rtol=1e-4)


@needs_onednn
def test_two_engines_over_one_model_share_merges_and_packed_copies():
    """A bench's methods (or a replica's decoders) each build a LeanLM over the same target:
    they share its merged weights, so running them in turn neither re-merges nor repacks."""
    model = _tiny(0)
    a, b = LeanLM(model), LeanLM(model)
    ids = [3, 9, 27, 17]
    _lean_logits(a, ids)
    held = {k: v[1] for k, v in packed._PACKED.items()}
    merged = dict(a._merged)
    _lean_logits(b, ids)
    _lean_logits(a, ids)
    assert all(a._merged[k] is m for k, m in merged.items())
    assert all(packed._PACKED[k][1] is p for k, p in held.items() if k in packed._PACKED)
