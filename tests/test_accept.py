"""Tests for ``osd.specdec.sampling``, ``osd.specdec.accept`` and ``osd.specdec.accept_batch``.

The heart is the statistical exactness of speculative sampling (DESIGN §3): whatever the
drafter — a chain, a multi-candidate tree with iid siblings or siblings drawn without
replacement, point-mass candidates — the first two emitted tokens must be distributed as
target-only sampling would produce them, ``q1(x1) · q2(x2 | x1)``.

The "language model" is a tiny Markov chain over ``V = 6`` tokens: ``q1`` is the target at
the root and ``Q[x]`` the target of the next token after ``x``; the draft has ``p1`` and
``P[x]``. Each draw samples a fresh draft tree from the draft (iid or without replacement;
point masses are the top-k of an unrelated "head" distribution, as Medusa heads), runs the
acceptance, and records the first two emitted tokens. When a step emits only one token, the
second is drawn from ``Q[x1]`` (what the next step samples; its exactness is the depth-1
check). Counts over ``N_DRAWS`` draws are compared to the target with
``scipy.stats.chisquare``; a test passes when the p-value is above ``P_MIN = 1e-3`` (bins
with an expected count below 5 are merged, and a token outside the target's support fails
outright). Seeds are fixed, so outcomes are deterministic. Negative controls show the same
check rejects deliberately wrong rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from scipy.stats import chisquare

from osd.specdec.accept import AcceptResult, accept_greedy, accept_sampling, accept_typical
from osd.specdec.accept_batch import BatchAcceptResult, accept_sampling_batch
from osd.specdec.sampling import SamplingParams, sample, warp_logits, warp_probs

V = 6
N_DRAWS = 20_000
P_MIN = 1e-3  # chi-square p-value threshold


# ---------------------------------------------------------------------------------------------
# Harness: a Markov "language model", draft trees, chi-square


@dataclass(frozen=True)
class MarkovLM:
    """Target and draft distributions of a two-step Markov model over ``V`` tokens."""

    q1: torch.Tensor  # [V] target at the root
    Q: torch.Tensor  # [V, V] target of the next token given the previous one
    p1: torch.Tensor  # [V] draft at the root
    P: torch.Tensor  # [V, V] draft of the next token given the previous one
    h1: torch.Tensor  # [V] "head" scores whose top-k are the point-mass candidates
    H: torch.Tensor  # [V, V]


def random_lm(seed: int, params: SamplingParams, draft_noise: float = 1.0) -> MarkovLM:
    """Random logits; the draft is the target plus noise; both warped with ``params``."""
    g = torch.Generator().manual_seed(seed)
    target = 1.5 * torch.randn(V + 1, V, generator=g)  # row 0 -> q1, rows 1.. -> Q
    draft = target + draft_noise * torch.randn(V + 1, V, generator=g)
    heads = target + 1.5 * torch.randn(V + 1, V, generator=g)  # point-mass "heads": noisy target
    q, p = warp_probs(target, params), warp_probs(draft, params)
    return MarkovLM(q[0], q[1:], p[0], p[1:], heads[0], heads[1:])


def table_lm(q: list[list[float]], p: list[list[float]]) -> MarkovLM:
    """An LM from explicit probability tables (``V + 1`` rows each: root, then after x)."""
    qt, pt = torch.tensor(q, dtype=torch.float64), torch.tensor(p, dtype=torch.float64)
    qt, pt = qt / qt.sum(-1, keepdim=True), pt / pt.sum(-1, keepdim=True)
    heads = torch.arange(V, dtype=torch.float64).flip(0).expand(V + 1, V)
    return MarkovLM(qt[0], qt[1:], pt[0], pt[1:], heads[0], heads[1:])


@dataclass(frozen=True)
class DraftTrees:
    """``B`` draft trees of one shape: tokens ``[B, n]``, targets and drafts per node."""

    tokens: torch.Tensor  # [B, n]
    parents: torch.Tensor  # [n]
    q: torch.Tensor  # [B, n + 1, V]
    p: torch.Tensor | None  # [B, n, V]


def draft_trees(
    lm: MarkovLM, widths: tuple[int, ...], mode: str, n_draws: int, g: torch.Generator
) -> DraftTrees:
    """Sample ``n_draws`` trees: ``widths[0]`` children at the root, ``widths[1]`` under each.

    ``mode``: ``"iid"`` (siblings drawn with replacement from the draft), ``"without"``
    (without replacement) or ``"point"`` (deterministic top-k of the head scores).
    Nodes: depth-1 nodes ``0..k1-1``, then the children of node ``i`` at ``k1 + i·k2 + m``.
    """
    k1, k2 = widths[0], (widths[1] if len(widths) > 1 else 0)
    parents = [-1] * k1 + [i for i in range(k1) for _ in range(k2)]

    def draw(dist: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:  # [B, k]
        if mode == "point":
            return torch.topk(scores, k, dim=-1).indices
        return torch.multinomial(dist, k, replacement=(mode == "iid"), generator=g)

    first = draw(lm.p1.expand(n_draws, V), lm.h1.expand(n_draws, V), k1)  # [B, k1]
    columns = [first] + [draw(lm.P[first[:, i]], lm.H[first[:, i]], k2) for i in range(k1) if k2]
    tokens = torch.cat(columns, dim=1)  # [B, n]
    q = torch.cat([lm.q1.expand(n_draws, 1, V), lm.Q[tokens]], dim=1)  # [B, n + 1, V]
    p = None
    if mode != "point":
        rows = [lm.p1.expand(n_draws, V) if par < 0 else lm.P[tokens[:, par]] for par in parents]
        p = torch.stack(rows, dim=1)  # [B, n, V]
    return DraftTrees(tokens, torch.tensor(parents), q, p)


def first_two_tokens(
    result: BatchAcceptResult, lm: MarkovLM, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two emitted tokens ``[B]`` each; a 1-token step is continued from ``Q[x1]``."""
    n_acc, acc, nxt = result.num_accepted, result.accepted_tokens, result.next_token
    x1 = torch.where(n_acc >= 1, acc[:, 0], nxt)
    second = acc[:, 1] if acc.shape[1] >= 2 else nxt
    x2_step = torch.where(n_acc >= 2, second, nxt)
    x2_next = sample(lm.Q[x1], g)
    return x1, torch.where(n_acc >= 1, x2_step, x2_next)


