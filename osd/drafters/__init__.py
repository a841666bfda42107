"""Drafters, one per file, and the one way to build them: :func:`build_drafter` by name.

Every caller that needs a drafter — ``osd generate``, ``osd bench``, the Serve replica, the
trainer, the gate, the registry actor and the one-process loop — builds it here, so a new
drafter is registered once in :data:`DRAFTERS` and is then served, trained and gated by
the same code.

A drafter that learns online also registers its **student** factory
(``DrafterSpec.student``, :mod:`osd.distill.student`): the trainer, the promotion gate and
the registry get what to train, predict and version with :func:`build_student`, by name.

>>> sorted(DRAFTERS)
['draft_model', 'eagle', 'koala-eagle', 'koala-medusa', 'medusa', 'mixture', 'ngram', 'none', 'recurrent']
>>> build_drafter("ngram", None, k=3).k
3
>>> build_drafter("ngram", None, depth=3)
Traceback (most recent call last):
    ...
ValueError: drafter 'ngram' takes no option 'depth'; it takes: k, max_ngram, min_ngram, nodes, history
>>> sorted(name for name, spec in DRAFTERS.items() if spec.trainable)
['draft_model', 'eagle', 'koala-eagle', 'koala-medusa', 'medusa', 'mixture', 'recurrent']
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from osd.distill.student import CausalLMStudent, Student
from osd.drafters.base import DecodeState, Drafter, StepResult
from osd.drafters.draft_model import DraftModelDrafter, draft_shortlist
from osd.drafters.head_specs import HEAD_SPECS
from osd.drafters.mixture import build_mixture, mixture_student
from osd.drafters.ngram import NgramDrafter


@dataclass(frozen=True)
class DrafterSpec:
    """How to build one kind of drafter.

    ``build(target, draft, **config)`` makes it; ``needs_draft`` says it needs a separate
    draft model (``--draft``); ``summary`` is what ``--help`` and errors show;
    ``student(drafter)`` gives what online distillation trains (it trains the drafter's
    own module in place), ``None`` for drafters with nothing to train.
    """

    name: str
    build: Callable[..., Drafter]
    needs_draft: bool
    summary: str
    student: Callable[[Drafter], Student] | None = None

    @property
    def trainable(self) -> bool:
        return self.student is not None

    def options(self) -> list[str]:
        params = inspect.signature(self.build).parameters
        return [p for p in params if p not in ("target", "draft")]


def _none(target=None, draft=None) -> Drafter:
    return Drafter()


def _draft_model(
    target=None,
    draft=None,
    k: int = 4,
    tree: str | tuple[int, ...] | None = None,
    without_replacement: bool = True,
    shortlist: bool = False,
    early_stop: float | None = None,
    target_init: bool = False,
) -> Drafter:
    if draft is None:
        raise ValueError("drafter 'draft_model' needs a draft model (--draft zoo:draft)")
    ids = draft_shortlist(draft) if shortlist else None
    return DraftModelDrafter(
        draft,
        k=k,
        tree=tree,
        without_replacement=without_replacement,
        shortlist=ids,
        early_stop=early_stop,
        target_init=target_init,
    )


def _draft_model_student(drafter: Drafter) -> Student:
    return CausalLMStudent(drafter.model)


def _ngram(
    target=None,
    draft=None,
    k: int = 4,
    max_ngram: int = 3,
    min_ngram: int = 1,
    nodes: int = 0,
    history: int = 0,
) -> Drafter:
    return NgramDrafter(k, max_ngram, min_ngram, nodes, history)


DRAFTERS: dict[str, DrafterSpec] = {
    s.name: s
    for s in (
        DrafterSpec("none", _none, False, "no drafter: plain target decoding"),
        DrafterSpec(
            "draft_model",
            _draft_model,
            True,
            "a separate draft model: chain of k or k-config tree",
            student=_draft_model_student,
        ),
        DrafterSpec(
            "ngram",
            _ngram,
            False,
            "prompt lookup (model-free): a chain, or a suffix tree of `nodes` over the "
            "sequence and the `history` of finished ones",
        ),
        DrafterSpec(
            "mixture",
            build_mixture,
            True,
            "an adapter of the draft per domain + a router (domain tag, or learned)",
            student=mixture_student,
        ),
        # medusa, eagle, koala-medusa, koala-eagle, recurrent: osd.drafters.head_specs
        *(DrafterSpec(**spec) for spec in HEAD_SPECS),
    )
}


def drafter_spec(name: str) -> DrafterSpec:
    try:
        return DRAFTERS[name]
    except KeyError:
        raise ValueError(
            f"unknown drafter {name!r}; choose from {', '.join(sorted(DRAFTERS))}"
        ) from None


def build_drafter(
    name: str, target=None, draft=None, *, lenient: bool = False, **config: Any
) -> Drafter:
    """Build the drafter registered as ``name`` with its options (``k``, ``tree``, …).

    Options it does not take are an error that lists those it does — or, with
    ``lenient=True`` (CLI flags shared by all drafters), dropped. ``None`` values are
    dropped so that CLI defaults pass through.
    """
    spec = drafter_spec(name)
    config = {k: v for k, v in config.items() if v is not None}
    allowed = spec.options()
    bad = sorted(set(config) - set(allowed))
    if lenient:
        config = {k: v for k, v in config.items() if k in allowed}
    elif bad:
        raise ValueError(
            f"drafter {name!r} takes no option {bad[0]!r}; it takes: "
            f"{', '.join(allowed) or 'nothing'}"
        )
    return spec.build(target=target, draft=draft, **config)


def build_student(name: str, drafter: Drafter) -> Student:
    """The student of ``drafter`` (built as ``name``): what the trainer, the gate and the
    registry train, evaluate and version. Its module IS the drafter's: build a separate
    drafter for training, not the one that serves."""
    spec = drafter_spec(name)
    if spec.student is None:
        trainable = sorted(n for n, s in DRAFTERS.items() if s.trainable)
        raise ValueError(
            f"drafter {name!r} has nothing to train online; trainable drafters: "
            f"{', '.join(trainable)}"
        )
    return spec.student(drafter)


__all__ = [
    "DRAFTERS",
    "DecodeState",
    "DraftModelDrafter",
    "Drafter",
    "DrafterSpec",
    "NgramDrafter",
    "StepResult",
    "build_drafter",
    "build_student",
    "drafter_spec",
]
