"""ReDrafter (Cheng et al., 2024): a recurrent draft head, beam search, beams → prefix tree.

**The head** (:class:`RecurrentHead`) lives beside the frozen target and shares its token
embedding ``e`` and LM head. With ``h`` the target's last hidden state of the token before
the pending root ``x_0`` (its LM head on ``h`` gave ``x_0``'s distribution) and ``s_0 = 0``::

    s_t      = SiLU(W · e(x_{t-1}) + U · s_{t-1})          t = 1 .. L
    f_t      = proj(ResBlocks([h, s_t]))                    [2H] → [2H] → [H]
    log p_t  = log_softmax(lm_head(f_t))                    the draft token at depth t

``proj`` starts as ``[I, 0]`` and the ResBlocks as the identity, so a fresh head reads
``h`` alone. Its ``state_dict`` holds ``W``, ``U``, the blocks and ``proj`` only.

**Beam search** (:func:`beam_search`, :class:`BeamShape` ``width`` w × ``length`` L): the
w best first tokens, then at each step every beam's next-token scores (one batched head
step over all beams of all sequences) and the w best of the w × V extensions by cumulative
log-probability. **Beams → prefix tree** (:func:`beams_to_tree`): a beam's prefix of
length d is one tree node, shared by every beam with that prefix; the tree is built fresh
every step (no static tree to tune), verified in one tree-attention forward. Which beams:
by default (``all_levels=True``) the beams after **every** step — the w best prefixes of
each length 1 .. L, at most w · L nodes; ``all_levels=False`` keeps only the final w beams,
as ReDrafter's reference does. On the zoo target the final beams alone lose the
candidates verification accepts most (beams that fall out late often carry the target's
own greedy path): τ 1.91 vs 2.40 for w = 4, L = 4 (20 eval prompts × 64 tokens).

Worked example (w = 3, L = 3; tokens are ids)::

    beam 0:  17 42  8             depth 1   17 (n0)          beams 0, 1, 2 share it
    beam 1:  17 42 93             depth 2   42 (n1) ← n0     beams 0, 1
    beam 2:  17  5  8                       5  (n2) ← n0     beam 2
                                  depth 3   8  (n3) ← n1     beam 0
                                            93 (n4) ← n1     beam 1
                                            8  (n5) ← n2     beam 2 (same token as n3,
                                                             another prefix: not merged)
    tokens  = [17, 42, 5, 8, 93, 8]      parents = [-1, 0, 0, 1, 1, 2]

Nodes are ordered by depth, then by the first beam that reaches them (parents first, as
:class:`~osd.specdec.tree.TokenTree` wants); 9 beam tokens become 6 verified nodes.

**Exact at any temperature** — two modes; which one runs:

- **deterministic beams** (always for greedy requests; at T > 0 with ``stochastic=False``):
  the beams are a function of the context, so every node is a point mass
  (``draft_probs=None``). Greedy acceptance gives the target's greedy output; at T > 0 the
  point-mass rule (accept ``x`` with probability ``r(x)``, else zero ``r(x)`` and
  renormalise) samples the target distribution exactly. (ReDrafter's reference code
  instead treats the beams' draft log-probs as if the beams had been sampled, and warns
  its sampling "might not give the exact distribution"; that is the negative control of
  ``tests/test_recurrent.py``.)
- **stochastic beams** (the default for requests with T > 0): level by level, the w
  beam slots of the next level are allotted to the open nodes *before* anything is drawn —
  by the deterministic rule, the w best of ``score(v) + log p_v(rank r)`` over nodes ``v``
  and ranks ``r`` — then node ``v`` draws its ``m_v`` children **without replacement**
  from its warped draft distribution ``p_v`` (temperature / top-k / top-p of the request),
  and every drawn node stays in the tree (``draft_probs`` = ``p_parent``,
  ``without_replacement=True``). A node's children count depends only on what was drawn
  above and beside it, never on the children themselves, so the walk's residual rule is
  exact (``osd.specdec.accept``). Pruning drawn children by their scores — what a
  sampling beam search would do — would bias them, and is not done.

Which is used when: greedy requests always get deterministic beams (the greedy walk needs
no draft probabilities); sampled requests get stochastic beams unless the drafter is built
with ``stochastic=False``. Measured on the zoo target (20 eval prompts × 48 tokens, w = L =
5): at T = 0.7 τ 1.96 stochastic vs 1.61 deterministic, at T = 1 τ 1.85 vs 1.29 — the point
mass of a beam is accepted with probability q(x) only, while a draw from a calibrated p is
accepted with Σ min(p, q).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osd.drafters.base import DecodeState, Drafter
from osd.drafters.heads import HeadConfig, ResBlock
from osd.specdec.decision import AcceptPredictor
from osd.specdec.packed import linear_module
from osd.specdec.sampling import warp_probs
from osd.specdec.tree import TokenTree


@dataclass(frozen=True)
class BeamShape:
    width: int = 5  # w beams
    length: int = 5  # L draft tokens per beam (after the root)

    def __post_init__(self) -> None:
        if self.width < 1 or self.length < 1:
            raise ValueError(f"beam width and length must be >= 1, got {self}")


class RecurrentHead(nn.Module):
    """ReDrafter's head: the recurrence ``W``, ``U`` and ``layers`` ResBlocks over ``[h, s]``."""

    def __init__(self, hidden: int, layers: int = 1) -> None:
        super().__init__()
        self.w = nn.Linear(hidden, hidden, bias=False)
        self.u = nn.Linear(hidden, hidden)
        self.blocks = nn.Sequential(*[ResBlock(2 * hidden) for _ in range(layers)])
        self.proj = nn.Linear(2 * hidden, hidden)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.weight[:, :hidden] = torch.eye(hidden)
            self.proj.bias.zero_()

    def state(self, emb: Tensor, s: Tensor) -> Tensor:
        """``s_t = SiLU(W e + U s_{t-1})``; ``[..., H]``."""
        return F.silu(self.w(emb) + self.u(s))

    def feature(self, h: Tensor, s: Tensor) -> Tensor:
        """``[..., H]`` features for the target's LM head from context ``h`` and state ``s``."""
        return self.proj(self.blocks(torch.cat([h, s], -1)))


