"""Sparse-target distillation losses vs dense references built from full distributions."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from osd.distill import losses
from osd.distill.losses import (
    LOSS_NAMES,
    SparseTarget,
    bucket_logprobs,
    distill_loss,
    expected_acceptance,
    jsd,
    reduce_loss,
    target_bucket_logprobs,
)

TEMPERATURES = (0.5, 1.0, 2.0)


# ---- helpers: a sparse target from a dense one, and the dense references -----------------


def sparse_from_dense(target_logits: torch.Tensor, k: int) -> SparseTarget:
    """Log what a replica would: top-k of log_softmax(logits) at T = 1, plus the tail."""
    logq = torch.log_softmax(target_logits, dim=-1)  # [m, V]
    top = logq.topk(k, dim=-1)
    rest = logq.scatter(1, top.indices, -torch.inf)
    return SparseTarget(top.indices, top.values, torch.logsumexp(rest, dim=-1))


def dense_losses(p: torch.Tensor, q: torch.Tensor, beta: float = 0.5) -> dict[str, torch.Tensor]:
    """Each divergence written out plainly over full distributions p (draft), q (target)."""
    mu = beta * q + (1 - beta) * p
    return {
        "fkl": F.kl_div(p.log(), q, reduction="none").sum(-1),  # Σ q (log q − log p)
        "rkl": F.kl_div(q.log(), p, reduction="none").sum(-1),  # Σ p (log p − log q)
        "jsd": beta * (q * (q / mu).log()).sum(-1) + (1 - beta) * (p * (p / mu).log()).sum(-1),
        "tvd": 0.5 * (q - p).abs().sum(-1),
        "acc": torch.minimum(p, q).sum(-1),
    }


def bucketed(dist: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Full distribution [m, V] -> (dist[ids], 1 − Σ dist[ids]) [m, k + 1], the obvious way."""
    head = dist.gather(1, ids)
    return torch.cat([head, 1 - head.sum(-1, keepdim=True)], dim=1)


def all_losses(draft_logits, target, temperature=1.0, beta=0.5) -> dict[str, torch.Tensor]:
    out = {
        name: distill_loss(
            name, draft_logits, target, temperature=temperature, beta=beta, reduction="none"
        )
        for name in LOSS_NAMES
    }
    out["acc"] = expected_acceptance(draft_logits, target, temperature)
    return out


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)


# ---- the worked example ----------------------------------------------------------------


def test_module_docstring_example():
    result = doctest.testmod(losses)
    assert result.attempted > 0 and result.failed == 0


def test_worked_example_upper_bound_is_strict():
    # q = (.5, .3, .2, 0); the draft puts its tail mass on token 3, the target on token 2.
    target = SparseTarget(
        torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.3]]).log(), torch.tensor([0.2]).log()
    )
    draft = torch.tensor([[0.5, 0.3, 0.0, 0.2]]).log()
    true_acceptance = torch.minimum(draft.softmax(-1), torch.tensor([[0.5, 0.3, 0.2, 0.0]]))
    assert true_acceptance.sum().item() == pytest.approx(0.8)
    assert expected_acceptance(draft, target).item() == pytest.approx(1.0)
    for name in ("fkl", "rkl", "jsd", "tvd"):
        assert distill_loss(name, draft, target).item() == pytest.approx(0.0, abs=1e-6)


# ---- exactness ------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_exact_when_k_equals_vocab(temperature):
    g = torch.Generator().manual_seed(0)
    m, vocab = 5, 17
    draft_logits = 2 * torch.randn(m, vocab, generator=g)
    target_logits = 2 * torch.randn(m, vocab, generator=g)
    target = sparse_from_dense(target_logits, vocab)
    assert torch.isneginf(target.tail_logmass).all()

    p = torch.softmax(draft_logits.double() / temperature, -1)
    q = torch.softmax(target_logits.double() / temperature, -1)  # tempered from the logits
    got = all_losses(draft_logits, target, temperature)
    for name, ref in dense_losses(p, q).items():
        close(got[name], ref)
    ce = F.cross_entropy(draft_logits.double() / temperature, q.argmax(-1), reduction="none")
    close(got["ce"], ce)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_bucketed_losses_equal_dense_losses_between_bucketed_distributions(beta):
    g = torch.Generator().manual_seed(1)
    m, vocab, k = 6, 23, 4
    draft_logits = torch.randn(m, vocab, generator=g)
    target_logits = 3 * torch.randn(m, vocab, generator=g)
    target = sparse_from_dense(target_logits, k)

    p = bucketed(torch.softmax(draft_logits.double(), -1), target.topk_ids)
    q = bucketed(torch.softmax(target_logits.double(), -1), target.topk_ids)
    got = all_losses(draft_logits, target, beta=beta)
    for name, ref in dense_losses(p, q, beta).items():
        close(got[name], ref)
    # hard-label CE on the buckets is CE on the target's greedy token over the whole vocab
    greedy = target_logits.argmax(-1)
    close(got["ce"], F.cross_entropy(draft_logits.double(), greedy, reduction="none"))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_with_tail_keeps_tail_share_and_retempers_top_k(temperature):
    g = torch.Generator().manual_seed(2)
    m, vocab, k = 4, 19, 5
    draft_logits = torch.randn(m, vocab, generator=g)
    target_logits = 2 * torch.randn(m, vocab, generator=g)
    target = sparse_from_dense(target_logits, k)

    q1 = bucketed(torch.softmax(target_logits.double(), -1), target.topk_ids)  # T = 1
    head = q1[:, :k] ** (1 / temperature)  # exact ratios among the top-k at T
    head = head / head.sum(-1, keepdim=True) * (1 - q1[:, k:])  # share 1 − q_tail kept
    q_t = torch.cat([head, q1[:, k:]], dim=1)
    close(target_bucket_logprobs(target, temperature).exp(), q_t)

    # the draft side is exact at any T; the losses are the dense ones on these buckets
    p_t = bucketed(torch.softmax(draft_logits.double() / temperature, -1), target.topk_ids)
    log_p, _ = bucket_logprobs(draft_logits, target, temperature)
    close(log_p.exp(), p_t)
    got = all_losses(draft_logits, target, temperature)
    for name, ref in dense_losses(p_t, q_t).items():
        close(got[name], ref)


