"""The project's one exception tree: every error ``peftpipe`` raises on purpose is a
:class:`PeftPipeError`, either an :class:`InputError` (the user's input or request cannot be
met: recipe, data, model, checkpoint, cluster size; exit 2, found before or instead of work)
or a :class:`JobError` (a job that started and failed; exit 1). The CLI maps these two base
classes to exit codes, not a list of leaves.

``InputError`` is also a ``ValueError`` and ``JobError`` a ``RuntimeError``, as the leaves
were before the tree existed, so callers catching the builtin classes keep working.
``peft_core``'s own :class:`peft_core.PeftError` (the library below, which imports nothing
of ours) counts as input: its configs, targets and fingerprints come from the user.
"""

from __future__ import annotations

import sys


class PeftPipeError(Exception):
    """Base of every error peft-pipelines raises on purpose."""


class InputError(PeftPipeError, ValueError):
    """Bad input, or a request the cluster or the artifact cannot satisfy: exit 2."""


class JobError(PeftPipeError, RuntimeError):
    """A job that started and failed: exit 1."""


#: exit codes (README "Exit codes")
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def exit_code(error: BaseException) -> int:
    """The exit code ``error`` ends a command with: 2 for input, 130 for an interrupt, 1
    for everything else (a job that failed)."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, InputError):
        return EXIT_BAD_INPUT
    # peft_core's errors module, if loaded: an error cannot be a PeftError before it is, and
    # importing peft_core (torch) to answer would slow every failing `cluster` command
    peft_errors = sys.modules.get("peft_core.errors")
    if peft_errors is not None and isinstance(error, peft_errors.PeftError):
        return EXIT_BAD_INPUT
    return EXIT_FAILED
