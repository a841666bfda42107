"""The speculative decoding engine: propose → verify → accept → commit, one step at a time.

>>> dec = SpeculativeDecoder(target, DraftModelDrafter(draft, k=4), tokenizer)  # doctest: +SKIP
>>> out = dec.generate("Question: 2 + 3?\\nAnswer:", max_new_tokens=32)       # doctest: +SKIP
>>> out.text, out.stats.tau                                                    # doctest: +SKIP

Serving code drives :meth:`SpeculativeDecoder.start` / :meth:`~SpeculativeDecoder.step`
itself, which is where a new drafter version can be adopted: between steps, never inside.

Stopping. A step emits ``accepted + 1`` tokens; the commit cuts them at the first EOS
(inclusive) and at ``max_new_tokens``, exactly where target-only decoding would stop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache

from osd.drafters.base import DecodeState, Drafter, StepResult
from osd.specdec.accept import AcceptResult, accept_greedy, accept_sampling, accept_typical
from osd.specdec.kvcache import compact, keep_slots
from osd.specdec.ledger import Ledger
from osd.specdec.sampling import SamplingParams, warp_probs
from osd.specdec.tree import TokenTree
from osd.specdec.verify import prefill, verify_tree

log = logging.getLogger(__name__)


@dataclass
class StepObserver(Protocol):
    """Declared by whoever watches the engine's steps (record collection, metrics, the
    speculation controller): what it needs kept, and what it does with each step."""

    wants_logits: bool  # keep the verifier's logits in StepResult.target_logits
    wants_hidden: bool  # ... and its last hidden states in StepResult.target_hidden

    def on_step(self, state: DecodeState, step: StepResult, ledger: Ledger) -> None: ...
    def on_release(self, state: DecodeState) -> None: ...


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
    """Target + drafter. One sequence per step loop; state is per sequence."""

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
    ) -> None:
        """``typical=(epsilon, delta)`` turns on Medusa's typical acceptance at T > 0:
        **LOSSY** — the output no longer follows the target's distribution. Off by default;
        greedy decoding ignores it."""
        self.typical = typical
        self.target = target.eval()
        self.drafter = drafter or Drafter()
        self.tokenizer = tokenizer
        self.controller = controller
        self.ledger = ledger or Ledger()
        self.eos = _eos_ids(target, tokenizer)
        self.context = int(getattr(target.config, "max_position_embeddings", 1 << 30))
        self.observers: list[StepObserver] = []
        self.keep_logits = self.keep_hidden = False
        for obs in [*observers, *([controller] if controller is not None else [])]:
            self.add_observer(obs)

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
    ) -> DecodeState:
        """Validate the request, prefill the target cache and let the drafter set up."""
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        sampling = sampling or SamplingParams()
        ids = self.encode(prompt)
        max_new = min(max_new_tokens, self.context - len(ids))
        state = DecodeState(
            tokens=list(ids),
            prompt_len=len(ids),
            max_new_tokens=max_new,
            sampling=sampling,
            generator=sampling.make_generator(),
            target_cache=DynamicCache(),
        )
        with self.ledger.time("prefill"), torch.inference_mode():
            h = prefill(
                self.target,
                state.target_cache,
                state.tokens,
                hidden=self.drafter.needs_hidden_states,
            )
            state.target_hidden = h
            self.drafter.start(state)
        return state

    # -- the four stages ---------------------------------------------------------------
    @torch.inference_mode()
    def step(self, state: DecodeState, stats: DecodeStats | None = None) -> StepResult:
        """One propose → verify → accept → commit step. Never called on a finished state."""
        if state.finished:
            raise RuntimeError("step() on a finished sequence")
        # emitted ≤ depth + 1 ≤ tokens_left: drafting deeper is wasted work
        max_depth = max(0, state.tokens_left - 1)
        if self.controller is not None:
            max_depth = min(max_depth, self.controller.depth())
        with self.ledger.time("propose"):
            tree = self.drafter.propose(state, max_depth) if max_depth > 0 else None
            if tree is None:
                tree = TokenTree.empty()
            if tree.max_depth > max_depth:
                raise RuntimeError(
                    f"drafter {self.drafter.name!r} proposed depth "
                    f"{tree.max_depth} > allowed {max_depth}"
                )
        with self.ledger.time("verify"):
            prefix = len(state.tokens) - 1
            logits, hidden = verify_tree(
                self.target,
                state.target_cache,
                state.tokens[-1],
                tree,
                hidden=self.drafter.needs_hidden_states or self.keep_hidden,
            )
        with self.ledger.time("accept"):
            result = self._accept(state, tree, logits)
        with self.ledger.time("commit"):
            step = self._commit(state, tree, result, prefix, logits, hidden)
        if stats is not None:
            stats.record(tree.max_depth, len(result.path), len(step.emitted))
        with self.ledger.time("observe"):
            self.drafter.observe(state, step)
        for obs in self.observers:
            obs.on_step(state, step, self.ledger)
        return step

    def step_batch(
        self, states: Sequence[DecodeState], stats: Sequence[DecodeStats | None] | None = None
    ) -> list[StepResult]:
        """One step of each of ``states`` (none finished)."""
        stats = stats or [None] * len(states)
        return [self.step(s, st) for s, st in zip(states, stats, strict=True)]

    def release(self, state: DecodeState) -> None:
        """A sequence leaves the engine (finished or dropped): free what it holds and tell
        the observers. Idempotent."""
        if state.released:
            return
        state.released = True
        state.target_cache = state.draft = None
        for obs in self.observers:
            obs.on_release(state)

    def _accept(self, state: DecodeState, tree, logits: torch.Tensor) -> AcceptResult:
        if state.sampling.greedy:
            return accept_greedy(tree.tokens, tree.parents, logits.argmax(-1))
        q = warp_probs(logits, state.sampling)  # [n + 1, V]
        if self.typical is not None:  # LOSSY, opt-in
            eps, delta = self.typical
            return accept_typical(tree.tokens, tree.parents, q, epsilon=eps, delta=delta)
        return accept_sampling(
            tree.tokens,
            tree.parents,
            q,
            tree.draft_probs,
            tree.without_replacement,
            state.generator,
        )

    def _commit(
        self,
        state: DecodeState,
        tree,
        result: AcceptResult,
        prefix: int,
        logits: torch.Tensor,
        hidden: torch.Tensor | None,
    ) -> StepResult:
        emitted = result.emitted_tokens[: state.tokens_left]
        for i, t in enumerate(emitted):
            if t in self.eos:
                emitted = emitted[: i + 1]
                state.finished, state.finish_reason = True, "stop"
                break
        state.tokens.extend(emitted)
        if not state.finished and state.tokens_left <= 0:
            state.finished, state.finish_reason = True, "length"
        # KV: prefix + root + accepted path (the last emitted token stays pending)
        compact(state.target_cache, keep_slots(prefix, result.path))
        if hidden is not None and self.drafter.needs_hidden_states:
            # target hidden states along root + accepted path
            rows = torch.tensor([0] + [i + 1 for i in result.path])
            state.target_hidden = hidden.index_select(0, rows.to(hidden.device))
        return StepResult(
            tree=tree,
            accept=result,
            emitted=emitted,
            target_logits=logits if self.keep_logits else None,
            target_hidden=hidden if self.keep_hidden else None,
        )

    # -- convenience -------------------------------------------------------------------
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
