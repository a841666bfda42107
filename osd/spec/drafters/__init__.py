"""Drafters, one per file. :func:`make_drafter` builds one by name (the CLI's ``--drafter``)."""

from __future__ import annotations

from osd.spec.drafters.base import DecodeState, Drafter, StepResult
from osd.spec.drafters.draft_model import DraftModelDrafter
from osd.spec.drafters.ngram import NgramDrafter

DRAFTERS = ("none", "draft_model", "ngram")


def make_drafter(
    name: str,
    draft_model=None,
    k: int = 4,
    tree: str | None = None,
    without_replacement: bool = True,
) -> Drafter:
    """``none`` (target only), ``draft_model`` (needs ``draft_model``), ``ngram``."""
    if name == "none":
        return Drafter()
    if name == "draft_model":
        if draft_model is None:
            raise ValueError("drafter 'draft_model' needs a draft model (--draft zoo:draft)")
        return DraftModelDrafter(
            draft_model, k=k, tree=tree, without_replacement=without_replacement
        )
    if name == "ngram":
        return NgramDrafter(k=k)
    raise ValueError(f"unknown drafter {name!r}; choose from {', '.join(DRAFTERS)}")


__all__ = [
    "DRAFTERS",
    "DecodeState",
    "DraftModelDrafter",
    "Drafter",
    "NgramDrafter",
    "StepResult",
    "make_drafter",
]
