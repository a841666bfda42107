"""A mixture of drafts (OSD §4.2): one adapter of the base draft per domain, and a router.

Each **adapter** is the base draft model with its own weights — a LoRA adapter on the
shared base when the trainer distils with ``lora: true`` (the registry stores adapter +
spec, replicas get it merged), a full copy otherwise — drafting through a
:class:`~osd.drafters.draft_model.DraftModelDrafter` of its own. The **router**
(:class:`~osd.drafters.router.Router`) picks one adapter per request when it starts: the
request's domain tag if it names one, else a rule learned from the acceptance each adapter
got on similar prompts. The chosen adapter drafts the whole request; the sequence's
``route`` is logged with its distill record (``meta["adapter"]``), so the trainer trains
each adapter only on the records it drafted (:class:`MixtureStudent`), and the router is
told the request's α when it finishes.

Lossless as every drafter: the target verifies whatever an adapter proposes (greedy output
= the target's greedy output; sampled output follows the target's distribution).

Batched: a batch of sequences is split by route, each adapter drafts its group in one
call, and the trees go back in the batch's order.

Weights, two ways (``versioning``):

- ``mixture`` (default): the mixture's ``state_dict`` holds every adapter's under its
  name, ``"<domain>.<the draft's own name>"``, so the registry versions the mixture as one
  drafter id (each version holds every adapter; a LoRA version each adapter's LoRA tensors
  on the same base version), and a replica adopts all adapters of a version at once;
- ``adapter``: each adapter is a :class:`~osd.drafters.base.VersionedPart` with registry
  versions of its own, ``<drafter_id>-<domain>``: a trainer per adapter
  (:class:`AdapterStudent`, trained only on the records that adapter drafted, read through
  a consumer group of its own), a gate per adapter (on the held-out records it drafted),
  and replicas adopt each adapter's versions as they come; the mixture's own id stays at
  its base version.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from osd.distill.record import DistillRecord
from osd.distill.student import CausalLMStudent, Student
from osd.drafters.base import DecodeState, Drafter, StepResult, VersionedPart
from osd.drafters.draft_model import DraftModelDrafter
from osd.drafters.router import Router
from osd.specdec.tree import TokenTree

__all__ = [
    "AdapterStudent",
    "MixtureDrafter",
    "MixtureStudent",
    "build_mixture",
    "parse_domains",
    "record_adapter",
]

DEFAULT_DOMAINS = "math,sql,code"
_NAME = re.compile(r"^[a-z0-9_-]{1,32}$")


def parse_domains(domains: str | Sequence[str]) -> list[str]:
    """``"math,sql"`` → ``["math", "sql"]``, validated (names go into weight names).

    >>> parse_domains("math, sql")
    ['math', 'sql']
    >>> parse_domains("math,Math")
    Traceback (most recent call last):
        ...
    ValueError: mixture domains must be 1-32 of a-z 0-9 _ -, distinct, e.g. math,sql,code; got ['math', 'Math']
    """
    names = [d.strip() for d in domains.split(",")] if isinstance(domains, str) else list(domains)
    names = [d for d in names if d]
    if not names or len(set(names)) != len(names) or not all(_NAME.match(d) for d in names):
        raise ValueError(
            "mixture domains must be 1-32 of a-z 0-9 _ -, distinct, e.g. math,sql,code; "
            f"got {names}"
        )
    return names


@dataclass
class _Open:
    """A sequence in flight: its prompt's features and its acceptance so far."""

    features: np.ndarray
    proposed: int = 0
    accepted: int = 0