def unroll(head: RecurrentHead, embed: nn.Module, h: Tensor, ids: Tensor) -> Tensor:
    """Teacher-forced features ``[..., L, H]``: context ``h`` ``[..., H]`` and the inputs
    ``ids`` ``[..., L]`` = ``x_0 .. x_{L-1}`` (root first); row ``t - 1`` predicts ``x_t``."""
    s = torch.zeros_like(h)
    out = []
    for t in range(ids.shape[-1]):
        s = head.state(embed(ids[..., t]), s)
        out.append(head.feature(h, s))
    return torch.stack(out, -2)


def beam_search(
    head: RecurrentHead,
    embed: nn.Module,
    lm_head: Callable[[Tensor], Tensor],  # the LM head (a module or a projection)
    h: Tensor,
    root: Tensor,
    shape,
    stop: AcceptPredictor | None = None,
    limits: list[int] | None = None,
) -> tuple[list[Tensor], Tensor, list[Tensor]]:
    """Deterministic beam search for contexts ``h`` ``[a, H]`` and roots ``[a]``, one head
    step per depth for all beams: the beams after each step, ``levels[t - 1]`` ``[a, w, t]``
    (``levels[-1]`` the final ones), best first, the final log-probs ``[a, w]`` and, with an
    early-stop decision model ``stop``, its features per depth ``[a, 4]`` (from the best
    beam's distribution): a row stops (``limits[row]`` lowered in place) where it predicts
    a rejection, and the search ends when every row has stopped."""
    a, w = h.shape[0], shape.width
    limits = limits if limits is not None else [shape.length] * a
    s = head.state(embed(root), torch.zeros_like(h))  # [a, H]
    logp = torch.log_softmax(lm_head(head.feature(h, s)).float(), -1)  # [a, V]
    feats = [] if stop is None else [stop.features(logp, 0)]
    top = logp.topk(w, -1)
    beams, score = top.indices[:, :, None], top.values  # [a, w, 1], [a, w]
    levels = [beams]
    s = s[:, None].expand(a, w, s.shape[-1])
    hw = h[:, None].expand_as(s)
    for t in range(1, shape.length):
        if all(t >= lim for lim in limits):
            break
        s = head.state(embed(beams[:, :, -1]), s)  # [a, w, H]
        logp = torch.log_softmax(lm_head(head.feature(hw, s)).float(), -1)  # [a, w, V]
        if stop is not None:  # from the best beam's distribution
            f, limits[:] = stop.cut(logp[:, 0], t, limits)
            feats.append(f)
        v = logp.shape[-1]
        top = (score[:, :, None] + logp).reshape(a, w * v).topk(w, -1)
        src = top.indices // v  # [a, w] the beam each extension grows
        beams = torch.cat(
            [beams.gather(1, src[:, :, None].expand_as(beams)), (top.indices % v)[:, :, None]], -1
        )
        s = s.gather(1, src[:, :, None].expand_as(s))
        score = top.values
        levels.append(beams)
    return levels, score, feats


