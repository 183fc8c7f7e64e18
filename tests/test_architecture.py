"""The package's structure, as docs/architecture.md states it: layers, no circles, no privates.

Parsed from the sources (every import statement, including those inside functions), so a new
module is checked the day it is added.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "gapcallback"

#: Layer of each top-level part (lower numbers sit below). A module may import its own layer
#: (``utils`` and ``search`` excepted: they are leaves) and the layers below, never above.
LAYERS = {
    "utils": 0,
    "data": 0,
    "search": 1,
    "symmetry": 2,
    "functional": 3,
    "metrics": 4,
    "law": 4,
    "optim": 4,
    "plotting": 5,
    "evaluation": 6,
    "callbacks": 7,
    "cli": 8,
    "__main__": 9,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


#: Imports against the layers, each with its reason (made inside the function that needs them).
ALLOWED_UPWARD = {
    ("gapcallback.law.gap_law", "gapcallback.plotting"): (
        "GapLaw.plot: a convenience drawing with plotting.plot_law, imported when called "
        "(matplotlib is optional)"
    ),
}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Ids of the nodes inside ``if TYPE_CHECKING:`` blocks (never executed)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            out |= {id(n) for child in node.body for n in ast.walk(child)}
    return out


def _imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` of every executed ``from gapcallback... import name`` in ``path``."""
    out = []
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("gapcallback")
        ):
            out += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names if a.name.startswith("gapcallback.")]
    return out


def _target(module: str, name: str) -> str:
    """The module an import reaches: the submodule when ``name`` is one, else ``module``."""
    return f"{module}.{name}" if f"{module}.{name}" in MODULES else module


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@functools.cache
def _graph_once() -> dict[str, frozenset[str]]:
    return {m: frozenset(t) for m, t in _graph_uncached().items()}


def _graph() -> dict[str, set[str]]:
    """Module -> the gapcallback modules it imports (a fresh copy)."""
    return {m: set(t) for m, t in _graph_once().items()}


def _graph_uncached() -> dict[str, set[str]]:
    return {
        m: {_target(mod, name) for mod, name in _imports(p) if _target(mod, name) in MODULES}
        for m, p in MODULES.items()
    }


def test_no_module_imports_another_modules_private_names() -> None:
    bad = [
        f"{m} imports {name} from {mod}"
        for m, p in MODULES.items()
        for mod, name in _imports(p)
        if name.startswith("_") and mod != m
    ]
    assert bad == []


def test_no_import_circles() -> None:
    graph = _graph()
    for module, target in ALLOWED_UPWARD:  # imported when called, after both modules loaded
        graph[module].discard(target)
    # A package's __init__ re-exporting its submodules is not a circle unless one imports it back.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _part(m) in LAYERS))
def test_layers_import_only_downwards(module: str) -> None:
    here = LAYERS[_part(module)]
    for target in _graph()[module]:
        part = _part(target)
        if part not in LAYERS or part == _part(module) or (module, target) in ALLOWED_UPWARD:
            continue
        assert LAYERS[part] < here, (
            f"{module} (layer {here}) imports {target} (layer {LAYERS[part]})"
        )


def test_module_names_do_not_shadow_public_functions() -> None:
    import importlib
    import types

    for package in ("gapcallback", "gapcallback.functional", "gapcallback.search",
                    "gapcallback.symmetry", "gapcallback.metrics", "gapcallback.callbacks",
                    "gapcallback.evaluation", "gapcallback.cli"):  # fmt: skip
        pkg = importlib.import_module(package)
        for name, path in MODULES.items():
            if name.rsplit(".", 1)[0] == package and path.name != "__init__.py":
                attr = getattr(pkg, name.rsplit(".", 1)[1], None)
                assert attr is None or isinstance(attr, types.ModuleType), f"{package}.{name}"
