"""Replay a drafter against a known greedy output: its exact greedy acceptance, no target.

Under greedy decoding the output is the target's greedy continuation whatever the drafter,
so how a *different* drafter would have fared on the same request can be computed by
walking that output: at each step the drafter proposes, greedy acceptance follows the
children that match the known next tokens, and the walk advances by accepted + 1. Only the
drafter runs. This is how the online loop measures the frozen draft beside the learning one
on the same stream at a fraction of the cost.

Worked example — prompt ``[1]``, known output ``[5, 6, 7, 8]``, a drafter that always
proposes the chain ``5 → 6 → 9``: step 1 accepts ``5, 6``, rejects ``9`` and emits the
recovered ``7``; step 2 has one token left, drafts nothing and emits ``8``. α = 2/3, τ = 2.

A target-initialised drafter (``defers_bonus``, improved MCSD) needs the target's rows
(``logits``): as in the engine, a step that accepted a token emits the accepted ones only
and keeps the next token's target row in ``DecodeState.pending`` for the next tree's first
level.
"""

from __future__ import annotations

import torch

from osd.drafters.base import DecodeState, Drafter, StepResult
from osd.specdec.accept import accept_greedy
from osd.specdec.engine import DecodeStats
from osd.specdec.sampling import SamplingParams
from osd.specdec.tree import TokenTree, path_to


def _known_argmax(tree: TokenTree, future: list[int]) -> torch.Tensor:
    """[n + 1] target argmax rows that greedy acceptance can read; −1 where unreachable."""
    rows = [future[0]] + [-1] * tree.size
    tokens = tree.tokens.tolist()
    for j in range(tree.size):
        path = path_to(tree, j)
        depth = len(path)
        if depth < len(future) and [tokens[i] for i in path] == future[:depth]:
            rows[j + 1] = future[depth]
    return torch.tensor(rows, dtype=torch.long)


def replay_greedy(
    drafter: Drafter,
    tokens: list[int],
    prompt_len: int,
    max_depth: int = 64,
    stats: DecodeStats | None = None,
    hidden: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
) -> DecodeStats:
    """Acceptance counters ``drafter`` would get decoding ``tokens[prompt_len:]`` greedily.

    ``hidden`` ``[len(tokens), H]``: the target's last hidden states over ``tokens`` (one
    forward), for a drafter that reads them (head drafters): the replay hands it the rows
    the engine would (``DecodeState.target_hidden``: the prefix at the start, then the root
    and the accepted path).

    ``logits`` ``[len(tokens), V]``: the target's logits over ``tokens`` (one forward), for
    a drafter that ``defers_bonus``: its pending rows."""
    if drafter.defers_bonus and logits is None:
        raise ValueError(f"replaying {drafter.name!r} (target-initialised) needs the target logits")
    stats = stats if stats is not None else DecodeStats()
    output = tokens[prompt_len:]
    state = DecodeState(
        tokens=list(tokens[:prompt_len]),
        prompt_len=prompt_len,
        max_new_tokens=len(output),
        sampling=SamplingParams(),
    )
    if hidden is not None:
        state.target_hidden = hidden[: prompt_len - 1]
    drafter.start(state)
    while state.tokens_left > 0:
        future = output[state.new_tokens :]
        kept = state.pending is not None  # the first level is that token: one deeper
        depth = min(max_depth, len(future) - (0 if kept else 1))
        tree = drafter.propose(state, depth) if depth > 0 else TokenTree.empty()
        result = accept_greedy(tree.tokens, tree.parents, _known_argmax(tree, future))
        defer = drafter.defers_bonus and bool(result.path)
        emitted = result.accepted_tokens if defer else result.emitted_tokens
        state.pending = None
        if defer and len(emitted) < len(future):
            state.pending = logits[len(state.tokens) + len(emitted) - 1]
        if hidden is not None:  # root + accepted path, as the engine commits them
            state.target_hidden = hidden[
                len(state.tokens) - 1 : len(state.tokens) + len(emitted) - 1
            ]
        state.tokens.extend(emitted)
        stats.record(tree.max_depth, result.num_accepted, len(emitted))
        drafter.observe(state, StepResult(tree=tree, accept=result, emitted=emitted))
    drafter.release(state)
    return stats
