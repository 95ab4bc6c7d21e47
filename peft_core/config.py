"""The base of every method configuration: a dataclass with validation and a dict form."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

from .errors import ConfigError

#: Config classes by method name, filled by :func:`peft_core.registry.register`; kept here so
#: that :meth:`MethodConfig.from_dict` dispatches on a name without importing the registry
#: (which sits above this module, with the methods).
_BY_NAME: dict[str, type[MethodConfig]] = {}


@dataclasses.dataclass
class MethodConfig:
    """Hyperparameters of one PEFT method.

    Subclasses set the class variable ``name`` (the registry key) and add their own fields,
    each with a default. ``target_modules`` selects the modules a method wraps: ``None``
    means the architecture's defaults (see :mod:`peft_core.targets`), a list matches module
    names by suffix (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), and a string
    is a regular expression that must match the whole module name.
    ``train_head`` keeps a freshly initialised task head (sequence classification) trainable,
    which every method needs to learn a new label space.
    """

    name: ClassVar[str] = ""
    #: fields that adapters saved by older versions carry in this config and that are
    #: run-time state now (``load_adapter`` reads them as such; a user config may not set them)
    former_fields: ClassVar[tuple[str, ...]] = ()
    target_modules: list[str] | str | None = None
    train_head: bool = True

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        tm = self.target_modules
        if tm is not None and not isinstance(tm, str):
            if not isinstance(tm, (list, tuple)) or not all(isinstance(t, str) for t in tm):
                raise ConfigError(
                    f"{self.name}.target_modules: expected a list of module-name suffixes "
                    f"or one regular expression, got {tm!r}"
                )
            if len(tm) == 0:
                raise ConfigError(f"{self.name}.target_modules: the list is empty")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` turns back into an equal config."""
        out: dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        """Build the registered config named by ``data["name"]`` and validate it.

        Called on ``MethodConfig`` it dispatches on the name; called on a subclass it
        checks the name agrees. Unknown keys are an error that lists the known ones.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"method config: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        name = data.pop("name", cls.name or None)
        if name is None:
            raise ConfigError("method.name: missing; say which method to use")
        target_cls = config_class(name)
        if cls is not MethodConfig and target_cls is not cls:
            raise ConfigError(f"method.name: {name!r} is not a {cls.name!r} config")
        known = {f.name: f for f in dataclasses.fields(target_cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(
                f"{name}: unknown field(s) {unknown}; known fields are {sorted(known)}"
            )
        hints = typing.get_type_hints(target_cls)
        kwargs = {k: _coerce(name, k, v, hints.get(k)) for k, v in data.items()}
        cfg = target_cls(**kwargs)
        cfg.validate()
        return cfg

    def replace(self, **changes: Any) -> MethodConfig:
        """A validated copy with some fields changed."""
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg


def record_config_class(cls: type[MethodConfig]) -> None:
    """Make ``cls`` the config that :meth:`MethodConfig.from_dict` builds for ``cls.name``
    (called by :func:`peft_core.registry.register`, which checks the name is free)."""
    _BY_NAME[cls.name] = cls


def config_class(name: str) -> type[MethodConfig]:
    """The config class of the registered method ``name``; an unknown name lists them all."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(
            f"method.name: unknown method {name!r}; available methods are {sorted(_BY_NAME)}"
        ) from None


def _coerce(method: str, field: str, value: Any, hint: Any) -> Any:
    """Accept YAML's looser types where the meaning is unambiguous (int for float, list for
    tuple)."""
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(
            f"{method}.{field}: expected {hint.__name__}, got {type(value).__name__} {value!r}"
        )
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{method}.{field}: expected true or false, got {value!r}")
    return value


def check(cond: bool, method: str, field: str, expected: str, value: Any) -> None:
    """Raise a ConfigError naming ``method.field`` when ``cond`` is false."""
    if not cond:
        raise ConfigError(f"{method}.{field}: expected {expected}, got {value!r}")