def chi_square_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of ``samples`` (ints in ``[0, K)``) against ``probs [K]``; rare bins merged.

    A sample in a bin of probability 0 fails outright (returns 0.0).
    """
    probs = probs.to(torch.float64).flatten()
    probs = probs / probs.sum()
    counts = torch.bincount(samples.flatten(), minlength=probs.numel()).to(torch.float64)
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * counts.sum()
    rare = expected < 5
    obs = counts[~rare].tolist()
    exp = expected[~rare].tolist()
    if rare.any() and expected[rare].sum() > 0:
        obs.append(float(counts[rare].sum()))
        exp.append(float(expected[rare].sum()))
    if len(obs) < 2:
        return 1.0  # a single bin cannot be wrong
    return float(chisquare(obs, exp).pvalue)


def exactness_pvalues(
    lm: MarkovLM,
    widths: tuple[int, ...],
    mode: str,
    accept=accept_sampling_batch,
    seed: int = 0,
) -> tuple[float, float, BatchAcceptResult]:
    """Depth-1 and joint depth-2 chi-square p-values of ``N_DRAWS`` speculative steps."""
    g = torch.Generator().manual_seed(seed)
    trees = draft_trees(lm, widths, mode, N_DRAWS, g)
    result = accept(trees.tokens, trees.parents, trees.q, trees.p, mode == "without", g)
    x1, x2 = first_two_tokens(result, lm, g)
    joint = lm.q1[:, None] * lm.Q  # [V, V] q1(x1) q2(x2 | x1)
    return chi_square_pvalue(x1, lm.q1), chi_square_pvalue(x1 * V + x2, joint), result


def loop_over_trees(tokens, parents, q, p, without_replacement, generator) -> BatchAcceptResult:
    """:func:`accept_sampling` per tree, results stacked like :func:`accept_sampling_batch`."""
    rows = [
        accept_sampling(t, parents, qb, None if p is None else p[b], without_replacement, generator)
        for b, (t, qb) in enumerate(zip(tokens, q, strict=True))
    ]
    width = max([2, *(len(r.path) for r in rows)])  # first_two_tokens reads two columns
    padded = [r.accepted_tokens + [-1] * (width - len(r.path)) for r in rows]
    paths = [r.path + [-1] * (width - len(r.path)) for r in rows]
    return BatchAcceptResult(
        path=torch.tensor(paths, dtype=torch.long).reshape(len(rows), width),
        accepted_tokens=torch.tensor(padded, dtype=torch.long).reshape(len(rows), width),
        num_accepted=torch.tensor([len(r.path) for r in rows]),
        next_token=torch.tensor([r.next_token for r in rows]),
        is_bonus=torch.tensor([r.is_bonus for r in rows]),
    )


def assert_exact(lm: MarkovLM, widths: tuple[int, ...], mode: str, **kwargs) -> BatchAcceptResult:
    p_depth1, p_joint, result = exactness_pvalues(lm, widths, mode, **kwargs)
    assert p_depth1 > P_MIN, f"depth-1 tokens differ from the target: p = {p_depth1:.2e}"
    assert p_joint > P_MIN, f"depth-2 joint differs from the target: p = {p_joint:.2e}"
    return result


# ---------------------------------------------------------------------------------------------
# SamplingParams and warps


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"seed": "7"}, "seed"),
    ],
)
def test_sampling_params_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_greedy() -> None:
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert SamplingParams(temperature=1, top_k=5, top_p=1).top_k == 5
    assert SamplingParams().make_generator() is None
    a = SamplingParams(temperature=1.0, seed=3).make_generator()
    b = SamplingParams(temperature=1.0, seed=3).make_generator()
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_warp_worked_example() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    top_k = warp_probs(logits, SamplingParams(temperature=1.0, top_k=3))
    torch.testing.assert_close(
        top_k, torch.tensor([0.6652, 0.2447, 0.0900, 0.0]), atol=1e-4, rtol=0
    )
    both = warp_probs(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.9))
    torch.testing.assert_close(both, torch.tensor([0.7311, 0.2689, 0.0, 0.0]), atol=1e-4, rtol=0)


def test_warp_greedy_is_one_hot_at_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 3.0, -1.0], [5.0, 0.0, 1.0, 2.0]])
    probs = warp_probs(logits, SamplingParams(temperature=0.0, top_k=2))
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))


def test_warp_any_leading_shape_and_half_precision() -> None:
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.8)
    batched = warp_probs(logits, params)
    rowwise = torch.stack([warp_probs(row, params) for row in logits.reshape(6, 11)])
    torch.testing.assert_close(batched.reshape(6, 11), rowwise)
    torch.testing.assert_close(batched.sum(-1), torch.ones(2, 3))
    assert warp_probs(logits.bfloat16(), params).dtype == torch.float32
    assert warp_logits(logits, params).shape == logits.shape


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5),
        SamplingParams(temperature=1.5, top_k=7),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=0.8, top_k=10, top_p=0.7),
        SamplingParams(temperature=1.3, top_k=1),
        SamplingParams(temperature=1.0, top_p=0.01),
        SamplingParams(temperature=2.0, top_k=100, top_p=0.95),
    ],
)
def test_warp_probs_matches_transformers(params: SamplingParams) -> None:
    logits_process = pytest.importorskip(
        "transformers.generation.logits_process",
        reason="transformers is not importable; cannot compare with its warpers",
    )
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(8, 50, generator=g)).round(decimals=1)  # rounding makes ties
    input_ids = torch.zeros(8, 1, dtype=torch.long)
    scores = logits.clone()
    if params.temperature != 1.0:
        scores = logits_process.TemperatureLogitsWarper(params.temperature)(input_ids, scores)
    if params.top_k > 0:
        scores = logits_process.TopKLogitsWarper(params.top_k)(input_ids, scores)
    if params.top_p < 1.0:
        scores = logits_process.TopPLogitsWarper(params.top_p)(input_ids, scores)
    torch.testing.assert_close(warp_probs(logits, params), scores.softmax(-1))
    assert torch.equal(torch.isinf(warp_logits(logits, params)), torch.isinf(scores))


def test_sample_shape_and_support() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]).expand(4, 2, 3)
    tokens = sample(probs, torch.Generator().manual_seed(0))
    assert tokens.shape == (4, 2)
    assert bool((tokens[:, 0] > 0).all()) and bool((tokens[:, 1] == 0).all())


# ---------------------------------------------------------------------------------------------
# Greedy acceptance


def test_greedy_worked_example() -> None:
    # root ─┬─ node 0: token 2 ─── node 2: token 1
    #       └─ node 1: token 3
    tokens, parents = torch.tensor([2, 3, 1]), torch.tensor([-1, -1, 0])
    result = accept_greedy(tokens, parents, torch.tensor([3, 0, 1, 2]))
    assert result == AcceptResult(path=[1], accepted_tokens=[3], next_token=1, is_bonus=True)
    # argmax 2 at the root, 1 after node 0: accept nodes 0 and 2, bonus = argmax after node 2.
    result = accept_greedy(tokens, parents, torch.tensor([2, 1, 5, 4]))
    assert result == AcceptResult(path=[0, 2], accepted_tokens=[2, 1], next_token=4, is_bonus=True)
    # argmax 2 at the root, 0 after node 0: node 2 (token 1) rejected, recovered token 0.
    result = accept_greedy(tokens, parents, torch.tensor([2, 0, 5, 4]))
    assert result == AcceptResult(path=[0], accepted_tokens=[2], next_token=0, is_bonus=False)
    # nothing matches at the root.
    result = accept_greedy(tokens, parents, torch.tensor([4, 0, 5, 4]))
    assert result == AcceptResult(path=[], accepted_tokens=[], next_token=4, is_bonus=False)
    assert result.emitted_tokens == [4]


def test_greedy_empty_tree_and_duplicate_siblings() -> None:
    empty = torch.zeros(0, dtype=torch.long)
    assert accept_greedy(empty, empty, torch.tensor([7])) == AcceptResult([], [], 7, True)
    # two siblings with token 5: the first one (node 0) is followed, its child 9 accepted.
    tokens, parents = torch.tensor([5, 5, 9, 8]), torch.tensor([-1, -1, 0, 1])
    result = accept_greedy(tokens, parents, torch.tensor([5, 9, 8, 1, 3]))
    assert result.path == [0, 2] and result.next_token == 1


def test_greedy_equals_target_greedy_decoding() -> None:
    """On random trees, the emitted tokens are a prefix of the target's greedy continuation."""
    g = torch.Generator().manual_seed(5)
    follow = torch.randint(0, V, (V,), generator=g)  # target argmax after token x
    start = 2
    greedy = [start]
    for _ in range(10):
        greedy.append(int(follow[greedy[-1]]))
    for _ in range(300):
        n = int(torch.randint(0, 9, (1,), generator=g))
        parents = [int(torch.randint(-1, j, (1,), generator=g)) if j else -1 for j in range(n)]
        tokens = torch.randint(0, V, (n,), generator=g)
        argmax = torch.cat([torch.tensor([start]), follow[tokens]])  # [n + 1]
        result = accept_greedy(tokens, torch.tensor(parents, dtype=torch.long), argmax)
        emitted = result.emitted_tokens
        assert emitted == greedy[: len(emitted)]
        assert len(emitted) == len(result.path) + 1


