"""The speculative decoding engine: propose → verify → accept → commit, one step at a time.

>>> dec = SpeculativeDecoder(target, DraftModelDrafter(draft, k=4), tokenizer)  # doctest: +SKIP
>>> out = dec.generate("Question: 2 + 3?\\nAnswer:", max_new_tokens=32)       # doctest: +SKIP
>>> out.text, out.stats.tau                                                    # doctest: +SKIP

Serving code drives :meth:`SpeculativeDecoder.start` / :meth:`~SpeculativeDecoder.step`
itself, which is where a new drafter version can be adopted: between steps, never inside.

Stopping. A step emits ``accepted + 1`` tokens; the commit cuts them at the first EOS
(inclusive) and at ``max_new_tokens``, exactly where target-only decoding would stop.

Target-initialised trees (a drafter with ``defers_bonus``): a step that accepted at least
one token emits only the accepted ones and keeps the distribution its last token would
have been drawn from (the target row at a leaf, the residual after a rejection:
:func:`~osd.specdec.accept.final_distribution`) in ``DecodeState.pending``; the next
step's first-level candidates are its top-k (point masses) and acceptance reads that
distribution at the root instead of the recomputed row, so the token is still drawn from
it exactly. A step that accepted nothing draws the token as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from osd.drafters.base import DecodeState, Drafter, StepResult
from osd.kernels import accept_greedy_batch, accept_sampling_batch
from osd.specdec.accept import AcceptResult, accept_typical, final_distribution, walk_greedy
from osd.specdec.kvcache import moves
from osd.specdec.lean import LeanLM, prefill
from osd.specdec.ledger import Ledger
from osd.specdec.rowcost import RowPadding, row_padding
from osd.specdec.sampling import SamplingParams, warp_probs
from osd.specdec.tree import TokenTree, pad_trees, tree_block

log = logging.getLogger(__name__)


@dataclass
class StepObserver(Protocol):
    """Declared by whoever watches the engine's steps (record collection, metrics, the
    speculation controller): what it needs kept, and what it does with each step."""

    wants_logits: bool  # keep the verifier's logits in StepResult.target_logits
    wants_hidden: bool  # ... and its last hidden states in StepResult.target_hidden

    def on_step(self, state: DecodeState, step: StepResult, ledger: Ledger) -> None: ...
    def on_release(self, state: DecodeState) -> None: ...

    # optional: ``on_batch(states, steps, ledger)`` once per step, after the on_step calls


@dataclass
class DecodeStats:
    """Acceptance counters (DESIGN §7). Depths count from 0 (the first draft position)."""

    steps: int = 0  # target verification forwards
    emitted: int = 0
    proposed: int = 0  # draft positions along the verified path (tree depth per step)
    accepted: int = 0
    reached: list[int] = field(default_factory=list)  # steps whose walk reached depth i
    accepted_at: list[int] = field(default_factory=list)  # ... and accepted there

    def record(self, depth: int, accepted: int, emitted: int) -> None:
        self.steps += 1
        self.emitted += emitted
        self.proposed += depth
        self.accepted += accepted
        while len(self.reached) < depth:
            self.reached.append(0)
            self.accepted_at.append(0)
        for i in range(min(accepted + 1, depth)):
            self.reached[i] += 1
        for i in range(accepted):
            self.accepted_at[i] += 1

    def merge(self, other: DecodeStats) -> None:
        self.steps += other.steps
        self.emitted += other.emitted
        self.proposed += other.proposed
        self.accepted += other.accepted
        for i in range(len(other.reached)):
            if i >= len(self.reached):
                self.reached.append(0)
                self.accepted_at.append(0)
            self.reached[i] += other.reached[i]
            self.accepted_at[i] += other.accepted_at[i]

    @property
    def alpha(self) -> float:
        """Accepted ÷ proposed draft tokens along the verified path."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def alpha_per_pos(self) -> list[float]:
        """α_i: acceptance at draft position i given the walk reached it."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted_at, self.reached, strict=True)]

    @property
    def tau(self) -> float:
        """Tokens emitted per target forward, bonus included."""
        return self.emitted / self.steps if self.steps else 0.0

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "emitted": self.emitted,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "alpha": self.alpha,
            "alpha_per_pos": self.alpha_per_pos,
            "tau": self.tau,
        }


@dataclass
class GenerationOutput:
    tokens: list[int]  # generated tokens only
    text: str | None
    stats: DecodeStats
    ledger: Ledger
    finish_reason: str


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list | tuple) else {int(eos)}


class SpeculativeDecoder:
    """Target + drafter, batched: :meth:`step_batch` advances many sequences (ragged
    prompts, trees and accepted lengths) with one target forward; each holds a slot of a
    preallocated position-indexed KV cache (:mod:`osd.specdec.kvcache`)."""

    def __init__(
        self,
        target,
        drafter: Drafter | None = None,
        tokenizer=None,
        *,
        controller=None,
        ledger: Ledger | None = None,
        observers: Sequence[StepObserver] = (),
        typical: tuple[float, float] | None = None,
        pad_rows: bool = True,
    ) -> None:
        """``typical=(epsilon, delta)`` turns on Medusa's typical acceptance at T > 0:
        **LOSSY** — the output no longer follows the target's distribution. Off by default;
        greedy decoding ignores it. ``pad_rows``: run each verification at the cheapest row
        count at least the one it needs, measured once on this machine
        (:mod:`osd.specdec.rowcost`; on a CPU 2–4 rows cost more than 5–6)."""
        self.typical = typical
        self.target = target.eval()
        self.drafter = drafter or Drafter()
        self.tokenizer = tokenizer
        self.controller = controller
        self.ledger = ledger or Ledger()
        self.eos = _eos_ids(target, tokenizer)
        self.lm = LeanLM(target)
        self.context = self.lm.context
        self.rows = row_padding(self.lm) if pad_rows else RowPadding([])
        # tree nodes sit past the prefix in the cache: room for up to 255 of them
        self.cache = self.lm.new_cache(extra=256)
        self.observers: list[StepObserver] = []
        self.keep_logits = self.keep_hidden = False
        if controller is not None and hasattr(controller, "rows"):
            controller.rows = self.rows.rows  # it prices depths by the rows actually run
        for obs in [*observers, *([controller] if controller is not None else [])]:
            self.add_observer(obs)
        if self.drafter.stop is not None:  # the decision model labels its drafted positions
            self.add_observer(self.drafter.stop)

    def add_observer(self, observer: StepObserver) -> None:
        """Register a step observer; the engine keeps what it declares it wants."""
        if observer not in self.observers:
            self.observers.append(observer)
        self.keep_logits |= bool(observer.wants_logits)
        self.keep_hidden |= bool(observer.wants_hidden)

    # -- input boundary ----------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or a tokenizer")
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty; give at least one token")
        if len(ids) >= self.context:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the target's context is "
                f"{self.context}, leaving no room to generate"
            )
        vocab = self.target.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        return ids

    def start(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 64,
        sampling: SamplingParams | None = None,
        domain: str | None = None,
    ) -> DecodeState:
        """Validate the request, give it a cache slot, prefill it and let the drafter set up.
        ``domain``: the request's domain tag, if known (a mixture drafter routes by it).

        Every started state must leave through :meth:`release` (``generate`` does it)."""
        return self.start_batch([prompt], [max_new_tokens], [sampling], [domain])[0]

    def start_batch(
        self,
        prompts: Sequence[str | list[int]],
        max_new_tokens: Sequence[int],
        samplings: Sequence[SamplingParams | None] | None = None,
        domains: Sequence[str | None] | None = None,
    ) -> list[DecodeState]:
        """:meth:`start` for many requests at once: their prompts prefilled together
        (:func:`~osd.specdec.lean.prefill`: few target forwards instead of one each) and
        the drafter's set-up batched. All or none: if any request is refused, none is
        started (the caller may then start them one by one to find the bad one)."""
        samplings = samplings or [None] * len(prompts)
        domains = domains or [None] * len(prompts)
        states = []
        for prompt, max_new, sampling, domain in zip(
            prompts, max_new_tokens, samplings, domains, strict=True
        ):
            if not isinstance(max_new, int) or max_new <= 0:
                raise ValueError(f"max_new_tokens must be a positive int, got {max_new!r}")
            sampling = sampling or SamplingParams()
            ids = self.encode(prompt)
            state = DecodeState(
                tokens=list(ids),
                prompt_len=len(ids),
                max_new_tokens=min(max_new, self.context - len(ids)),
                sampling=sampling,
                generator=sampling.make_generator(),
                domain=domain,
            )
            self.drafter.check_domain(domain)
            states.append(state)
        with self.ledger.time("prefill"), torch.inference_mode():
            try:
                self.cache.reserve_slots(self.cache.used + len(states))
                for state in states:
                    state.slot = self.cache.alloc(state)
                hidden = self._prefill(states)
                for state, h in zip(states, hidden, strict=True):
                    state.target_hidden = h
                self.drafter.start_batch(states)
            except BaseException:
                for state in states:
                    self.release(state)
                raise
        return states

    def _prefill(self, states: Sequence[DecodeState]) -> list[torch.Tensor | None]:
        """Fill each slot with every token but the last (the pending root)."""
        seqs = [s.tokens[:-1] for s in states]
        self.cache.reserve(max(len(x) for x in seqs) + 1)
        hidden = self.drafter.needs_hidden_states
        # the root's logits come with the first verification
        return prefill(self.lm, self.cache, [s.slot for s in states], seqs, hidden)

    # -- the four stages ---------------------------------------------------------------
    def step(self, state: DecodeState, stats: DecodeStats | None = None) -> StepResult:
        """One propose → verify → accept → commit step of one sequence."""
        return self.step_batch([state], [stats])[0]

    @torch.inference_mode()
    def step_batch(
        self, states: Sequence[DecodeState], stats: Sequence[DecodeStats | None] | None = None
    ) -> list[StepResult]:
        """One step of each of ``states`` (none finished): one drafter call, **one** target
        forward over all their trees, batched acceptance, then each commit."""
        if not states:
            return []
        if any(s.finished or s.released for s in states):
            raise RuntimeError("step_batch() on a finished or released sequence")
        stats = stats or [None] * len(states)
        # emitted ≤ depth + 1 ≤ tokens_left: drafting deeper is wasted work (with a pending
        # token and a target-initialised drafter the first level *is* that token: ≤ depth)
        kept = self.drafter.defers_bonus
        depths = [
            max(0, s.tokens_left - (0 if kept and s.pending is not None else 1)) for s in states
        ]
        if self.controller is not None:  # load-aware: the batch size is part of its model
            cap = self.controller.depth(len(states))
            depths = [min(d, cap) for d in depths]
        for s in states:
            s.stop_feats = None  # the drafter sets them again if it drafts with a stop model
        with self.ledger.time("propose"):
            trees = self.drafter.propose_batch(states, depths)
            for tree, d in zip(trees, depths, strict=True):
                if tree.max_depth > d:
                    raise RuntimeError(
                        f"drafter {self.drafter.name!r} proposed depth {tree.max_depth} > "
                        f"allowed {d}"
                    )
        with self.ledger.time("verify"):
            logits, hidden = self._verify(states, trees)  # [b, T, V], [b, T, H]
        with self.ledger.time("accept"):
            results = self._accept(states, trees, logits)
        with self.ledger.time("commit"):
            steps = self._commit(states, trees, results, logits, hidden)
        for st, tree, res, step in zip(stats, trees, results, steps, strict=True):
            if st is not None:
                st.record(tree.max_depth, len(res.path), len(step.emitted))
        with self.ledger.time("observe"):
            self.drafter.observe_batch(states, steps)
        for state, step in zip(states, steps, strict=True):
            for obs in self.observers:
                obs.on_step(state, step, self.ledger)
        for obs in self.observers:
            on_batch = getattr(obs, "on_batch", None)
            if on_batch is not None:  # optional: the whole step at once (the controller)
                on_batch(states, steps, self.ledger)
        return steps

    def _verify(
        self, states: Sequence[DecodeState], trees: list[TokenTree]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One target forward over ``[root] + nodes`` of every tree (padded to ``T``)."""
        b = len(states)
        t = self.rows.rows(b, 1 + max(tree.size for tree in trees))
        prefix = torch.tensor([len(s.tokens) - 1 for s in states])  # [b] cached tokens
        ids = torch.zeros(b, t, dtype=torch.long)
        depth = torch.arange(t).expand(b, t).clone()  # padding: any position
        blocks = torch.zeros(b, t, t, dtype=torch.bool)
        for i, (s, tree) in enumerate(zip(states, trees, strict=True)):
            n = tree.size
            ids[i, 0] = s.tokens[-1]
            ids[i, 1 : n + 1] = tree.tokens
            depth[i, 1 : n + 1] = tree.depths
            blocks[i] = tree_block(tree, t)
        length = int(prefix.max()) + t
        self.cache.reserve(length)
        col = torch.arange(length)[None, None, :]
        mask = (col < prefix[:, None, None]).expand(b, t, length).clone()  # cached prefix
        at = prefix[:, None] + torch.arange(t)[None, :]  # [b, T] where the new K/V go
        mask.scatter_(2, at[:, None, :].expand(b, t, t), blocks)
        slots = torch.tensor([s.slot for s in states])
        hid = self.drafter.needs_hidden_states or self.keep_hidden
        return self.lm.forward(self.cache, slots, ids, prefix[:, None] + depth, at, mask, hid)

    def _accept(
        self, states: Sequence[DecodeState], trees: list[TokenTree], logits: torch.Tensor
    ) -> list[AcceptResult]:
        out: list[AcceptResult | None] = [None] * len(states)
        greedy = [i for i, s in enumerate(states) if s.sampling.greedy]
        sampled = [i for i, s in enumerate(states) if not s.sampling.greedy]
        if greedy:  # all greedy rows at once, the argmax on the logits' device
            width = 1 + max(trees[i].size for i in greedy)
            rows = (
                logits
                if len(greedy) == len(states)
                else logits.index_select(0, torch.tensor(greedy, device=logits.device))
            )
            rows = rows[:, :width]  # [g, n + 1, V]
            # as 2-D rows: on a CPU argmax over a 3-D tensor is ~10x slower, and
            # advanced indexing + slicing together as well; max(-1).indices is argmax
            # (both give the first maximum) at a third of its time here (5 × 4,096:
            # 11 vs 32 µs, 1 % of a batch-1 step)
            flat = rows.reshape(-1, rows.shape[-1])
            argmax = flat.max(-1).indices.view(rows.shape[:2])
            if argmax.device.type == "cpu":  # the walks on host lists: 21 vs 130 µs at b=1
                for i, row in zip(greedy, argmax.tolist(), strict=True):
                    tree = trees[i]
                    out[i] = walk_greedy(tree.tokens.tolist(), tree.parents.tolist(), row)
            else:  # batched on the device: no host loop
                tokens, parents = pad_trees([trees[i] for i in greedy])
                res = accept_greedy_batch(tokens, parents, argmax)
                for i, r in zip(greedy, res.unbind(), strict=True):
                    out[i] = r
        if self.typical is not None:  # LOSSY, opt-in: one tree at a time
            eps, delta = self.typical
            for i in sampled:
                n = trees[i].size
                q = self._target_probs(states[i], logits[i, : n + 1])
                out[i] = accept_typical(
                    trees[i].tokens, trees[i].parents, q, epsilon=eps, delta=delta
                )
            sampled = []
        for i in sampled:  # per request: its own temperature, top-k/p and generator
            tree, s = trees[i], states[i]
            q = self._target_probs(s, logits[i, : tree.size + 1])  # [n + 1, V]
            u = torch.rand(tree.size + 1, generator=s.generator, dtype=torch.float64)
            res = accept_sampling_batch(
                tree.tokens[None],
                tree.parents,
                q[None],
                None if tree.draft_probs is None else tree.draft_probs[None],
                tree.without_replacement,
                uniforms=u[None].to(q.device),
                dtype=q.dtype,
                check_siblings=False,
            )
            out[i] = res.unbind()[0]
        return out  # type: ignore[return-value]

    @staticmethod
    def _target_probs(state: DecodeState, logits: torch.Tensor) -> torch.Tensor:
        """``[n + 1, V]`` warped target rows; row 0 is the pending distribution when the
        last step kept its token undrawn (it may be a residual, not the recomputed row)."""
        q = warp_probs(logits, state.sampling)
        if state.pending is not None:
            q[0] = state.pending.to(q)
        return q

    def _pending(
        self, state: DecodeState, tree: TokenTree, result: AcceptResult, logits: torch.Tensor
    ) -> torch.Tensor:
        """``[V]`` what the step's undrawn last token is distributed as: greedy, the target
        logits after the last accepted node (the next tree ranks them); sampling, the
        warped row or residual :func:`~osd.specdec.accept.final_distribution` gives."""
        last = result.path[-1]
        if state.sampling.greedy:
            return logits[last + 1].detach().clone()
        q = self._target_probs(state, logits[: tree.size + 1])
        p = tree.draft_probs
        return final_distribution(tree.tokens, tree.parents, q, p, tree.without_replacement, result)

    def _commit(
        self,
        states: Sequence[DecodeState],
        trees: list[TokenTree],
        results: list[AcceptResult],
        logits: torch.Tensor,
        hidden: torch.Tensor | None,
    ) -> list[StepResult]:
        steps = []
        mv_slot: list[int] = []
        mv_src: list[int] = []
        mv_dst: list[int] = []
        for i, (state, tree, result) in enumerate(zip(states, trees, results, strict=True)):
            src, dst = moves(len(state.tokens), result.path)  # node 0 sits at len(tokens)
            mv_slot += [state.slot] * len(src)
            mv_src += src
            mv_dst += dst
            defer = self.drafter.defers_bonus and bool(result.path)  # target-initialised
            emitted = result.accepted_tokens if defer else result.emitted_tokens
            emitted = emitted[: state.tokens_left]
            for j, tok in enumerate(emitted):
                if tok in self.eos:
                    emitted = emitted[: j + 1]
                    state.finished, state.finish_reason = True, "stop"
                    break
            state.tokens.extend(emitted)
            if not state.finished and state.tokens_left <= 0:
                state.finished, state.finish_reason = True, "length"
            state.pending = None
            if defer and not state.finished:
                state.pending = self._pending(state, tree, result, logits[i])
            n = tree.size
            h = None if hidden is None else hidden[i, : n + 1]
            if h is not None and self.drafter.needs_hidden_states:
                # target hidden states along root + accepted path
                rows = torch.tensor([0] + [j + 1 for j in result.path], device=h.device)
                state.target_hidden = h.index_select(0, rows)
            steps.append(
                StepResult(
                    tree=tree,
                    accept=result,
                    emitted=emitted,
                    target_logits=logits[i, : n + 1] if self.keep_logits else None,
                    target_hidden=h if self.keep_hidden else None,
                    extra={"deferred": state.pending is not None},
                )
            )
        # KV: the accepted nodes move next to the root; the prefix never moves
        self.cache.move(torch.tensor(mv_slot), torch.tensor(mv_src), torch.tensor(mv_dst))
        return steps

    def release(self, state: DecodeState) -> None:
        """A sequence leaves the engine (finished or dropped): free its cache slot and the
        drafter's, and tell the observers. Idempotent."""
        if state.released:
            return
        state.released = True
        if state.slot >= 0:
            self.cache.free(state.slot)
            state.slot = -1
        self.drafter.release(state)
        for obs in self.observers:
            obs.on_release(state)

    # -- convenience -------------------------------------------------------------------
    def decode_batch(
        self,
        prompts: Sequence[str | list[int]],
        max_new_tokens: int,
        samplings: Sequence[SamplingParams | None] | None = None,
    ) -> tuple[list[DecodeState], list[DecodeStats]]:
        """Decode ``prompts`` to the end as one batch (one batched prefill, then
        :meth:`step_batch` over the sequences still running; each released as it
        finishes). Returns the finished states and each one's stats."""
        states = self.start_batch(prompts, [max_new_tokens] * len(prompts), samplings)
        stats = [DecodeStats() for _ in states]
        live = list(range(len(states)))
        while live:
            self.step_batch([states[i] for i in live], [stats[i] for i in live])
            for i in live:
                if states[i].finished:
                    self.release(states[i])
            live = [i for i in live if not states[i].finished]
        return states, stats

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 64,
        sampling: SamplingParams | None = None,
    ) -> GenerationOutput:
        stats = DecodeStats()
        before = Ledger()
        before.merge(self.ledger)
        state = self.start(prompt, max_new_tokens, sampling)
        while not state.finished:
            self.step(state, stats)
        self.release(state)
        new = state.tokens[state.prompt_len :]
        text = self.tokenizer.decode(new) if self.tokenizer is not None else None
        used = Ledger()
        for k, v in self.ledger.seconds.items():
            used.seconds[k] = v - before.seconds.get(k, 0.0)
            used.counts[k] = self.ledger.counts[k] - before.counts.get(k, 0)
        return GenerationOutput(new, text, stats, used, state.finish_reason or "length")
