"""The project's one exception tree (:mod:`pipelines.errors`).

Every exception class defined in ``pipelines`` and ``cluster`` derives from
:class:`~pipelines.errors.PeftPipeError`, through :class:`~pipelines.errors.InputError`
(exit 2) or :class:`~pipelines.errors.JobError` (exit 1), so the CLI maps the two bases to
exit codes instead of listing leaves. The classes are found by reading every module with
``ast`` (a new module or class is seen without being listed here), then checked on the
imported class objects (their real bases, inherited ones included). Only ``Exception``
subclasses count: ``pipelines.tune.result.SearchInterrupted`` is a ``KeyboardInterrupt``
(control flow that ends a command with 130), not an error.
"""

from __future__ import annotations

import ast
import builtins
import importlib
from pathlib import Path

import pytest

from pipelines.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    InputError,
    JobError,
    PeftPipeError,
    exit_code,
)
from tests.project import modules

PACKAGES = ("pipelines", "cluster")

#: Exception classes whose rebase another change owns; the second test fails once one is
#: rebased, so that its entry is removed here.
PENDING: set[str] = set()

_BUILTIN_EXCEPTIONS = {n for n, v in vars(builtins).items()
                       if isinstance(v, type) and issubclass(v, BaseException)}


def _modules() -> dict[str, Path]:
    return modules(PACKAGES)


def _class_defs(tree: ast.AST):
    """``(qualname, node, in_function)`` for every class statement in ``tree``."""
    stack: list[tuple[ast.AST, str, bool]] = [(tree, "", False)]
    while stack:
        node, prefix, in_function = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                qual = f"{prefix}{child.name}"
                yield qual, child, in_function
                stack.append((child, f"{qual}.", in_function))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                stack.append((child, f"{prefix}<locals>.", True))
            else:
                stack.append((child, prefix, in_function))


def _looks_like_exception(node: ast.ClassDef) -> bool:
    for base in node.bases:
        name = ast.unparse(base).rsplit(".", 1)[-1]
        if name in _BUILTIN_EXCEPTIONS or name.endswith(("Error", "Exception")):
            return True
    return False


def _walk() -> tuple[dict[str, type], list[str]]:
    """Every ``Exception`` subclass defined at module (or class) level, by qualified name;
    and the function-local classes that look like exceptions (which cannot be checked on
    the object: they must move to module level)."""
    found: dict[str, type] = {}
    local: list[str] = []
    for name, path in _modules().items():
        defs = list(_class_defs(ast.parse(path.read_text(), str(path))))
        if not defs:
            continue
        module = importlib.import_module(name)
        for qual, node, in_function in defs:
            if in_function:
                if _looks_like_exception(node):
                    local.append(f"{name}.{qual}")
                continue
            obj = module
            for part in qual.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, type) and issubclass(obj, Exception):
                found[f"{name}.{qual}"] = obj
    return found, local


@pytest.fixture(scope="module")
def walked() -> tuple[dict[str, type], list[str]]:
    return _walk()


def test_the_walk_sees_the_exception_classes(walked) -> None:
    found, _ = walked
    for name in ("pipelines.recipe.RecipeError", "pipelines.data.config.MissingSourceError",
                 "pipelines.pipeline.TrialsFailedError", "cluster.local.ClusterError",
                 "cluster.submit.SubmitError", "cluster.validate.DeployError",
                 "pipelines.errors.InputError"):
        assert name in found, name


def test_every_exception_class_is_a_peftpipe_error(walked) -> None:
    found, local = walked
    bad = sorted(n for n, cls in found.items()
                 if not issubclass(cls, PeftPipeError) and n not in PENDING)
    assert not bad, ("not a pipelines.errors.PeftPipeError (rebase on InputError, exit 2, "
                     "or JobError, exit 1):\n" + "\n".join(bad))
    assert not local, "exception classes defined in a function: " + ", ".join(local)
    both = sorted(n for n, cls in found.items()
                  if issubclass(cls, InputError) and issubclass(cls, JobError))
    assert not both, f"both InputError and JobError: {both}"


def test_pending_entries_are_still_pending(walked) -> None:
    found, _ = walked
    done = sorted(n for n in PENDING if n not in found or issubclass(found[n], PeftPipeError))
    assert not done, f"rebased (or gone): remove from PENDING: {done}"


def test_exit_code_maps_the_bases() -> None:
    import peft_core

    assert exit_code(InputError("x")) == EXIT_BAD_INPUT == 2
    assert exit_code(JobError("x")) == EXIT_FAILED == 1
    assert exit_code(peft_core.PeftError("x")) == EXIT_BAD_INPUT
    assert exit_code(peft_core.ConfigError("x")) == EXIT_BAD_INPUT
    assert exit_code(KeyboardInterrupt()) == EXIT_INTERRUPTED == 130
    # anything not ours (a library's ValueError included) is a job that failed
    assert exit_code(ValueError("x")) == EXIT_FAILED
    assert exit_code(RuntimeError("x")) == EXIT_FAILED
    assert issubclass(InputError, ValueError) and issubclass(JobError, RuntimeError)


#: each leaf, the exit code the commands give it, and the builtin class it stayed
LEAVES = [
    ("pipelines.recipe.RecipeError", 2, ValueError),
    ("pipelines.data.config.DataError", 2, ValueError),
    ("pipelines.data.config.MissingSourceError", 2, FileNotFoundError),
    ("pipelines.data.manifest.DatasetError", 2, ValueError),
    ("pipelines.tune.resources.ResourceError", 2, ValueError),
    ("pipelines.promote.PromotionError", 2, RuntimeError),
    ("pipelines.registry.RegistryError", 2, RuntimeError),
    ("pipelines.serve.local.ServeError", 2, RuntimeError),
    ("cluster.submit.SubmitError", 2, ValueError),
    ("cluster.validate.DeployError", 2, ValueError),
    ("pipelines.pipeline.NoWinnerError", 1, RuntimeError),
    ("pipelines.pipeline.TrialsFailedError", 1, RuntimeError),
    ("cluster.local.ClusterError", 1, RuntimeError),
    ("pipelines.train.checkpoint.ResumeError", 2, RuntimeError),
    ("pipelines.train.partitioned.PartitionedLoadError", 2, ValueError),
    ("pipelines.train.scheduling.PendingResourcesError", 1, RuntimeError),
]


@pytest.mark.parametrize(("name", "code", "builtin"), LEAVES, ids=[n for n, _, _ in LEAVES])
def test_leaf_exit_code_and_builtin_class(name: str, code: int, builtin: type) -> None:
    module, cls_name = name.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), cls_name)
    assert exit_code(cls("x")) == code
    assert issubclass(cls, builtin)


def test_exit_codes_are_defined_once() -> None:
    """``EXIT_*`` numbers live in :mod:`pipelines.errors`; other modules import them."""
    bad = []
    for name, path in _modules().items():
        if name == "pipelines.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
                values = [n for n in ast.walk(node.value) if isinstance(n, ast.Constant)] \
                    if node.value is not None else []
                if any(n.startswith("EXIT_") for n in names) and values:
                    bad.append(f"{name}:{node.lineno}")
    assert not bad, f"exit codes defined outside pipelines.errors: {bad}"
