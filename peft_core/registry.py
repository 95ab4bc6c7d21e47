"""Methods by name: ``register`` a :class:`~peft_core.method.Method` subclass, ``get`` it back."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from .errors import ConfigError

if TYPE_CHECKING:
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
    return method_cls


def get(name: str) -> type[Method]:
    """The method registered under ``name``; an unknown name lists the available ones."""
    _load_builtin_methods()
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(
            f"method.name: unknown method {name!r}; available methods are {available()}"
        ) from None


def available() -> list[str]:
    """Names of every registered method, sorted."""
    _load_builtin_methods()
    return sorted(_METHODS)


def _load_builtin_methods() -> None:
    # Importing the package registers the built-in methods; idempotent.
    from . import methods  # noqa: F401
