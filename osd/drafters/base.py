"""The drafter interface and the records passed between the engine's stages.

A drafter is small (compare Hugging Face's ``CandidateGenerator``): ``start`` a sequence,
``propose`` a :class:`~osd.specdec.tree.TokenTree`, ``observe`` what was accepted,
``release`` it; plus the weight surface the registry swaps (``state_dict`` /
``load_state_dict`` / ``version``). The engine calls the batch forms ``propose_batch`` /
``observe_batch``, which loop over the one-sequence forms unless a drafter batches them
itself (the draft model drafts all sequences in one forward per depth).
Per-sequence drafter state lives in ``DecodeState.draft`` so that batched decoding can hold
many sequences at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from osd.specdec.accept import AcceptResult
from osd.specdec.sampling import SamplingParams
from osd.specdec.tree import TokenTree


@dataclass
class DecodeState:
    """One sequence being decoded."""

    tokens: list[int]  # committed: prompt + generated; the last one is the pending root
    prompt_len: int
    max_new_tokens: int
    sampling: SamplingParams
    generator: torch.Generator | None = None
    slot: int = -1  # the engine's KV-cache slot (holds tokens[:-1]); -1 once released
    draft: Any = None  # the drafter's per-sequence state
    target_hidden: torch.Tensor | None = None  # [L, H] target last hidden states, newest last
    # [V] the target's distribution of the token after tokens[-1] when the last step kept
    # it instead of drawing it (target-initialised trees; warped, or the logits if greedy)
    pending: torch.Tensor | None = None
    domain: str | None = None  # the request's domain tag, when the client gave one
    route: str | None = None  # the adapter a mixture drafter chose (logged with the record)
    # [n, 4] decision-model features of the positions drafted this step (early stop;
    # osd.specdec.decision), set by the drafter, labelled after verification
    stop_feats: torch.Tensor | None = None
    finished: bool = False
    finish_reason: str | None = None
    released: bool = False  # the engine freed its caches (SpeculativeDecoder.release)

    @property
    def cache_extent(self) -> int:
        """Positions of its slot that hold K/V worth keeping (``KVCache.free`` copies these):
        ``tokens[:-1]``, and one more."""
        return len(self.tokens)

    @property
    def new_tokens(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def tokens_left(self) -> int:
        return self.max_new_tokens - self.new_tokens


@dataclass
class StepResult:
    """What one propose → verify → accept → commit step did."""

    tree: TokenTree
    accept: AcceptResult
    emitted: list[int]  # tokens appended this step (after EOS / budget truncation)
    target_logits: torch.Tensor | None = None  # [n + 1, V] verifier logits (for logging)
    target_hidden: torch.Tensor | None = None  # [n + 1, H] verifier last hidden states
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def proposed_depth(self) -> int:
        return self.tree.max_depth

    @property
    def accepted(self) -> int:
        return self.accept.num_accepted


@dataclass(frozen=True)
class VersionedPart:
    """A part of a drafter with registry versions of its own (:meth:`Drafter.parts`): the
    early-stop decision model, or one adapter of a mixture versioned per adapter.

    ``module`` has the drafter's weight surface (``version``, ``state_dict()``,
    ``load_state_dict(state_dict, version)``); its registry id is the drafter's id +
    ``suffix``; ``student(vocab_size)`` is what a trainer trains (in place on ``module``)
    and the gate scores; its trainer reads the drafter's record stream through the
    consumer group ``group`` (every group gets every record); ``distill`` names the
    trainer settings it takes (``"distill"``: the drafter's, ``"decision"``: the decision
    model's)."""

    suffix: str
    module: Any
    student: Callable[[int], Any]
    group: str
    distill: str = "distill"


class Drafter:
    """Base class: a drafter that proposes nothing (plain target decoding)."""

    name = "none"
    needs_hidden_states = False  # the engine returns target hidden states only when True
    # target-initialised: a step that accepted a token keeps its last token's distribution
    # in DecodeState.pending (not drawn); the next tree's first level is that top-k
    defers_bonus = False
    # the early-stop decision model (osd.specdec.decision.AcceptPredictor) an autoregressive
    # drafter consults while drafting; the engine registers it as a step observer
    stop = None

    def __init__(self) -> None:
        self.version = 0

    def start(self, state: DecodeState) -> None:
        """A new sequence begins: set up ``state.draft``."""

    def start_batch(self, states: Sequence[DecodeState]) -> None:
        """Several sequences begin together (override to batch their set-up)."""
        for state in states:
            self.start(state)

    def propose(self, state: DecodeState, max_depth: int) -> TokenTree:
        """Candidates after ``state.tokens``, no deeper than ``max_depth``."""
        return TokenTree.empty()

    def observe(self, state: DecodeState, result: StepResult) -> None:
        """Acceptance feedback after commit (``state.tokens`` already extended)."""

    def release(self, state: DecodeState) -> None:
        """The sequence is gone: free what ``start`` set up."""

    def reset(self) -> None:
        """Forget what earlier sequences taught it without training (the n-gram drafter's
        history); ``osd bench`` calls it after its warm-up."""

    def check_domain(self, domain: str | None) -> None:
        """Refuse (``ValueError``) a request's domain tag this drafter cannot serve; any
        tag by default (it only labels the request's record)."""

    def propose_batch(self, states: Sequence[DecodeState], depths: list[int]) -> list[TokenTree]:
        """One tree per state, no deeper than its ``depths[i]``."""
        return [
            self.propose(s, d) if d > 0 else TokenTree.empty()
            for s, d in zip(states, depths, strict=True)
        ]

    def observe_batch(self, states: Sequence[DecodeState], results: Sequence[StepResult]) -> None:
        for s, r in zip(states, results, strict=True):
            self.observe(s, r)

    # weight surface swapped by the registry
    # False: trainers train only its parts, the drafter's own id stays at its base version
    trains_whole = True

    def parts(self) -> dict[str, VersionedPart]:
        """Parts versioned under ids of their own (by part name); the decision model's,
        ``"stop"``, when the drafter has one."""
        if self.stop is None:
            return {}
        from osd.distill.decision import SUFFIX, DecisionStudent

        net = self.stop.net
        return {
            "stop": VersionedPart(
                SUFFIX, self.stop, lambda vocab: DecisionStudent(net, vocab), "decision", "decision"
            )
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        if state_dict:
            raise ValueError(f"drafter {self.name!r} has no weights")
        self.version = version
