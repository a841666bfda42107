"""Batched decoding keeps every promise of the serial engine: batched greedy = serial greedy
= HF greedy for every drafter and tree shape, with ragged prompts that finish at different
steps and sequences admitted mid-flight; seeded sampling is token-identical serial vs
batched; the ragged batched acceptance equals the one-tree rules."""

import pytest
import torch

from osd.drafters import build_drafter
from osd.models import load_model, load_tokenizer
from osd.specdec.accept import accept_greedy, accept_sampling
from osd.specdec.accept_batch import accept_greedy_batch, accept_sampling_batch
from osd.specdec.engine import DecodeStats, SpeculativeDecoder
from osd.specdec.rowcost import RowPadding
from osd.specdec.sampling import SamplingParams
from osd.specdec.tree import TokenTree, pad_trees
from osd.workloads.datasets import DOMAINS, load_domain

SHAPES = {
    "chain_k4": ("draft_model", {"k": 4}),
    "tree_4_2_2": ("draft_model", {"tree": "4,2,2"}),
    "tree_2_2_2_1": ("draft_model", {"tree": "2,2,2,1"}),
    "self_tree_3_2": ("self", {"tree": "3,2"}),  # the target as its own draft: α = 1
    "ngram_k4": ("ngram", {"k": 4}),
    "ngram_tree": ("ngram", {"k": 6, "nodes": 8}),  # with a history: tests/test_ngram.py
    "none": ("none", {}),
}


@pytest.fixture(scope="module")
def zoo():
    return load_model("zoo:target"), load_model("zoo:draft"), load_tokenizer("zoo:target")


@pytest.fixture(scope="module")
def cases(zoo, data_dir):
    """12 eval prompts of different lengths, each with its own budget (6..30 tokens) and
    its HF greedy reference (EOS kept: some stop early)."""
    target, _, tok = zoo
    out = []
    for i, d in enumerate((DOMAINS * 3)[:12]):  # the 12 used: no reference thrown away
        q = load_domain(d, "eval", data_dir)[i // len(DOMAINS)]
        ids = tok(q.prompt, add_special_tokens=False).input_ids[-(20 + 7 * i) :]
        budget = 6 + 2 * i
        ref = target.generate(
            torch.tensor([ids]),
            max_new_tokens=budget,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )[0, len(ids) :].tolist()
        out.append((ids, budget, ref))
    return out


def _decoder(zoo, shape):
    target, draft, tok = zoo
    name, opts = SHAPES[shape]
    if name == "self":
        return SpeculativeDecoder(target, build_drafter("draft_model", target, target, **opts), tok)
    return SpeculativeDecoder(target, build_drafter(name, target, draft, **opts), tok)


def _run_batched(dec, cases, sampling=None, admit_every=2, admit_n=3):
    """Continuous batching: admit ``admit_n`` new sequences (one batched prefill of ragged
    prompts) every ``admit_every`` steps, step all live ones together, release each as it
    finishes."""
    states: dict[int, object] = {}
    waiting = list(range(len(cases)))
    live: list[int] = []
    step = 0
    while waiting or live:
        if waiting and step % admit_every == 0:
            new, waiting = waiting[:admit_n], waiting[admit_n:]
            started = dec.start_batch(
                [cases[i][0] for i in new],
                [cases[i][1] for i in new],
                [sampling(i) if sampling else None for i in new],
            )
            states.update(zip(new, started, strict=True))
            live += new
        if live:
            dec.step_batch([states[i] for i in live])
            for i in [i for i in live if states[i].finished]:
                dec.release(states[i])
            live = [i for i in live if not states[i].finished]
        step += 1
    assert dec.cache.used == 0  # every slot given back
    return [states[i].tokens[states[i].prompt_len :] for i in range(len(cases))]


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(SHAPES))
def test_batched_greedy_equals_serial_and_hf(zoo, cases, shape):
    dec = _decoder(zoo, shape)
    serial = [dec.generate(ids, budget).tokens for ids, budget, _ in cases]
    batched = _run_batched(dec, cases)
    refs = [ref for _, _, ref in cases]
    assert serial == refs
    assert batched == refs


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["chain_k4", "tree_4_2_2", "ngram_k4", "ngram_tree"])
def test_seeded_sampling_is_batch_invariant(zoo, cases, shape):
    def sampling(i):
        return SamplingParams(temperature=0.8 + 0.1 * (i % 3), top_p=0.95, seed=100 + i)

    dec = _decoder(zoo, shape)
    serial = [
        dec.generate(ids, budget, sampling(i)).tokens for i, (ids, budget, _) in enumerate(cases)
    ]
    batched = _run_batched(dec, cases, sampling, admit_every=1)
    assert batched == serial
    # a mixed batch: greedy rows stay the target's greedy output beside sampled ones
    mixed = _run_batched(dec, cases, lambda i: sampling(i) if i % 2 else SamplingParams())
    assert [m for i, m in enumerate(mixed) if i % 2 == 0] == [
        ref for i, (_, _, ref) in enumerate(cases) if i % 2 == 0
    ]


