"""peft_core is layered bottom-up: no import cycle between its modules (function-level and
type-checking imports count too), and no import of the pipelines or their runtimes."""

from __future__ import annotations

import ast
from pathlib import Path

import peft_core

ROOT = Path(peft_core.__file__).parent
FORBIDDEN = ("pipelines", "cluster", "ray", "deepspeed", "mlflow")


def _module_name(file: Path) -> str:
    parts = ["peft_core", *file.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between peft_core modules, top-level packages imported from outside)."""
    files = {_module_name(f): f for f in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    outside: dict[str, set[str]] = {m: set() for m in files}
    for mod, file in files.items():
        package = mod if file.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                # ``from package import submodule`` imports the submodule
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                         for a in node.names]
            else:
                continue
            for name in names:
                if name in files:
                    edges[mod].add(name)
                elif not name.startswith("peft_core"):
                    outside[mod].add(name.split(".")[0])
    return edges, outside


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_between_peft_core_modules() -> None:
    edges, _ = _graph()
    assert "peft_core.io" in edges["peft_core"]  # the walk sees the package's imports
    cycle = _cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_io_sits_on_top_of_model_and_files_at_the_bottom() -> None:
    edges, _ = _graph()
    assert "peft_core.model" in edges["peft_core.io"]
    assert edges["peft_core.files"] <= {"peft_core.errors"}


def test_peft_core_imports_no_pipelines_or_their_runtimes() -> None:
    _, outside = _graph()
    found = {m: sorted(set(o) & set(FORBIDDEN)) for m, o in outside.items()}
    assert not {m: o for m, o in found.items() if o}