def beams_to_tree(beams: Sequence[Sequence[int]]) -> TokenTree:
    """The prefix tree of ``beams`` (duplicate prefixes merged; see the module docstring).

    >>> t = beams_to_tree([[17, 42, 8], [17, 42, 93], [17, 5, 8]])
    >>> t.tokens.tolist(), t.parents.tolist()
    ([17, 42, 5, 8, 93, 8], [-1, 0, 0, 1, 1, 2])
    """
    index: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    for d in range(1, max((len(b) for b in beams), default=0) + 1):
        for beam in beams:
            key = tuple(int(x) for x in beam[:d])
            if len(key) < d or key in index:
                continue
            index[key] = len(tokens)
            tokens.append(key[-1])
            parents.append(index[key[:-1]] if d > 1 else -1)
    return TokenTree.from_parents(tokens, parents)


def sample_tree(
    head: RecurrentHead,
    embed: nn.Module,
    lm_head: Callable[[Tensor], Tensor],  # the LM head (a module or a projection)
    states: Sequence[DecodeState],
    h: Tensor,  # [a, H]
    shape: BeamShape,
    limits: Sequence[int],
) -> list[TokenTree]:
    """Stochastic beams (see the module docstring): one tree per state, ``draft_probs`` =
    the warped distribution each node was drawn from, siblings without replacement."""
    a, w = len(states), shape.width
    trees: list[dict] = [{"tok": [], "par": [], "p": []} for _ in range(a)]
    # open nodes, flattened over sequences: (sequence, node, token, score, parent state)
    open_: list[tuple[int, int, int, float, Tensor]] = []
    roots = torch.tensor([s.tokens[-1] for s in states])
    zero = torch.zeros_like(h)
    for depth in range(1, max(limits) + 1):
        if depth == 1:
            seq = list(range(a))
            s = head.state(embed(roots), zero)
        else:
            if not open_:
                break
            seq = [o[0] for o in open_]
            prev = torch.stack([o[4] for o in open_])
            s = head.state(embed(torch.tensor([o[2] for o in open_])), prev)
        logits = lm_head(head.feature(h[seq], s))  # [rows, V]
        nxt = []
        for i in range(a):
            rows = [r for r, j in enumerate(seq) if j == i]
            if not rows or depth > limits[i]:
                continue
            p = warp_probs(logits[rows], states[i].sampling)  # [m, V]
            base = [0.0] if depth == 1 else [open_[r][3] for r in rows]
            counts = _allot(p, torch.tensor(base), w)
            t = trees[i]
            for k, r in enumerate(rows):
                if counts[k] == 0:
                    continue
                kids = torch.multinomial(p[k], counts[k], False, generator=states[i].generator)
                parent = -1 if depth == 1 else open_[r][1]
                for x in kids.tolist():
                    sc = base[k] + float(torch.log(p[k, x]))
                    nxt.append((i, len(t["tok"]), x, sc, s[r]))
                    t["tok"].append(x)
                    t["par"].append(parent)
                    t["p"].append(p[k])
        open_ = nxt
    return [
        TokenTree.from_parents(t["tok"], t["par"], torch.stack(t["p"]), True)
        if t["tok"]
        else TokenTree.empty()
        for t in trees
    ]