# ---------------------------------------------------------------------------------------------
# Speculative sampling: worked example, agreement, deterministic properties


def test_sampling_worked_example() -> None:
    # the module docstring's tree; siblings drawn without replacement from p
    tokens, parents = torch.tensor([2, 3, 1]), torch.tensor([-1, -1, 0])
    q = torch.tensor(
        [[0.1, 0.2, 0.3, 0.4], [0.3, 0.05, 0.05, 0.6], [0.0, 1.0, 0.0, 0.0], [0.25] * 4]
    )
    p = torch.tensor([[0.1, 0.1, 0.6, 0.2]] * 3)

    def run(*uniforms: float) -> AcceptResult:
        return accept_sampling(tokens, parents, q, p, True, uniforms=torch.tensor(uniforms))

    # node 0: 0.4 · 0.6 < 0.3, accepted. node 2 (token 1): 0.9 · 0.1 >= 0.05, rejected;
    # residual norm(max(q[1] − p, 0)) = [1/3, 0, 0, 2/3]; u = 0.2 -> recovered token 0.
    assert run(0.4, 0.0, 0.9, 0.2) == AcceptResult([0], [2], 0, False)
    # node 2: 0.3 · 0.1 < 0.05, accepted; a leaf: bonus from q[3] with u = 0.5 -> token 2.
    assert run(0.4, 0.0, 0.3, 0.5) == AcceptResult([0, 2], [2, 1], 2, True)
    # node 0: 0.6 · 0.6 >= 0.3, rejected; r = [0, 1/3, 0, 2/3]. node 1 is drawn from p without
    # token 2, d = [.25, .25, 0, .5]: 0.999 · 0.5 < 2/3, accepted; bonus from q[2] = token 1.
    assert run(0.6, 0.999, 0.0, 0.5) == AcceptResult([1], [3], 1, True)


