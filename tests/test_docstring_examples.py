"""Every ``>>>`` example in the package's docstrings runs and prints what it says.

The examples are what a user copies first; a stale one (a value that changed with a rule, a
renamed argument) is a plausible-looking wrong answer. One test per module that has examples.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import gapcallback

# Modules whose import has effects beyond definitions (entry points) are read, not imported.
_SKIP = {"gapcallback.__main__"}


def _modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(gapcallback.__path__, prefix="gapcallback."):
        if info.name in _SKIP:
            continue
        spec = importlib.util.find_spec(info.name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        with open(spec.origin, encoding="utf-8") as source:
            if ">>> " in source.read():
                names.append(info.name)
    return sorted(names)


MODULES = _modules_with_examples()


def test_the_package_has_examples():
    assert len(MODULES) >= 10, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name) if t.examples]
    assert tests, f"{name} has '>>> ' in its source but no docstring example was found"
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