def test_draft_tail_is_stable_for_tiny_tails():
    # 1 − Σ p would round to 0 in float32; the masked logsumexp keeps the tail's log-mass
    draft_logits = torch.tensor([[0.0, 0.0, -40.0, -40.0]])
    target = SparseTarget(
        torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]).log(), torch.tensor([-torch.inf])
    )
    log_p, _ = bucket_logprobs(draft_logits, target)
    assert log_p[0, 2].item() == pytest.approx(-40.0, abs=1e-4)  # log(2e-40 / 2)


def test_double_precision_is_kept():
    target = sparse_from_dense(torch.randn(3, 7, dtype=torch.float64), 3)
    log_p, log_q = bucket_logprobs(torch.randn(3, 7, dtype=torch.float64), target)
    assert log_p.dtype == log_q.dtype == torch.float64


def test_half_precision_logits_are_upcast():
    target = sparse_from_dense(torch.randn(3, 7), 3)
    loss = distill_loss("fkl", torch.randn(3, 7).to(torch.bfloat16), target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ---- gradients, zeros, one-hot targets ---------------------------------------------------


def one_hot_target(m: int, vocab: int, k: int) -> SparseTarget:
    """Every row: all mass on one token (log-probs 0, -inf, ...), empty tail."""
    ids = torch.stack(
        [torch.randperm(vocab, generator=torch.Generator().manual_seed(i))[:k] for i in range(m)]
    )
    logprobs = torch.full((m, k), -torch.inf)
    logprobs[:, 0] = 0.0
    return SparseTarget(ids, logprobs, torch.full((m,), -torch.inf))


@pytest.mark.parametrize("k", [3, 9])  # k < V and k = V
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("scale", [1.0, 100.0])  # ordinary and extreme draft logits
def test_gradients_finite_with_one_hot_targets_and_zeros(k, temperature, scale):
    g = torch.Generator().manual_seed(3)
    vocab = 9
    for target in (one_hot_target(4, vocab, k), sparse_from_dense(torch.randn(4, vocab), k)):
        for name in LOSS_NAMES:
            logits = (scale * torch.randn(4, vocab, generator=g)).requires_grad_()
            loss = distill_loss(name, logits, target, temperature=temperature)
            (grad,) = torch.autograd.grad(loss, logits)
            assert torch.isfinite(loss), (name, loss)
            assert torch.isfinite(grad).all(), (name, grad)


def test_gradients_match_finite_differences():
    target = sparse_from_dense(torch.randn(2, 5, dtype=torch.float64), 3)
    for name in LOSS_NAMES:
        logits = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)

        def fn(x, name=name):
            return distill_loss(name, x, target, temperature=0.7, beta=0.3)

        assert torch.autograd.gradcheck(fn, (logits,), fast_mode=True)


def test_jsd_reaches_log_2_on_disjoint_supports():
    log_q = torch.tensor([[0.0, -torch.inf]])
    log_p = torch.tensor([[-torch.inf, 0.0]])
    assert jsd(log_p, log_q).item() == pytest.approx(math.log(2))


# ---- properties ------------------------------------------------------------------------


def binary_entropy(beta: float) -> float:
    return -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)


@st.composite
def problems(draw):
    m = draw(st.integers(1, 3))
    vocab = draw(st.integers(2, 10))
    k = draw(st.integers(1, vocab))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    g = torch.Generator().manual_seed(seed)
    draft_logits = scale * torch.randn(m, vocab, generator=g)
    target_logits = scale * torch.randn(m, vocab, generator=g)
    return draft_logits, target_logits, k