def test_batch_agrees_with_single_tree() -> None:
    """Given the same uniforms, the vectorised and the per-tree walks are identical."""
    g = torch.Generator().manual_seed(11)
    batch = 40
    for trial in range(60):
        n = int(torch.randint(0, 8, (1,), generator=g))
        parents = torch.tensor(
            [int(torch.randint(-1, j, (1,), generator=g)) if j else -1 for j in range(n)],
            dtype=torch.long,
        )
        without = trial % 2 == 1
        tokens = torch.empty(batch, n, dtype=torch.long)
        for parent in set(parents.tolist()):
            kids = (parents == parent).nonzero().flatten()
            for b in range(batch):
                if without:
                    tokens[b, kids] = torch.randperm(V, generator=g)[: len(kids)]
                else:
                    tokens[b, kids] = torch.randint(0, V, (len(kids),), generator=g)
        keep_q = torch.rand(batch, n + 1, V, generator=g) > 0.3
        keep_q[..., 0] = True
        q = torch.softmax(3 * torch.randn(batch, n + 1, V, generator=g), -1) * keep_q
        p = torch.softmax(3 * torch.randn(batch, n, V, generator=g), -1)
        p = p * (torch.rand(batch, n, V, generator=g) > 0.3) + 1e-4
        p = None if trial % 3 == 0 else p
        u = torch.rand(batch, n + 1, dtype=torch.float64, generator=g)
        together = accept_sampling_batch(tokens, parents, q, p, without, uniforms=u).unbind()
        for b in range(batch):
            alone = accept_sampling(
                tokens[b], parents, q[b], None if p is None else p[b], without, uniforms=u[b]
            )
            assert alone == together[b]