@pytest.mark.parametrize("shape", ["ngram_k4", "tree_2_2_2_1"])
def test_padded_verification_changes_no_token(zoo, cases, shape):
    """Verification run at more rows than the trees need (osd.specdec.rowcost; forced
    here: every batch pads to 16 rows where it fits) gives the target's greedy output."""
    dec = _decoder(zoo, shape)
    dec.rows = RowPadding([10.0] * 15 + [1.0])
    assert dec.rows.rows(1, 2) == 16 and dec.rows.rows(2, 3) == 8
    assert _run_batched(dec, cases[:6]) == [ref for _, _, ref in cases[:6]]


def test_lean_forward_over_slots_out_of_order_equals_in_order():
    """A batch over a run of cache slots given out of order (the serving loop's admission
    order after compaction) is run in slot order and given back in the caller's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from osd.specdec.lean import LeanLM, causal_mask, prefill

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    lm = LeanLM(LlamaForCausalLM(cfg).eval())
    seqs = [[3, 4, 5, 6], [7, 8], [9, 10, 11]]
    outs = {}
    for order in ([0, 1, 2], [2, 0, 1]):
        cache = lm.new_cache(slots=3)
        cache.reserve(16)
        prefill(lm, cache, [0, 1, 2], seqs)
        starts = torch.tensor([len(seqs[i]) for i in order])
        ids = torch.tensor([[20 + i, 30 + i] for i in order])
        pos = starts[:, None] + torch.arange(2)
        mask = causal_mask(starts, torch.tensor([2, 2, 2]), int(starts.max()) + 2)
        logits, hidden = lm.forward(cache, torch.tensor(order), ids, pos, pos, mask, True)
        outs[tuple(order)] = (logits, hidden, [cache.k[0][i, :, :6].clone() for i in range(3)])
    (la, ha, ka), (lb, hb, kb) = outs[(0, 1, 2)], outs[(2, 0, 1)]
    assert torch.allclose(lb, la[[2, 0, 1]], atol=1e-5)
    assert torch.allclose(hb, ha[[2, 0, 1]], atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ka, kb, strict=True))


def test_step_batch_refuses_finished_sequences(zoo):
    dec = _decoder(zoo, "chain_k4")
    state = dec.start([5, 6, 7], 1)
    dec.step_batch([state], [DecodeStats()])
    assert state.finished
    with pytest.raises(RuntimeError, match="finished or released"):
        dec.step_batch([state])
    dec.release(state)
    dec.release(state)  # idempotent
    assert dec.cache.used == 0 and dec.drafter.cache.used == 0


def _random_trees(gen: torch.Generator, count: int, vocab: int) -> list[TokenTree]:
    trees = []
    for _ in range(count):
        n = int(torch.randint(0, 7, (1,), generator=gen))
        parents = [int(torch.randint(-1, j, (1,), generator=gen)) if j else -1 for j in range(n)]
        tokens = torch.randperm(vocab, generator=gen)[:n].tolist()  # distinct siblings
        trees.append(TokenTree.from_parents(tokens, parents))
    return trees


@pytest.mark.parametrize("stochastic", [False, True])
def test_ragged_batch_acceptance_equals_one_tree_rules(stochastic):
    gen = torch.Generator().manual_seed(3)
    vocab, count = 9, 64
    trees = _random_trees(gen, count, vocab)
    tokens, parents = pad_trees(trees)
    n = tokens.shape[1]
    q = torch.rand(count, n + 1, vocab, generator=gen, dtype=torch.float64) ** 3
    q /= q.sum(-1, keepdim=True)
    p = torch.rand(count, n, vocab, generator=gen, dtype=torch.float64) if stochastic else None
    if p is not None:
        p /= p.sum(-1, keepdim=True)
    u = torch.rand(count, n + 1, generator=gen, dtype=torch.float64)
    # row b's final uniform sits at its own size, as the one-tree function reads it
    batch = accept_sampling_batch(tokens, parents, q, p, True, uniforms=u).unbind()
    greedy = accept_greedy_batch(tokens, parents, q.argmax(-1)).unbind()
    for b, tree in enumerate(trees):
        m = tree.size
        uu = torch.cat([u[b, :m], u[b, m : m + 1]])
        one = accept_sampling(
            tree.tokens,
            tree.parents,
            q[b, : m + 1],
            None if p is None else p[b, :m],
            True,
            uniforms=uu,
        )
        assert batch[b] == one
        assert greedy[b] == accept_greedy(tree.tokens, tree.parents, q[b, : m + 1].argmax(-1))


def test_doctests():
    """The worked examples of osd.specdec.lean (causal_mask, batched prefill) and of the
    draft model's sliced tree masks."""
    import doctest

    import osd.drafters.draft_model as draft_model
    import osd.specdec.lean as lean

    assert doctest.testmod(lean).failed == 0
    assert doctest.testmod(draft_model).failed == 0
