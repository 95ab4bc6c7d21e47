"""Methods by name: ``register`` a :class:`~peft_core.method.Method` subclass, ``get`` it back.

The built-in methods (:mod:`peft_core.methods`) register when the package is imported.
"""

from __future__ import annotations

from typing import TypeVar

from .config import config_class, record_config_class
from .method import Method

_M = TypeVar("_M", bound="type[Method]")

_METHODS: dict[str, type[Method]] = {}


def register(method_cls: _M) -> _M:
    """Class decorator: make a method selectable by its config's ``name``."""
    name = method_cls.config_cls.name
    if not name:
        raise TypeError(f"{method_cls.__name__}.config_cls must set a class variable `name`")
    existing = _METHODS.get(name)
    if existing is not None and existing is not method_cls:
        raise TypeError(f"method name {name!r} is already registered by {existing.__name__}")
    _METHODS[name] = method_cls
    record_config_class(method_cls.config_cls)
    return method_cls


def get(name: str) -> type[Method]:
    """The method registered under ``name``; an unknown name lists the available ones."""
    config_class(name)  # raises the one "unknown method" error, naming the available ones
    return _METHODS[name]


def available() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_METHODS)