def test_draft_equal_to_target_accepts_everything() -> None:
    lm = random_lm(3, SamplingParams(temperature=1.0))
    lm = MarkovLM(lm.q1, lm.Q, lm.q1, lm.Q, lm.h1, lm.H)
    trees = draft_trees(lm, (1, 1), "iid", 2000, torch.Generator().manual_seed(0))
    result = accept_sampling_batch(trees.tokens, trees.parents, trees.q, trees.p)
    assert bool((result.num_accepted == 2).all()) and bool(result.is_bonus.all())


def test_residual_fallback_stays_in_support() -> None:
    """A rejection of probability ~1e-15 leaves a ~0 residual: fall back to the target row."""
    q = torch.tensor([[1e-15, 1.0, 0.0, 0.0], [0.25] * 4], dtype=torch.float64)
    for p in (None, torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)):
        result = accept_sampling(
            torch.tensor([1]),
            torch.tensor([-1]),
            q,
            p,
            uniforms=torch.tensor([1 - 2**-53, 0.5], dtype=torch.float64),
        )
        assert result == AcceptResult([], [], 1, False)


def test_zero_draft_probability_accepts_iff_target_positive() -> None:
    q = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    p = torch.tensor([[0.0, 0.0, 1.0]])
    u = torch.tensor([0.99, 0.5])
    accept = accept_sampling(torch.tensor([1]), torch.tensor([-1]), q, p, uniforms=u)
    assert accept.path == [0] and accept.next_token == 0 and accept.is_bonus
    reject = accept_sampling(torch.tensor([2]), torch.tensor([-1]), q, p, uniforms=u)
    assert reject.path == [] and reject.next_token in (0, 1) and not reject.is_bonus


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"parents": torch.tensor([-1, 1])}, "parent"),
        ({"q": torch.full((2, 4), 0.25)}, "shape"),
        ({"p": torch.full((2, 5), 0.2)}, "shape"),
        ({"q": torch.tensor([[0.5, 0.5, -0.1, 0.1]] * 3)}, "non-negative"),
        ({"q": torch.tensor([[0.5, float("nan"), 0.0, 0.5]] * 3)}, "non-negative"),
        ({"tokens": torch.tensor([1, 4])}, "tokens"),
        ({"tokens": torch.tensor([1, 1]), "parents": torch.tensor([-1, -1])}, "repeat"),
        ({"uniforms": torch.tensor([0.5, 1.0, 0.1])}, "uniforms"),
    ],
)
def test_sampling_rejects_bad_input(kwargs: dict, message: str) -> None:
    args = {
        "tokens": torch.tensor([1, 2]),
        "parents": torch.tensor([-1, 0]),
        "q": torch.full((3, 4), 0.25),
        "p": torch.full((2, 4), 0.25),
        "without_replacement": True,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        accept_sampling(**args)


# ---------------------------------------------------------------------------------------------
# Speculative sampling: statistical exactness


TEMPERATURES = [0.5, 1.0, 1.5]


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_exact_chain(temperature: float) -> None:
    lm = random_lm(1, SamplingParams(temperature=temperature))
    result = assert_exact(lm, (1, 1), "iid")
    # the draft is good but not perfect: every outcome of the walk occurs
    assert set(result.num_accepted.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_exact_tree_siblings_iid(temperature: float) -> None:
    assert_exact(random_lm(2, SamplingParams(temperature=temperature)), (3, 2), "iid")


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_exact_tree_siblings_without_replacement(temperature: float) -> None:
    assert_exact(random_lm(3, SamplingParams(temperature=temperature)), (3, 2), "without")


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_exact_point_mass_candidates(temperature: float) -> None:
    assert_exact(random_lm(4, SamplingParams(temperature=temperature)), (3, 2), "point")


@pytest.mark.parametrize("mode", ["iid", "without", "point"])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=4),
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(temperature=1.2, top_k=5, top_p=0.95),
    ],
    ids=["top_k", "top_p", "top_k+top_p"],
)
def test_exact_with_warps(mode: str, params: SamplingParams) -> None:
    lm = random_lm(5, params, draft_noise=0.7)
    widths = (2, 2) if mode == "without" else (3, 2)  # without replacement needs support >= k
    assert_exact(lm, widths, mode)