class MixtureDrafter(Drafter):
    """Adapters by domain + a router; see the module docstring."""

    name = "mixture"

    def __init__(
        self, adapters: Mapping[str, DraftModelDrafter], router: Router, per_adapter: bool = False
    ) -> None:
        super().__init__()
        if list(adapters) != router.adapters:
            raise ValueError(f"router adapters {router.adapters} != {list(adapters)}")
        self.adapters = dict(adapters)
        self.router = router
        self.per_adapter = per_adapter
        self.trains_whole = not per_adapter
        self._open: dict[int, _Open] = {}  # id(state) -> its feedback, until it finishes

    @property
    def k(self) -> int:
        return next(iter(self.adapters.values())).k

    @property
    def domains(self) -> list[str]:
        return list(self.adapters)

    def check_domain(self, domain: str | None) -> None:
        self.router.check(domain)

    # -- per sequence ------------------------------------------------------------------
    def start(self, state: DecodeState) -> None:
        self.start_batch([state])

    def start_batch(self, states: Sequence[DecodeState]) -> None:
        for s in states:
            x = self.router.features(s.tokens[: s.prompt_len])
            s.route = self.router.route(x, s.domain)
            self._open[id(s)] = _Open(x)
        for name, idx in self._groups(states):
            self.adapters[name].start_batch([states[i] for i in idx])

    def propose(self, state: DecodeState, max_depth: int) -> TokenTree:
        return self.propose_batch([state], [max_depth])[0]

    def propose_batch(self, states: Sequence[DecodeState], depths: list[int]) -> list[TokenTree]:
        trees: list[TokenTree | None] = [None] * len(states)
        for name, idx in self._groups(states):
            out = self.adapters[name].propose_batch(
                [states[i] for i in idx], [depths[i] for i in idx]
            )
            for i, tree in zip(idx, out, strict=True):
                trees[i] = tree
        return trees  # type: ignore[return-value]

    def observe(self, state: DecodeState, result: StepResult) -> None:
        self.observe_batch([state], [result])

    def observe_batch(self, states: Sequence[DecodeState], results: Sequence[StepResult]) -> None:
        for name, idx in self._groups(states):
            self.adapters[name].observe_batch([states[i] for i in idx], [results[i] for i in idx])
        for s, r in zip(states, results, strict=True):
            fb = self._open.get(id(s))
            if fb is not None:
                fb.proposed += r.proposed_depth
                fb.accepted += r.accepted
            if s.finished:
                self._close(s)

    def release(self, state: DecodeState) -> None:
        if state.route in self.adapters:
            self.adapters[state.route].release(state)
        self._close(state)

    def _close(self, state: DecodeState) -> None:
        """The sequence is done: tell the router the α its adapter got (once)."""
        fb = self._open.pop(id(state), None)
        if fb is not None and fb.proposed > 0 and state.route is not None:
            self.router.update(fb.features, state.route, fb.accepted / fb.proposed)

    def _groups(self, states: Sequence[DecodeState]) -> list[tuple[str, list[int]]]:
        """Indices of ``states`` per adapter, in the adapters' order."""
        out: dict[str, list[int]] = {}
        for i, s in enumerate(states):
            if s.route not in self.adapters:
                raise RuntimeError(f"sequence has no route of this mixture: {s.route!r}")
            out.setdefault(s.route, []).append(i)
        return [(name, out[name]) for name in self.adapters if name in out]

    # -- weights ---------------------------------------------------------------------------
    def parts(self) -> dict[str, VersionedPart]:
        """Per-adapter versioning: one part per adapter, ``adapter:<domain>``."""
        if not self.per_adapter:
            return super().parts()

        def student(name: str):
            return lambda vocab: AdapterStudent(self.adapters[name].model, name)

        return {
            f"adapter:{name}": VersionedPart(f"-{name}", sub, student(name), f"adapter-{name}")
            for name, sub in self.adapters.items()
        }

    def state_dict(self) -> dict[str, Tensor]:
        return {
            f"{name}.{key}": value
            for name, sub in self.adapters.items()
            for key, value in sub.state_dict().items()
        }

    def load_state_dict(self, state_dict: dict[str, Tensor], version: int) -> None:
        """Every adapter's weights at once (all or none: checked before any is loaded)."""
        parts: dict[str, dict[str, Tensor]] = {name: {} for name in self.adapters}
        for key, value in state_dict.items():
            name, _, rest = key.partition(".")
            if name not in parts:
                raise ValueError(
                    f"weight {key!r} names no adapter of this mixture ({', '.join(parts)})"
                )
            parts[name][rest] = value
        for name, sub in self.adapters.items():
            mine = set(sub.model.state_dict())
            if set(parts[name]) != mine:
                missing = sorted(mine - set(parts[name]))[:3]
                raise ValueError(f"adapter {name!r}: weights missing or extra (e.g. {missing})")
        for name, sub in self.adapters.items():
            sub.load_state_dict(parts[name], version)
        self.version = version


