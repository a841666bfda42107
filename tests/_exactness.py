"""Helpers shared by the head drafters' tests: batched decoding, the chi-square of the
first two sampled tokens, a short stream of records (not a test module).

Sample size of the chi-square tests (``N_EXACT``, power). The statistic is compared at
α = 1e-3 against the target's exact joint of the first two tokens (T = 1, top-k 8: 64
pairs; cells with expected count < 5 pooled, 32 degrees of freedom at n = 600). A sampler
whose joint differs from the target's by Cohen's w² = Σ (p' - p)² / p gives a statistic
distributed as a noncentral chi-square with λ = n w². The subtlest wrong sampler the suite
knows, test_mcsd's negative control (acceptance reads the recomputed target row instead of
the kept residual), has w² ≈ 0.12 (X² = 90 on 29 df at n = 500); ReDrafter's control
(beams labelled as sampled, test_recurrent) has w² ≈ 6.8. Power at α = 1e-3:

    n       df   power vs w² = 0.12   w² detected with 90 % power
    300     17   0.83                 0.137
    500     29   0.98                 0.098
    600     32   0.994                0.085
    1200    46   1.000                0.048
    2000    57   1.000                0.031

``N_EXACT = 600`` keeps the power against a bias the size of the subtlest known one at
0.99 (the tests used 1000 to 2000 before, which only adds power against biases smaller
than any the suite has a control for). The controls still run and still fail: test_mcsd's
at n = 500, test_recurrent's at n = 300 (its X² is in the thousands). Draws are seeded
(sequence i gets seed i), so every result is deterministic.
"""

from __future__ import annotations

import torch
from scipy.stats import chisquare

from osd.distill.collect import RecordCollector
from osd.distill.record import LogConfig, LogMode
from osd.specdec.engine import SpeculativeDecoder
from osd.specdec.sampling import SamplingParams, warp_probs
from osd.workloads.datasets import DOMAINS, load_domain


def decode_all(dec, prompts, budget, sampling=None):
    """All prompts in one batch (one prefill; each released when done); per-state stats.
    ``sampling(i)``: the i-th request's parameters (default greedy)."""
    samplings = [sampling(i) for i in range(len(prompts))] if sampling else None
    states, stats = dec.decode_batch(prompts, budget, samplings)
    assert dec.cache.used == 0
    return states, stats


def greedy_tau(dec, cases, budget: int = 16) -> float:
    """Decode ``cases`` (prompt ids, HF greedy reference) as one batch; assert each output
    equals its reference; return τ over them all."""
    from osd.specdec.engine import DecodeStats

    states, stats = decode_all(dec, [c[0] for c in cases], budget)
    for s, (_, ref) in zip(states, cases, strict=True):
        assert s.tokens[s.prompt_len :] == ref
    total = DecodeStats()
    for st in stats:
        total.merge(st)
    return total.tau


PROMPT = "Question: Tom has 3 apples"
N_EXACT = 600  # sequences a chi-square test draws (power: the module docstring)
BATCH = 300
SAMPLING = SamplingParams(temperature=1.0, top_k=8)


def first_two_joint(target, tok):
    """The prompt's ids and the target's exact joint of its first two sampled tokens
    (T = 1, top-k 8): ``{(x, y): q1(x) q2(y | x)}``."""
    ids = tok(PROMPT, add_special_tokens=False).input_ids
    with torch.inference_mode():
        q1 = warp_probs(target(torch.tensor([ids])).logits[0, -1], SAMPLING)
        firsts = q1.nonzero().flatten().tolist()
        q2 = warp_probs(target(torch.tensor([[*ids, x] for x in firsts])).logits[:, -1], SAMPLING)
    joint = {
        (x, y): float(q1[x] * q2[i, y])
        for i, x in enumerate(firsts)
        for y in q2[i].nonzero().flatten().tolist()
    }
    return ids, joint


def first_two_counts(dec, ids, n, batch):
    """Counts of the first two sampled tokens over ``n`` sequences (``batch`` at a time,
    each with its own seed; 3 new tokens each) and the draft tokens accepted."""
    counts, accepted = {}, 0
    for lo in range(0, n, batch):
        states, stats = decode_all(
            dec, [ids] * batch, 3, lambda i, lo=lo: SamplingParams(1.0, 8, seed=lo + i)
        )
        for s, st in zip(states, stats, strict=True):
            key = tuple(s.tokens[s.prompt_len : s.prompt_len + 2])
            counts[key] = counts.get(key, 0) + 1
            accepted += st.accepted
    return counts, accepted


def chi2_pvalue(counts, joint, n):
    """Chi-square p-value of ``counts`` (n draws) against ``joint``; cells with expected
    count < 5 pooled with the rest. A pair the target gives probability 0 fails at once."""
    assert set(counts) <= set(joint), "sampled a pair the target gives probability 0"
    big = [k for k, p in joint.items() if p * n >= 5]
    obs = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    exp = [joint[k] * n for k in big] + [n * (1 - sum(joint[k] for k in big))]
    return chisquare(obs, exp).pvalue


def chi2_first_two(target, tok, drafter, n=N_EXACT, batch=BATCH):
    """p-value of the first two sampled tokens through ``drafter``'s trees against the
    target's exact joint; the trees must be accepted sometimes."""
    ids, joint = first_two_joint(target, tok)
    counts, accepted = first_two_counts(SpeculativeDecoder(target, drafter, tok), ids, n, batch)
    assert accepted > 0, "the trees must be accepted sometimes for the test to mean anything"
    return chi2_pvalue(counts, joint, n)


def hidden_stream(target, tok, data_dir, drafter_id):
    """Records of a short greedy stream: 3 train prompts a domain, all positions logged
    with the target's hidden states."""
    col = RecordCollector(LogConfig(mode=LogMode.ALL, k=16, hidden=True))
    dec = SpeculativeDecoder(target, None, tok, observers=[col])
    recs = []
    for d in DOMAINS:
        for i, q in enumerate(load_domain(d, "train", data_dir)[:3]):
            ids = tok(q.prompt, add_special_tokens=False).input_ids[-40:]
            st = dec.start(ids, 24)
            while not st.finished:
                dec.step(st)
            dec.release(st)
            recs.append(col.finish(st, f"{d}{i}", drafter_id, 0, d))
    return [r for r in recs if r is not None]
