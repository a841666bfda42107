"""From decoding to distill records: the target's logits at emitted positions, per request.

A :class:`RecordCollector` is a step observer of the engine
(``SpeculativeDecoder(observers=[collector])``) and keeps, for each sequence, the
**verifier's** logits rows (no second target pass) at the positions it logs:

- ``all``: every emitted position;
- ``rejected`` (OSD): the position of the step's last emitted token — the recovered token
  where the draft was wrong, or the bonus token after a fully accepted draft.

Which verifier row predicts which emitted token: row 0 (after the root) predicts the
first emitted token, row ``path[j] + 1`` (after the j-th accepted node) the next one.
Worked example — tokens before the step ``[7, 8, 9]`` (positions 0..2), accepted path
``[0, 2]``, emitted ``[a, c, r]``: positions 3, 4, 5 are predicted by rows 0, 1, 3;
``rejected`` mode logs only position 5 (row 3). With ``LogConfig(hidden=True)`` the
verifier's last hidden state at the same rows is logged too (what head drafters train on).
A target-initialised step that kept its last token undrawn (``step.extra["deferred"]``)
emitted ``[a, c]`` only: ``rejected`` mode logs the kept token's position 5 (row 3) now —
the next step emits it — and a record keeps only positions its tokens reach.
A drafter with an early-stop decision model leaves the features of the positions it drafted
in ``DecodeState.stop_feats``; the collector logs them with their verification labels
(:func:`osd.specdec.decision.stop_labels`) as ``stop_features`` / ``stop_labels``, what the
decision model's trainer learns from (every step's, whatever the log mode).
"""

from __future__ import annotations

import torch

from osd.distill.record import DistillRecord, LogConfig, LogMode, build_record, should_log
from osd.drafters.base import DecodeState, StepResult
from osd.specdec.decision import stop_labels


class RecordCollector:
    """Collects logged rows per sequence; :meth:`finish` turns them into one record."""

    def __init__(self, config: LogConfig | None = None) -> None:
        self.config = config or LogConfig()
        # per sequence: logged positions, logits rows [V], hidden rows [H] (if configured)
        self._rows: dict[int, tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = {}
        # per sequence: decision-model features [n, 4] and labels of each step
        self._stop: dict[int, tuple[list[torch.Tensor], list[int]]] = {}

    wants_logits = True  # the verifier's logits rows are what a record logs

    @property
    def wants_hidden(self) -> bool:
        return self.config.hidden

    def on_release(self, state: DecodeState) -> None:
        """Nothing: rows stay until :meth:`finish` or :meth:`discard`."""

    def on_step(self, state: DecodeState, step: StepResult, ledger=None) -> None:
        if state.stop_feats is not None and step.tree.size:
            labels = stop_labels(step.tree.max_depth, step.accepted)
            xs, ys = self._stop.setdefault(id(state), ([], []))
            xs.append(state.stop_feats[: len(labels)].detach().float().cpu())
            ys += [int(y) for y in labels]
        if step.target_logits is None or not step.emitted:
            return
        first = len(state.tokens) - len(step.emitted)  # position of the first emitted token
        rows = [0] + [i + 1 for i in step.accept.path]
        idx = list(range(len(step.emitted)))
        if self.config.mode == LogMode.REJECTED:
            if step.extra.get("deferred"):  # the kept token: emitted by the next step
                idx = [len(step.emitted)]
            else:
                idx = idx[-1:] if len(step.emitted) == len(rows) else []
        positions, logits, hidden = self._rows.setdefault(id(state), ([], [], []))
        for j in idx:
            positions.append(first + j)
            logits.append(step.target_logits[rows[j]].detach().float().cpu())
            if self.config.hidden and step.target_hidden is not None:
                hidden.append(step.target_hidden[rows[j]].detach().float().cpu())

    def discard(self, state: DecodeState) -> None:
        self._rows.pop(id(state), None)
        self._stop.pop(id(state), None)

    def finish(
        self,
        state: DecodeState,
        request_id: str,
        drafter_id: str,
        version: int,
        domain: str | None = None,
    ) -> DistillRecord | None:
        """The request's record, or ``None`` when it logged nothing or is not sampled.

        The record carries the request's sampling parameters (``state.sampling``): the
        trainer and the gate honour its temperature; and, for a mixture drafter, the adapter
        that drafted it (``meta["adapter"]``: the one the record trains)."""
        positions, logits, hidden = self._rows.pop(id(state), ([], [], []))
        xs, ys = self._stop.pop(id(state), ([], []))
        keep = [i for i, t in enumerate(positions) if t < len(state.tokens)]  # a kept token
        if len(keep) < len(positions):  # never emitted (the request was dropped first)
            positions = [positions[i] for i in keep]
            logits = [logits[i] for i in keep]
            hidden = [hidden[i] for i in keep] if hidden else hidden
        if not positions or not should_log(request_id, self.config.rate, self.config.seed):
            return None
        return build_record(
            request_id,
            state.tokens,
            state.prompt_len,
            positions,
            torch.stack(logits),
            k=self.config.k,
            hidden=torch.stack(hidden) if hidden else None,
            drafter_id=drafter_id,
            version=version,
            domain=domain,
            temperature=state.sampling.temperature,
            top_k=state.sampling.top_k,
            top_p=state.sampling.top_p,
            meta=None if state.route is None else {"adapter": state.route},
            stop_features=torch.cat(xs) if ys else None,
            stop_labels=ys if ys else None,
        )