class MixtureStudent(Student):
    """What the trainer distils for a mixture: every adapter's model (an ``nn.ModuleDict``
    by domain; LoRA wraps each one's linear layers), each record predicted by the adapter
    that drafted it — ``record.meta["adapter"]``, else its ``domain`` when that names an
    adapter. A record of no adapter has nothing to predict (0 positions: acked, skipped)."""

    lora_task_type = None  # a ModuleDict, not one Hugging Face model

    def __init__(self, models: Mapping[str, nn.Module]) -> None:
        self.parts = {name: CausalLMStudent(m) for name, m in models.items()}
        first = next(iter(self.parts.values()))
        super().__init__(nn.ModuleDict(dict(models)), first.vocab_size, first.context)

    def adapter_of(self, record: DistillRecord) -> str | None:
        return record_adapter(record, self.parts)

    def predictable(self, record: DistillRecord, max_len: int | None = None) -> int:
        if self.adapter_of(record) is None:
            return 0
        return super().predictable(record, max_len)

    def predict(self, records: Sequence[DistillRecord], max_len: int | None = None) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(records)
        groups: dict[str, list[int]] = {}
        for i, rec in enumerate(records):
            name = self.adapter_of(rec)
            if name is None:
                out[i] = torch.zeros(0, self.vocab_size, device=self.device)
            else:
                groups.setdefault(name, []).append(i)
        for name, idx in groups.items():  # one forward per adapter
            preds = self.parts[name].predict([records[i] for i in idx], max_len)
            for i, p in zip(idx, preds, strict=True):
                out[i] = p
        return out  # type: ignore[return-value]


def record_adapter(record: DistillRecord, names) -> str | None:
    """The adapter of ``names`` that drafted ``record``: ``meta["adapter"]``, else its
    ``domain`` when that names one; ``None`` otherwise."""
    name = record.meta.get("adapter")
    if name in names:
        return str(name)
    return record.domain if record.domain in names else None


class AdapterStudent(CausalLMStudent):
    """One adapter of a mixture versioned on its own (``versioning: adapter``): its model,
    predicting only the records it drafted (others: 0 positions, acked and skipped)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__(model)
        self.name = name

    def predictable(self, record: DistillRecord, max_len: int | None = None) -> int:
        if record_adapter(record, (self.name,)) is None:
            return 0
        return super().predictable(record, max_len)

    def predict(self, records: Sequence[DistillRecord], max_len: int | None = None) -> list[Tensor]:
        mine = [i for i, r in enumerate(records) if record_adapter(r, (self.name,))]
        out = [torch.zeros(0, self.vocab_size, device=self.device) for _ in records]
        if mine:
            for i, p in zip(
                mine, super().predict([records[i] for i in mine], max_len), strict=True
            ):
                out[i] = p
        return out


def build_mixture(
    target=None,
    draft=None,
    k: int = 4,
    domains: str | Sequence[str] = DEFAULT_DOMAINS,
    router: str = "tag",
    explore: float = 0.05,
    home: float = 0.1,
    versioning: str = "mixture",
) -> MixtureDrafter:
    """A mixture of ``domains`` adapters of ``draft`` (the first adapter drafts with
    ``draft`` itself, the others with copies), chain length ``k``; ``router``: ``tag``
    (a request's domain tag, else learned) or ``learned`` (tags ignored); ``explore`` and
    ``home``: the learned router's exploration bonus and its home margin; ``versioning``:
    ``mixture`` (one registry id) or ``adapter`` (an id per adapter; module docstring)."""
    if draft is None:
        raise ValueError("drafter 'mixture' needs a draft model (--draft zoo:draft)")
    if versioning not in ("mixture", "adapter"):
        raise ValueError(f"versioning must be 'mixture' or 'adapter', got {versioning!r}")
    names = parse_domains(domains)
    adapters = {
        name: DraftModelDrafter(draft if i == 0 else copy.deepcopy(draft), k=k)
        for i, name in enumerate(names)
    }
    return MixtureDrafter(
        adapters,
        Router(names, mode=router, explore=explore, home=home),
        per_adapter=versioning == "adapter",
    )


def mixture_student(drafter: Drafter) -> Student:
    """:class:`MixtureStudent` of a :class:`MixtureDrafter` (its adapters' own models)."""
    if not isinstance(drafter, MixtureDrafter):
        raise TypeError(f"a mixture student needs a MixtureDrafter, got {type(drafter).__name__}")
    return MixtureStudent({name: sub.model for name, sub in drafter.adapters.items()})
