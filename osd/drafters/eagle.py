"""An EAGLE-style autoregressive head: it predicts the target's next feature, drafts a tree.

The head (:class:`~osd.drafters.heads.EagleHead`) reads pairs ``(f_j, x_{j+1})`` — the
target's last hidden state of token ``j`` and the embedding of token ``j + 1`` — and
predicts ``f̂_{j+1}``; the target's LM head on it gives the distribution of token ``j + 2``.
It keeps its own small KV cache per sequence (a slot of a
:class:`~osd.specdec.kvcache.KVCache`, pair ``j`` at position ``j``).

One step (batched over sequences):

1. **catch up**: feed the pairs whose true features arrived since the last step (the
   prompt's at the start, then the root + accepted path's: ``DecodeState.target_hidden``);
   the last one predicts the root's feature, whose logits give the depth-1 candidates;
2. **expand** (EAGLE-2's dynamic tree): each level keeps the ``width`` candidates of
   highest cumulative log-probability, feeds them (pair ``(f̂_parent, x)``, tree mask:
   committed pairs + ancestors), and scores the ``topk`` children of each;
3. **rerank**: the tree is the ``nodes`` candidates of highest cumulative log-probability
   (a child never outscores its parent, so they form a tree), parents first.

Tree nodes fed to the head's cache lie past its committed pairs and are dropped: the next
catch-up re-feeds the accepted tokens with the target's true features. Candidates are
top-k tokens (point masses): greedy is exact, sampling is exact by the point-mass rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from osd.drafters.base import DecodeState, Drafter, StepResult
from osd.drafters.heads import EagleHead, HeadConfig, eagle_layers
from osd.specdec.decision import AcceptPredictor
from osd.specdec.lean import causal_mask
from osd.specdec.packed import linear_module
from osd.specdec.tree import TokenTree


@dataclass
class _EagleSeq:
    slot: int = -1
    cached: int = 0  # pairs in the head's cache (pair j at position j)
    pending: list[torch.Tensor] = field(default_factory=list)  # true features not yet fed


class EagleDrafter(Drafter):
    name = "eagle"
    needs_hidden_states = True

    def __init__(
        self,
        target,
        head: EagleHead,
        config: HeadConfig,
        depth: int = 5,
        topk: int = 4,
        width: int = 4,
        nodes: int = 24,
        early_stop: float | None = None,
    ) -> None:
        """``early_stop``: a sequence's tree stops growing at the depth where the online
        decision model (:mod:`osd.specdec.decision`) predicts acceptance below this
        threshold, from the distribution under the level's best candidate."""
        super().__init__()
        if min(depth, topk, width, nodes) < 1 or width > topk:
            raise ValueError(
                f"need depth, topk, width, nodes >= 1 and width <= topk; got {depth}, {topk}, "
                f"{width}, {nodes}"
            )
        self.target = target
        self.head = head.eval()
        self.config = config
        self.base = target.model
        self.lm_head = target.get_output_embeddings()
        self.depth, self.topk, self.width, self.nodes = depth, topk, width, nodes
        self.stop = None if early_stop is None else AcceptPredictor(threshold=float(early_stop))
        self.context = int(target.config.max_position_embeddings)
        p = self.lm_head.weight
        self.cache = head.new_cache(self.context + depth * width + 1, p.dtype, p.device)

    @property
    def k(self) -> int:
        return self.depth

    # -- per sequence ------------------------------------------------------------------
    def start(self, state: DecodeState) -> None:
        es = _EagleSeq()
        es.slot = self.cache.alloc(es)
        if state.target_hidden is not None:
            es.pending = list(state.target_hidden.unbind(0))
        state.draft = es

    def release(self, state: DecodeState) -> None:
        es: _EagleSeq | None = state.draft
        if es is None or es.slot < 0:
            return
        self.cache.free(es.slot)
        es.slot = -1

    def observe(self, state: DecodeState, result: StepResult) -> None:
        if state.target_hidden is not None:  # root + accepted path: the new true features
            state.draft.pending += list(state.target_hidden.unbind(0))

    def propose(self, state: DecodeState, max_depth: int) -> TokenTree:
        return self.propose_batch([state], [max_depth])[0]

    # -- drafting ----------------------------------------------------------------------
    def _run(self, seqs, feats, ids, pos, write_at, mask) -> torch.Tensor:
        x = linear_module(self.head.fc, torch.cat([self.base.embed_tokens(ids), feats], dim=-1))
        slots = torch.tensor([s.slot for s in seqs])
        cs = self.base.rotary_emb(x, pos)
        return eagle_layers(self.head, x, cs, mask, self.cache, slots, write_at)

    def _catch_up(self, states: Sequence[DecodeState]) -> torch.Tensor:
        """Feed every pending pair; returns the predicted root features ``[a, H]``."""
        seqs = [s.draft for s in states]
        starts = torch.tensor([d.cached for d in seqs])
        counts = torch.tensor([len(d.pending) for d in seqs])
        t = int(counts.max())
        h = seqs[0].pending[0].shape[-1]
        feats = torch.zeros(len(seqs), t, h, dtype=self.lm_head.weight.dtype)
        ids = torch.zeros(len(seqs), t, dtype=torch.long)
        for i, (s, d) in enumerate(zip(states, seqs, strict=True)):
            feats[i, : len(d.pending)] = torch.stack(d.pending).to(feats)
            ids[i, : len(d.pending)] = torch.tensor(s.tokens[d.cached + 1 :])
        pos = starts[:, None] + torch.arange(t)[None]
        length = int((starts + counts).max())
        self.cache.reserve(length + self.depth * self.width + 1)
        out = self._run(seqs, feats, ids, pos, pos, causal_mask(starts, counts, length))
        for d in seqs:
            d.cached += len(d.pending)
            d.pending = []
        return out[torch.arange(len(seqs)), counts - 1]

    @torch.inference_mode()
    def propose_batch(self, states: Sequence[DecodeState], depths: list[int]) -> list[TokenTree]:
        trees = [TokenTree.empty() for _ in states]
        active = [
            i
            for i, (s, d) in enumerate(zip(states, depths, strict=True))
            if d > 0
            and s.draft.pending
            and s.draft.cached + len(s.draft.pending) == len(s.tokens) - 1
            and len(s.tokens) + self.depth < self.context
        ]
        if not active:
            return trees
        act = [states[i] for i in active]
        seqs = [s.draft for s in act]
        limit = [min(self.depth, depths[i]) for i in active]
        deepest = max(limit)
        a, w, k = len(act), self.width, self.topk
        feat = self._catch_up(act)  # [a, H] predicted root features
        logp = torch.log_softmax(linear_module(self.lm_head, feat).float(), -1)  # [a, V]
        top = logp.topk(k, dim=-1)
        feats = [] if self.stop is None else [self.stop.features(logp, 0)]
        # the candidate pool, level by level: tokens, cumulative scores, parent (pool index)
        pool_tok, pool_score, pool_parent, pool_depth = [top.indices], [top.values], [], []
        pool_parent.append(torch.full((a, k), -1))
        pool_depth.append(torch.ones(a, k, dtype=torch.long))
        front = torch.arange(w).expand(a, w)  # pool indices of the frontier (top-w at level 1)
        base = torch.tensor([len(s.tokens) - 1 for s in act])  # [a] committed pairs
        fed_anc = torch.zeros(a, 0, 0, dtype=torch.bool)
        fed_pool: list[torch.Tensor] = []  # pool index of each fed node, per level [a, w]
        parent_feat = feat[:, None].expand(a, w, feat.shape[-1])
        n_pool = k
        for d in range(1, deepest):
            if all(d >= lim for lim in limit):  # every tree stopped early
                break
            toks = torch.cat(pool_tok, 1).gather(1, front)  # [a, w]
            score = torch.cat(pool_score, 1).gather(1, front)
            # the frontier's fed parents (previous level's frontier), for the tree mask
            f0 = fed_anc.shape[1]
            anc = torch.zeros(a, f0 + w, f0 + w, dtype=torch.bool)
            anc[:, :f0, :f0] = fed_anc
            if d > 1:
                par = torch.cat(pool_parent, 1).gather(1, front)  # pool idx of parents
                par_fed = (fed_pool[-1][:, None, :] == par[:, :, None]).float().argmax(-1)
                par_fed = par_fed + f0 - w  # fed index of each parent
                anc[:, f0:, :f0] = fed_anc.gather(1, par_fed[:, :, None].expand(a, w, f0))
            anc[:, f0:, f0:] |= torch.eye(w, dtype=torch.bool)
            fed_anc = anc
            fed_pool.append(front)
            length = int(base.max()) + f0 + w
            col = torch.arange(length)[None, None, :]
            mask = (col < base[:, None, None]).expand(a, w, length).clone()
            node_cols = base[:, None, None] + torch.arange(f0 + w)[None, None, :]
            mask.scatter_(2, node_cols.expand(a, w, f0 + w), anc[:, f0:])
            pos = (base - 1 + d)[:, None].expand(a, w)
            at = base[:, None] + f0 + torch.arange(w)[None]
            out = self._run(seqs, parent_feat, toks, pos, at, mask)  # [a, w, H]
            lp = torch.log_softmax(linear_module(self.lm_head, out).float(), -1)  # [a, w, V]
            if self.stop is not None:  # depth d + 1's distribution under the best node
                f, limit = self.stop.cut(lp[:, 0], d, limit)
                feats.append(f)
            ch = lp.topk(k, dim=-1)
            cand_score = (score[:, :, None] + ch.values).reshape(a, w * k)
            pool_tok.append(ch.indices.reshape(a, w * k))
            pool_score.append(cand_score)
            pool_parent.append(front[:, :, None].expand(a, w, k).reshape(a, w * k))
            pool_depth.append(torch.full((a, w * k), d + 1))
            best = cand_score.topk(w, dim=-1).indices  # [a, w] within this level
            parent_feat = out.gather(1, (best // k)[:, :, None].expand(a, w, out.shape[-1]))
            front = n_pool + best
            n_pool += w * k
        tok, sc = torch.cat(pool_tok, 1), torch.cat(pool_score, 1)
        par, dep = torch.cat(pool_parent, 1), torch.cat(pool_depth, 1)
        for row, i in enumerate(active):
            trees[i] = self._rerank(tok[row], sc[row], par[row], dep[row], limit[row])
            if feats and trees[i].size:
                act[row].stop_feats = torch.stack([f[row] for f in feats])[: trees[i].max_depth]
        return trees

    def _rerank(self, tok, score, parent, depth, limit: int) -> TokenTree:
        """The ``nodes`` best candidates no deeper than ``limit``, parents first."""
        ok = (depth <= limit).nonzero().flatten().tolist()
        # best score first; ties: shallower first (a parent before its equal-score child)
        ok.sort(key=lambda j: (-float(score[j]), int(depth[j]), j))
        keep = set(ok[: self.nodes])
        keep = {j for j in keep if self._rooted(j, parent, keep)}
        order = sorted(keep, key=lambda j: (int(depth[j]), j))
        index = {j: n for n, j in enumerate(order)}
        parents = [index[int(parent[j])] if int(parent[j]) >= 0 else -1 for j in order]
        return TokenTree.from_parents([int(tok[j]) for j in order], parents)

    @staticmethod
    def _rooted(j: int, parent, keep: set[int]) -> bool:
        p = int(parent[j])
        while p >= 0:
            if p not in keep:
                return False
            p = int(parent[p])
        return True

    # weights: the head only (embedding and LM head are the target's)
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.head.state_dict().items()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.head.load_state_dict(state_dict, strict=True)
        self.version = version
