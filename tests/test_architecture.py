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

from tests.project import PACKAGES, ROOT, modules

#: what each top-level package may not import (project packages or third-party libraries)
FORBIDDEN = {
    "peft_core": {"pipelines", "cluster", "peftpipe", "ray", "deepspeed", "mlflow"},
    "pipelines": {"cluster", "peftpipe"},
    "cluster": {"peftpipe"},
}


def _modules() -> dict[str, Path]:
    return modules()


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
        target = _from_target(node, here)
        subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
        out.update(subs)
        if len(subs) < len(node.names):  # some names are attributes of ``target`` itself
            out.add(_project_prefix(target, modules))
    out.discard(name)
    return out


def _from_target(node: ast.ImportFrom, here: list[str]) -> str:
    """The dotted module a ``from ... import`` reads from, relative imports resolved
    against ``here`` (the importing module's package)."""
    if node.level:
        base = here[:len(here) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))
    return node.module or ""


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


# -- other libraries' private API: pipelines/compat.py only ---------------------------------------

#: the one module that may import another library's private modules or use ctypes
COMPAT = "pipelines.compat"
#: peft_core may not import pipelines (so not compat either); what it may still use
#: privately, by module or package (none today)
PEFT_CORE_EXCEPTIONS: dict[str, set[str]] = {}
#: sites whose owners still have to switch to the compat function named, by module or
#: package (the test below fails once a site no longer needs its entry, so the entry is
#: removed with the switch)
PENDING: dict[str, set[str]] = {}


def _is_private(dotted: str) -> bool:
    """A module or name below a library's top level whose dotted path has an underscored
    (not dunder) part: ``ray._private.x``, ``torch.utils._pytree``."""
    return any(p.startswith("_") and not p.endswith("__") for p in dotted.split(".")[1:])


def _private_uses(path: Path) -> set[str]:
    """Other libraries' private modules and names ``path`` imports, and ``ctypes``."""
    import sys

    out = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level or not node.module:
                continue  # a relative import: the project's own
            # the module when it is private, else any private name taken from it
            targets = [node.module] if _is_private(node.module) else [
                f"{node.module}.{a.name}" for a in node.names]
        else:
            targets = [a.name for a in node.names]
        for t in targets:
            top = t.split(".")[0]
            if top == "ctypes":
                out.add("ctypes")
            elif (top not in PACKAGES and top != "tests" and top not in sys.stdlib_module_names
                  and _is_private(t)):
                out.add(t)
    return out


def _private_uses_by_module() -> dict[str, set[str]]:
    uses = {name: _private_uses(path) for name, path in _modules().items()}
    return {name: u for name, u in uses.items() if u}


def _excused(module: str) -> set[str]:
    """What ``module`` may use by an entry for it or for a package above it."""
    out: set[str] = set()
    for key, names in {**PEFT_CORE_EXCEPTIONS, **PENDING}.items():
        if module == key or module.startswith(key + "."):
            out |= names
    return out


def test_the_private_api_reader_sees_each_form() -> None:
    uses = _private_uses_by_module()
    assert {"ctypes", "ray._private.authentication.http_token_authentication"} <= uses[COMPAT]
    assert not _is_private("ray.util.state") and not _is_private("deepspeed.ops.__init__")


def test_only_compat_uses_other_libraries_private_api() -> None:
    bad = sorted(f"{m}: {sorted(u - _excused(m))}"
                 for m, u in _private_uses_by_module().items()
                 if m != COMPAT and u - _excused(m))
    assert not bad, ("only pipelines/compat.py may import other libraries' private modules or "
                     "use ctypes; add a function there (with the version it was checked "
                     "against and why no public API does it) and call it:\n" + "\n".join(bad))


def test_no_stale_exception_to_the_compat_rule() -> None:
    uses = _private_uses_by_module()
    used = {key: set().union(*[u for m, u in uses.items()
                               if m == key or m.startswith(key + ".")])
            for key in {**PEFT_CORE_EXCEPTIONS, **PENDING}}
    stale = sorted(f"{key}: {sorted(names - used[key])}"
                   for key, names in {**PEFT_CORE_EXCEPTIONS, **PENDING}.items()
                   if names - used[key])
    assert not stale, ("these sites no longer use what tests/test_architecture.py excuses "
                       "them for; remove the entries:\n" + "\n".join(stale))


# -- the project's own boundaries: public names, small functions, one sharding decision ------

def _private_names_from_other_modules() -> list[str]:
    """``from X import _name`` across project modules, where ``_name`` is not a private
    helper module of the importer's own package (``from . import _weights``)."""
    modules = _modules()
    bad = []
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _from_target(node, here)
            if target.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                if not a.name.startswith("_") or a.name.startswith("__"):
                    continue
                own_helper = (f"{target}.{a.name}" in modules
                              and target == ".".join(here))
                if not own_helper:
                    bad.append(f"{name}: from {target} import {a.name}")
    return bad


def test_no_module_imports_a_private_name_of_another() -> None:
    bad = _private_names_from_other_modules()
    assert not bad, "make the name public or keep it in its module:\n" + "\n".join(bad)


#: the longest a function of ``pipelines/``, ``cluster/`` or ``peftpipe/`` may be, in lines
#: (decorators included)
MAX_FUNCTION_LINES = 80


def test_no_function_in_pipelines_or_cluster_is_over_80_lines() -> None:
    long = []
    paths = [p for pkg in ("pipelines", "cluster", "peftpipe") for p in (ROOT / pkg).rglob("*.py")]
    for path in sorted(paths):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                n = node.end_lineno - start + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "\n".join(long)


#: where the training stage may read the ZeRO stage: the recipe's validation, the
#: translation into DeepSpeed's config, and the sharding decision the worker acts through
ZERO_STAGE_READERS = {"config.py", "deepspeed_config.py", "sharding.py"}


def _code_only(path: Path) -> str:
    """``path``'s source without its strings and comments (an error message may name
    ``zero.stage``; only code reads it)."""
    import io
    import tokenize

    toks = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return " ".join(t.string for t in toks if t.type not in (tokenize.STRING, tokenize.COMMENT))


def test_the_worker_decides_zero3_in_one_module() -> None:
    import re

    pattern = re.compile(r"zero \. stage|\bstage [=!<>]= 3|\bz \. stage\b")
    train = ROOT / "pipelines" / "train"
    readers = {str(p.relative_to(train)) for p in train.rglob("*.py")
               if pattern.search(_code_only(p))}
    assert readers <= ZERO_STAGE_READERS, sorted(readers - ZERO_STAGE_READERS)
    assert "sharding.py" in readers