def test_exact_chain_single_tree_loop() -> None:
    """The per-tree function itself, one call per draw."""
    lm = random_lm(6, SamplingParams(temperature=1.0))
    assert_exact(lm, (1, 1), "iid", accept=loop_over_trees)


def test_exact_tree_without_replacement_single_tree_loop() -> None:
    lm = random_lm(7, SamplingParams(temperature=1.0, top_k=5))
    assert_exact(lm, (3, 2), "without", accept=loop_over_trees)


# Adversarial tables: V + 1 rows (root, then "after token x" for x = 0..5).
_UNIFORM_LOW = [1, 1, 1, 0, 0, 0]  # support {0, 1, 2}
_UNIFORM_HIGH = [0, 0, 0, 1, 1, 1]  # support {3, 4, 5}


def _rows(row: list[float]) -> list[list[float]]:
    return [row] * (V + 1)


ADVERSARIAL = {
    # the draft never proposes a token the target can emit
    "disjoint_supports": table_lm(_rows([0.5, 0.3, 0.2, 0, 0, 0]), _rows([0, 0, 0, 0.2, 0.3, 0.5])),
    # the draft puts most mass where the target has almost none
    "p_much_larger_than_q": table_lm(
        [[0.01, 0.01, 0.38, 0.3, 0.2, 0.1]] + [[0.3, 0.3, 0.01, 0.01, 0.18, 0.2]] * V,
        [[0.6, 0.3, 0.02, 0.02, 0.03, 0.03]] + [[0.02, 0.02, 0.5, 0.4, 0.03, 0.03]] * V,
    ),
    # the target is deterministic (one-hot), depending on the previous token
    "one_hot_q": table_lm(
        [[0, 0, 1, 0, 0, 0]]
        + [[1.0 if y == (x + 1) % V else 0.0 for y in range(V)] for x in range(V)],
        _rows([0.2, 0.1, 0.3, 0.2, 0.1, 0.1]),
    ),
    # the draft is deterministic (one-hot) but sampled as a distribution
    "one_hot_p": table_lm(
        [[0.1, 0.2, 0.3, 0.2, 0.1, 0.1]] + [[0.3, 0.1, 0.1, 0.1, 0.1, 0.3]] * V,
        _rows([0, 0, 0, 1, 0, 0]),
    ),
    # the draft covers only part of the target's support
    "draft_support_subset": table_lm(
        _rows([0.2, 0.2, 0.2, 0.2, 0.1, 0.1]),
        [_UNIFORM_LOW] + [_UNIFORM_HIGH] * V,
    ),
}


