"""The import graph of the project, read statically (``ast``, nothing imported): no cycle
between its modules and only the allowed directions between its packages.

Every ``import``/``from ... import`` counts, at module level and inside functions (a late
import hides a cycle, it does not remove one), with relative imports resolved. Only imports
under ``if TYPE_CHECKING:`` are left out: they never run.

The layers, bottom up: ``peft_core`` (no Ray, DeepSpeed or MLflow, nothing of the project
above it) <- ``pipelines`` <- ``cluster`` <- ``peftpipe`` (the entry that composes the CLI).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("peft_core", "pipelines", "cluster", "peftpipe")
#: what each top-level package may not import (project packages or third-party libraries)
FORBIDDEN = {
    "peft_core": {"pipelines", "cluster", "peftpipe", "ray", "deepspeed", "mlflow"},
    "pipelines": {"cluster", "peftpipe"},
    "cluster": {"peftpipe"},
}


def _modules() -> dict[str, Path]:
    """Every module of the project by dotted name (a package by its ``__init__``)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Import statements anywhere in ``tree`` except the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Dotted names ``name`` imports: project modules resolved to the module itself (a
    submodule named in ``from pkg import mod`` counts as ``pkg.mod``), others as given."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.add(_project_prefix(alias.name, modules))
            continue
        if node.level:
            base = here[:len(here) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
        out.update(subs)
        if len(subs) < len(node.names):  # some names are attributes of ``target`` itself
            out.add(_project_prefix(target, modules))
    out.discard(name)
    return out


def _project_prefix(dotted: str, modules: dict[str, Path]) -> str:
    """The longest prefix of ``dotted`` that is a project module (``dotted`` otherwise)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return dotted


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start] & graph.keys())))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
                continue
            if child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child] & graph.keys()))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def test_the_graph_sees_late_and_relative_imports() -> None:
    """The reader itself: a function-level relative import is an edge."""
    graph = _graph()
    assert "cluster.validate" in graph["cluster.cli"]  # `from . import validate` in a function
    assert "pipelines.tune.stage" in graph["pipelines.tune"]  # a lazy `from .stage import`


def test_no_import_cycle_between_project_modules() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    lines = []
    for comp in cycles:
        edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in comp]
        lines.append(f"cycle {comp}: " + "; ".join(edges))
    assert not cycles, "\n".join(lines)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_only_downwards(package: str) -> None:
    bad = sorted(f"{m} -> {t}" for m, targets in _graph().items()
                 if m.split(".")[0] == package
                 for t in targets if t.split(".")[0] in FORBIDDEN[package])
    assert not bad, f"{package} must not import {sorted(FORBIDDEN[package])}:\n" + "\n".join(bad)
