"""Every docstring example of the package runs (`+SKIP` marks the few that need a real model or a trainer)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import peft_unlearn

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(peft_unlearn.__path__, prefix="peft_unlearn.")
    if "__main__" not in name
)


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples of {name} failed"


def test_most_modules_have_examples():
    """Guard against a suite that tests nothing: most modules carry runnable examples."""
    finder = doctest.DocTestFinder()
    with_examples = [name for name in MODULES if any(t.examples for t in finder.find(importlib.import_module(name)))]
    assert len(with_examples) >= 0.8 * len(MODULES), sorted(set(MODULES) - set(with_examples))