@pytest.mark.parametrize(
    ("name", "widths", "mode"),
    [
        (name, widths, mode)
        for name in sorted(ADVERSARIAL)
        for widths, mode in [((1, 1), "iid"), ((3, 2), "iid"), ((2, 2), "without")]
        if not (name == "one_hot_p" and mode == "without")  # cannot draw 2 distinct siblings
    ],
)
def test_exact_adversarial(name: str, widths: tuple[int, ...], mode: str) -> None:
    assert_exact(ADVERSARIAL[name], widths, mode)


# ---------------------------------------------------------------------------------------------
# Negative controls: the check must reject wrong rules


def resample_from_target(
    tokens, parents, q, p, without_replacement, generator
) -> BatchAcceptResult:
    """WRONG: on rejection, draw the recovered token from the target instead of the residual."""
    result = accept_sampling_batch(tokens, parents, q, p, without_replacement, generator)
    last = torch.where(
        result.num_accepted > 0,
        result.path.gather(1, (result.num_accepted - 1).clamp_min(0)[:, None]).squeeze(1),
        -1,
    )
    target = q[torch.arange(len(last)), last + 1]  # [B, V] target at the last accepted node
    wrong = sample(target, generator)
    next_token = torch.where(result.is_bonus, result.next_token, wrong)
    return BatchAcceptResult(
        result.path, result.accepted_tokens, result.num_accepted, next_token, result.is_bonus
    )


def inverted_ratio_chain(
    tokens, parents, q, p, without_replacement, generator
) -> BatchAcceptResult:
    """WRONG: one-level chain accepting with min(1, p(x) / q(x)) (ratio upside down)."""
    rows = torch.arange(tokens.shape[0])
    x = tokens[:, 0]
    q0, p0 = q[:, 0].double(), p[:, 0].double()
    ratio = (p0[rows, x] / q0[rows, x]).nan_to_num(posinf=1.0).clamp(max=1.0)
    accept = torch.rand(len(x), dtype=torch.float64, generator=generator) < ratio
    residual = (q0 - p0).clamp_min(0) + 1e-12
    recovered = sample(residual, generator)
    bonus = sample(q[rows, 1].double(), generator)
    path = torch.where(accept, 0, -1)[:, None]
    return BatchAcceptResult(
        path=path,
        accepted_tokens=torch.where(accept, x, -1)[:, None],
        num_accepted=accept.long(),
        next_token=torch.where(accept, bonus, recovered),
        is_bonus=accept,
    )


def test_negative_control_resample_from_target() -> None:
    lm = random_lm(1, SamplingParams(temperature=1.0))
    p_depth1, p_joint, _ = exactness_pvalues(lm, (1, 1), "iid", accept=resample_from_target)
    assert p_depth1 < P_MIN and p_joint < P_MIN


def test_negative_control_inverted_ratio() -> None:
    lm = random_lm(1, SamplingParams(temperature=1.0))
    p_depth1, p_joint, _ = exactness_pvalues(lm, (1,), "iid", accept=inverted_ratio_chain)
    assert p_depth1 < P_MIN and p_joint < P_MIN


def test_negative_control_forgetting_without_replacement() -> None:
    """Siblings drawn without replacement but accepted as if iid: biased."""
    lm = ADVERSARIAL["p_much_larger_than_q"]

    def treat_as_iid(tokens, parents, q, p, without_replacement, generator):
        return accept_sampling_batch(tokens, parents, q, p, False, generator)

    p_depth1, p_joint, _ = exactness_pvalues(lm, (3, 2), "without", accept=treat_as_iid)
    assert min(p_depth1, p_joint) < P_MIN


# ---------------------------------------------------------------------------------------------
# Typical acceptance (lossy)


