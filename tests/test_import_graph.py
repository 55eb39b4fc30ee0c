"""No import cycles inside `peft_unlearn/`, function-local imports included.

The graph is built from the source with `ast`, without importing anything:

- a node is a module (`peft_unlearn.fila.state`); a package is its `__init__` (`peft_unlearn.fila`);
- an edge is an `import` / `from ... import` statement anywhere in the module (top level, function bodies,
  `try` blocks), relative imports resolved; `from pkg import name` is an edge to `pkg` and, where `pkg.name` is a
  module, to `pkg.name` too;
- not edges: imports under `if TYPE_CHECKING:` (never run), and the lazy `__getattr__` exports of package
  `__init__` files (`lazy_exports(globals(), {"Name": "peft_unlearn.x"})`: a string table, imported on first
  attribute access, after every module involved has finished importing);
- the implicit import of parent packages (importing `peft_unlearn.fila.state` first runs `peft_unlearn/__init__`)
  is not an edge: it happens before the module runs, whoever imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "peft_unlearn"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the intra-package modules it imports (see the module docstring for what counts)."""
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-loop), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"  {a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return f"cycle among {component}:\n" + "\n".join(edges)


def test_graph_sees_relative_and_local_imports():
    graph = import_graph()
    assert "peft_unlearn.fila.state" in graph["peft_unlearn.fila.fisher"]  # from .state import ...
    assert "peft_unlearn.utils" in graph["peft_unlearn.trainer.unlearning_trainer"]  # from ..utils import ...
    assert "peft_unlearn.metrics" in graph["peft_unlearn.trainer.evaluation"]  # function-local import


def test_cycle_detection_can_fail():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c"], ["e"]]


def test_type_checking_imports_are_not_edges(tmp_path):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("from .a import f\n")
    graph = import_graph(pkg)
    assert graph == {PACKAGE: set(), f"{PACKAGE}.a": {PACKAGE, f"{PACKAGE}.b"}, f"{PACKAGE}.b": {f"{PACKAGE}.a"}}
    assert find_cycles(graph) == [[f"{PACKAGE}.a", f"{PACKAGE}.b"]]


@pytest.mark.parametrize("package", [PACKAGE])
def test_no_import_cycles(package):
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(_describe(c, graph) for c in cycles)


# The layers of `peft_unlearn.fila`: each module imports only modules listed before it.
FILA_LAYERS = (
    "registry",
    "config",
    "state",
    "fisher_cache",
    "fisher_hooks",
    "fisher_passes",
    "fisher",
    "offset",
    "init",
    "preprocess",
    "vila",
    "covariance",
    "rila",
    "dispatch",
    "saving",
    "registration",
)


def test_fila_modules_import_only_lower_layers():
    graph = import_graph()
    rank = {f"{PACKAGE}.fila.{name}": i for i, name in enumerate(FILA_LAYERS)}
    assert set(rank) == {m for m in graph if m.startswith(f"{PACKAGE}.fila.")}, "update FILA_LAYERS"
    upward = [f"{a} -> {b}" for a in rank for b in sorted(graph[a]) if b in rank and rank[b] >= rank[a]]
    assert not upward, upward
    # the PEFT hooks are installed by `import peft_unlearn` (the fila package re-exports `register_fila`)
    importers = sorted(m for m, targets in graph.items() if f"{PACKAGE}.fila.registration" in targets)
    assert importers == [PACKAGE, f"{PACKAGE}.fila"], importers
