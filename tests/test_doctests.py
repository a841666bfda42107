"""Every worked example in the library's docstrings runs (``doctest``), module by module.

The Ray application (``osd.actors``) is left out: its modules start nothing at import, but
their examples, where they have any, need a cluster."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest


def _modules() -> list[str]:
    import osd.kernels  # installed from kernels/ (package-dir): walked on its own

    names = [
        m.name
        for path, prefix in ((osd.__path__, "osd."), (osd.kernels.__path__, "osd.kernels."))
        for m in pkgutil.walk_packages(path, prefix)
        if not m.name.startswith("osd.actors")
    ]
    return sorted(set(names))


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
