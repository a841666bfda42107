"""The head drafters' registry entries: ``medusa``, ``koala-medusa``, ``eagle``, ``koala-eagle``,
``recurrent`` (ReDrafter).

Each loads its heads from ``heads=DIR`` or, by default, from the zoo
(``osd/zoo/artifacts/heads/<name>``, written by ``osd heads train``); the ``koala-`` ones
are the K-layer, adversarially trained heads of the same two kinds. The autoregressive ones
(``eagle``, ``koala-eagle``, ``recurrent``) take ``early_stop=THRESHOLD``: the online
decision model of :mod:`osd.specdec.decision`, as the draft model does. Their student
(:mod:`osd.distill.head_student`) trains the drafter's head module in place.
"""

from __future__ import annotations

from osd.drafters.base import Drafter
from osd.drafters.heads import heads_dir, load_heads


def _medusa_builder(name: str):
    def build(
        target=None, draft=None, heads: str | None = None, nodes: int | str = "auto"
    ) -> Drafter:
        from osd.drafters.medusa import MedusaDrafter

        if target is None:
            raise ValueError(f"drafter {name!r} needs the target (its heads read its states)")
        module, config = load_heads(heads or heads_dir(name), target)
        if config.kind != "medusa":
            raise ValueError(f"drafter {name!r} needs medusa heads; {heads} holds {config.kind}")
        drafter = MedusaDrafter(target, module, config, nodes=nodes)
        drafter.name = name
        return drafter

    return build


def _eagle_builder(name: str):
    def build(
        target=None,
        draft=None,
        heads: str | None = None,
        depth: int = 5,
        topk: int = 4,
        width: int = 4,
        nodes: int = 24,
        early_stop: float | None = None,
    ) -> Drafter:
        from osd.drafters.eagle import EagleDrafter

        if target is None:
            raise ValueError(f"drafter {name!r} needs the target (its head reads its states)")
        module, config = load_heads(heads or heads_dir(name), target)
        if config.kind != "eagle":
            raise ValueError(f"drafter {name!r} needs an eagle head; {heads} holds {config.kind}")
        drafter = EagleDrafter(target, module, config, depth, topk, width, nodes, early_stop)
        drafter.name = name
        return drafter

    return build


def _recurrent(
    target=None,
    draft=None,
    heads: str | None = None,
    width: int = 5,
    length: int = 5,
    stochastic: bool = True,
    all_levels: bool = True,
    early_stop: float | None = None,
) -> Drafter:
    from osd.drafters.recurrent import RecurrentDrafter

    if target is None:
        raise ValueError("drafter 'recurrent' needs the target (its head reads its states)")
    module, config = load_heads(heads or heads_dir("recurrent"), target)
    if config.kind != "recurrent":
        raise ValueError(f"drafter 'recurrent' needs a recurrent head; {heads} holds {config.kind}")
    return RecurrentDrafter(
        target, module, config, width, length, stochastic, all_levels, early_stop
    )


def _student(drafter: Drafter):
    from osd.distill.head_student import head_student

    return head_student(drafter)


HEAD_SPECS: list[dict] = [
    {
        "name": "medusa",
        "build": _medusa_builder("medusa"),
        "needs_draft": False,
        "summary": "Medusa heads on the target's hidden state: a static tree",
        "student": _student,
    },
    {
        "name": "koala-medusa",
        "build": _medusa_builder("koala-medusa"),
        "needs_draft": False,
        "summary": "KOALA: K-layer Medusa heads, adversarially trained",
        "student": _student,
    },
    {
        "name": "eagle",
        "build": _eagle_builder("eagle"),
        "needs_draft": False,
        "summary": "EAGLE-style autoregressive feature head: a dynamic tree",
        "student": _student,
    },
    {
        "name": "koala-eagle",
        "build": _eagle_builder("koala-eagle"),
        "needs_draft": False,
        "summary": "KOALA: K-layer EAGLE-style head, adversarially trained",
        "student": _student,
    },
    {
        "name": "recurrent",
        "build": _recurrent,
        "needs_draft": False,
        "summary": "ReDrafter: recurrent head, beam search into a dynamic prefix tree",
        "student": _student,
    },
]