@settings(deadline=None, max_examples=50)
@given(problems(), st.sampled_from(TEMPERATURES), st.floats(0.05, 0.95))
def test_loss_ranges(problem, temperature, beta):
    draft_logits, target_logits, k = problem
    target = sparse_from_dense(target_logits, k)
    got = all_losses(draft_logits, target, temperature, beta)
    for name, value in got.items():
        assert torch.isfinite(value).all(), name
        assert (value >= -1e-6).all(), (name, value)
    assert (got["tvd"] <= 1 + 1e-6).all()
    assert (got["jsd"] <= binary_entropy(beta) + 1e-6).all()
    assert (got["jsd"] <= math.log(2) + 1e-6).all()
    close(got["acc"], 1 - got["tvd"])

    log_p, log_q = bucket_logprobs(draft_logits, target, temperature)
    close(jsd(log_p, log_q, 0.5), jsd(log_q, log_p, 0.5))  # symmetric at β = 0.5
    close(jsd(log_p, log_q, beta), jsd(log_q, log_p, 1 - beta))


@settings(deadline=None, max_examples=50)
@given(problems(), st.sampled_from(TEMPERATURES))
def test_zero_when_draft_equals_target(problem, temperature):
    draft_logits, _, k = problem
    vocab = draft_logits.shape[1]
    if k < vocab:
        temperature = 1.0  # with a tail, the target is re-tempered approximately
    target = sparse_from_dense(draft_logits, k)
    got = all_losses(draft_logits, target, temperature)
    for name in ("fkl", "rkl", "jsd", "tvd"):
        torch.testing.assert_close(got[name], torch.zeros_like(got[name]), atol=1e-5, rtol=0)
    torch.testing.assert_close(got["acc"], torch.ones_like(got["acc"]), atol=1e-5, rtol=0)


@settings(deadline=None, max_examples=50)
@given(problems())
def test_expected_acceptance_bounds_true_acceptance(problem):
    draft_logits, target_logits, k = problem
    target = sparse_from_dense(target_logits, k)
    p = torch.softmax(draft_logits.double(), -1)
    q = torch.softmax(target_logits.double(), -1)
    true = torch.minimum(p, q).sum(-1)
    estimate = expected_acceptance(draft_logits, target).double()
    assert (estimate >= true - 1e-6).all()
    if k == draft_logits.shape[1]:
        close(estimate, true)


# ---- reductions and bad input -----------------------------------------------------------


def test_reduce_loss():
    loss = torch.tensor([1.0, 2.0, 6.0])
    assert reduce_loss(loss).item() == 3.0
    assert reduce_loss(loss, "sum").item() == 9.0
    assert reduce_loss(loss, "none") is loss
    assert reduce_loss(torch.zeros(0)).item() == 0.0  # not NaN
    with pytest.raises(ValueError, match="reduction"):
        reduce_loss(loss, "max")  # type: ignore[arg-type]


def test_no_positions():
    target = SparseTarget(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), torch.zeros(0))
    for name in LOSS_NAMES:
        assert distill_loss(name, torch.zeros(0, 5), target).item() == 0.0


def _good() -> tuple[torch.Tensor, SparseTarget]:
    return torch.zeros(2, 5), sparse_from_dense(torch.randn(2, 5), 3)


def _with(**changes) -> SparseTarget:
    fields = vars(_good()[1]) | changes
    return SparseTarget(**fields)


@pytest.mark.parametrize(
    ("draft_logits", "target", "match"),
    [
        (torch.zeros(10), _good()[1], r"\[m, V\].*\(10,\)"),
        (torch.zeros(2, 5, dtype=torch.long), _good()[1], "float"),
        (torch.zeros(3, 5), _good()[1], r"m = 3.*\(2, 3\)"),
        (torch.zeros(2, 2), _good()[1], r"k <= V.*k = 3.*V = 2"),
        (torch.zeros(2, 5), _with(topk_ids=torch.zeros(2, 3)), "integer"),
        (torch.zeros(2, 5), _with(topk_ids=torch.tensor([[0, 1, 5], [0, 1, 2]])), r"\[0, 5\)"),
        (torch.zeros(2, 5), _with(topk_ids=torch.tensor([[0, 1, -1], [0, 1, 2]])), r"\[0, 5\)"),
        (torch.zeros(2, 5), _with(topk_ids=torch.tensor([[0, 1, 1], [0, 1, 2]])), "repeats"),
        (torch.zeros(2, 5), _with(topk_logprobs=torch.zeros(2, 4)), r"\(2, 3\).*\(2, 4\)"),
        (torch.zeros(2, 5), _with(tail_logmass=torch.zeros(3)), r"\(2,\).*\(3,\)"),
        (torch.zeros(2, 5), _with(topk_logprobs=torch.full((2, 3), -torch.inf)), "finite"),
        (torch.zeros(2, 5), _with(topk_logprobs=torch.full((2, 3), torch.nan)), "NaN"),
    ],
)
def test_bad_input(draft_logits, target, match):
    with pytest.raises(ValueError, match=match):
        distill_loss("fkl", draft_logits, target)


def test_bad_options():
    draft_logits, target = _good()
    with pytest.raises(ValueError, match="unknown distillation loss 'kl'"):
        distill_loss("kl", draft_logits, target)
    for beta in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="0 < beta < 1"):
            distill_loss("jsd", draft_logits, target, beta=beta)
    for temperature in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            expected_acceptance(draft_logits, target, temperature)