def _allot(p: Tensor, score: Tensor, w: int) -> list[int]:
    """Children per open node: how many of the ``w`` best ``score + log p (rank r)`` are
    each node's (from the distributions alone, before any child is drawn).

    >>> _allot(torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.1, 0.0]]), torch.tensor([0.0, -0.1]), 3)
    [2, 1]
    """
    m = p.shape[0]
    k = min(w, p.shape[-1])
    cand = score[:, None] + torch.log(p.topk(k, -1).values)  # [m, k]
    best = cand.reshape(-1).topk(min(w, m * k))
    counts = [0] * m
    for j, v in zip(best.indices.tolist(), best.values.tolist(), strict=True):
        if v > float("-inf"):
            counts[j // k] += 1
    return counts


class RecurrentDrafter(Drafter):
    name = "recurrent"
    needs_hidden_states = True

    def __init__(
        self,
        target,
        head: RecurrentHead,
        config: HeadConfig,
        width: int = 5,
        length: int = 5,
        stochastic: bool = True,
        all_levels: bool = True,
        early_stop: float | None = None,
    ) -> None:
        """``early_stop``: the online decision model (:mod:`osd.specdec.decision`) ends a
        sequence's beams at the depth where it predicts acceptance below this threshold
        (greedy beam search; stochastic beams draft their full length)."""
        super().__init__()
        self.target = target
        self.head = head.eval()
        self.config = config
        self.embed = target.get_input_embeddings()
        self.lm_head = target.get_output_embeddings()
        # drafting projects through the measured cheaper linear (osd.specdec.packed.preferred)
        self._project = functools.partial(linear_module, self.lm_head)
        self.shape = BeamShape(width, length)
        self.stochastic = stochastic
        self.all_levels = all_levels
        self.context = int(target.config.max_position_embeddings)
        self.stop = None if early_stop is None else AcceptPredictor(threshold=float(early_stop))

    @property
    def k(self) -> int:
        return self.shape.length

    def propose(self, state: DecodeState, max_depth: int) -> TokenTree:
        return self.propose_batch([state], [max_depth])[0]

    @torch.inference_mode()
    def propose_batch(self, states: Sequence[DecodeState], depths: list[int]) -> list[TokenTree]:
        trees = [TokenTree.empty() for _ in states]
        limit = [
            min(self.shape.length, d, self.context - len(s.tokens))
            for s, d in zip(states, depths, strict=True)
        ]
        active = [
            i
            for i, s in enumerate(states)
            if limit[i] > 0 and s.target_hidden is not None and len(s.target_hidden)
        ]
        sampled = [i for i in active if self.stochastic and not states[i].sampling.greedy]
        beams = [i for i in active if i not in sampled]
        dtype = self.lm_head.weight.dtype
        if beams:
            h = torch.stack([states[i].target_hidden[-1] for i in beams]).to(dtype)
            root = torch.tensor([states[i].tokens[-1] for i in beams])
            shape = BeamShape(self.shape.width, max(limit[i] for i in beams))
            lims = [limit[i] for i in beams]
            levels, _, feats = beam_search(
                self.head, self.embed, self._project, h, root, shape, self.stop, lims
            )
            for row, i in enumerate(beams):
                n = lims[row]
                kept = levels[:n] if self.all_levels else levels[n - 1 : n]
                trees[i] = beams_to_tree([b for lvl in kept for b in lvl[row].tolist()])
                if feats and trees[i].size:
                    states[i].stop_feats = torch.stack([f[row] for f in feats[:n]])
        if sampled:
            h = torch.stack([states[i].target_hidden[-1] for i in sampled]).to(dtype)
            lim = [limit[i] for i in sampled]
            got = sample_tree(
                self.head,
                self.embed,
                self._project,
                [states[i] for i in sampled],
                h,
                self.shape,
                lim,
            )
            for i, tree in zip(sampled, got, strict=True):
                trees[i] = tree
        return trees

    # weights: the head only (embedding and LM head are the target's)
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.head.state_dict().items()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.head.load_state_dict(state_dict, strict=True)
        self.version = version
