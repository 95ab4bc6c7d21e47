"""Exceptions raised by peft_core; each message names the field or module at fault."""

from __future__ import annotations


class PeftError(Exception):
    """Base class of every error peft_core raises on purpose."""


class ConfigError(PeftError, ValueError):
    """A method configuration is invalid (unknown method, bad field value, unknown key)."""


class TargetError(PeftError, ValueError):
    """Target-module patterns matched nothing, or matched modules a method cannot wrap."""


class NotMergeableError(PeftError, NotImplementedError):
    """The method keeps its parameters outside the base weights, so it cannot be merged."""


class FingerprintMismatchError(PeftError, ValueError):
    """An adapter was loaded onto a base model other than the one it was trained on."""