def test_typical_threshold_worked_example() -> None:
    q = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25] * 4, [0.25] * 4, [0.25] * 4])
    # H(q[0]) ≈ 1.03, threshold min(0.09, 0.3 · e^−1.03 ≈ 0.107) = 0.09: tokens 0, 1, 2 pass.
    for token in (0, 1, 2):
        result = accept_typical(torch.tensor([token]), torch.tensor([-1]), q[:2])
        assert result.path == [0] and result.is_bonus
    result = accept_typical(torch.tensor([3]), torch.tensor([-1]), q[:2])
    assert result == AcceptResult([], [], 0, False)  # rejected: next token = argmax q[0]


def test_typical_one_hot_target_accepts_only_argmax() -> None:
    q = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    tokens, parents = torch.tensor([0, 1]), torch.tensor([-1, -1])
    assert accept_typical(tokens, parents, q) == AcceptResult([1], [1], 0, True)


def test_typical_prefers_deepest_then_most_likely_path() -> None:
    # root ─┬─ node 0: token 0 ─── node 2: token 1
    #       └─ node 1: token 1 ─── node 3: token 2
    # q rows: 0 root, 1 after node 0, 2 after node 1, 3 after node 2, 4 after node 3.
    tokens, parents = torch.tensor([0, 1, 1, 2]), torch.tensor([-1, -1, 0, 1])
    flat = [0.25] * 4
    q = torch.tensor([[0.3, 0.6, 0.05, 0.05], flat, flat, [0.1, 0.1, 0.1, 0.7], flat])
    # both depth-2 paths pass; log-likelihood 0.6 · 0.25 beats 0.3 · 0.25: path [1, 3],
    # bonus = argmax q[4] = 0 (first of the ties).
    assert accept_typical(tokens, parents, q) == AcceptResult([1, 3], [1, 2], 0, True)
    # node 3's token becomes implausible after node 1 (0.01 < 0.09): the deepest path is
    # [0, 2]; bonus = argmax q[3] = 3.
    q[2] = torch.tensor([0.1, 0.1, 0.01, 0.79])
    assert accept_typical(tokens, parents, q) == AcceptResult([0, 2], [0, 1], 3, True)
    # and with node 2's token implausible too, the path stops at depth 1 (node 1 is likelier):
    # next token = argmax q[2] = 3, not a bonus since node 1 has a (rejected) child.
    q[1] = torch.tensor([0.01, 0.01, 0.49, 0.49])
    assert accept_typical(tokens, parents, q) == AcceptResult([1], [1], 3, False)


def test_typical_is_lossy() -> None:
    """Always accepting a plausible draft token over-emits it: not the target distribution."""
    q = torch.tensor([[0.5, 0.3, 0.2], [1 / 3] * 3])
    result = accept_typical(torch.tensor([2]), torch.tensor([-1]), q)
    assert result.emitted_tokens[0] == 2  # every time, though the target emits 2 w.p. 0.2


def test_tree_batch_topologies_are_remembered_and_safe_from_the_callers_tensor():
    from osd.specdec.accept_batch import _KNOWN_MAX, TreeBatch

    parents = torch.tensor([[-1, 0, 1], [-1, 0, -2]])
    first = TreeBatch.of(parents, 2, torch.device("cpu"))
    assert TreeBatch.of(parents.clone(), 2, torch.device("cpu")) is first  # same shapes
    parents[0, 2] = 0  # the caller reuses its tensor: what was remembered does not change
    assert first.parents[0].tolist() == [-1, 0, 1]
    assert TreeBatch.of(parents, 2, torch.device("cpu")) is not first
    for n in range(_KNOWN_MAX + 1):  # bounded: the oldest is forgotten
        TreeBatch.of(torch.full((1, n + 1), -1), 1, torch.device("cpu"))
    assert (
        TreeBatch.of(torch.tensor([[-1, 0, 1], [-1, 0, -2]]), 2, torch.device("cpu")) is not first
    )


def test_max_indices_is_argmax_on_ties_and_nan():
    """The engine's greedy acceptance reads ``max(-1).indices`` (faster on a CPU) for HF's
    ``argmax``: both must pick the first maximum, ties and NaN included."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 3, (64, 4096), generator=gen).float()  # ties everywhere
    rows[::7, 5] = float("nan")
    assert torch.equal(rows.max(-1).indices, rows.argmax(-1))
