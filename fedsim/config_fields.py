"""How a config table becomes a frozen dataclass: declared ranges, checked types, one-line errors.

The config classes (:mod:`fedsim.config`) declare each field's range with :func:`rule`
and its helpers; :func:`build_dataclass` checks a parsed TOML table against a class's
fields, types and ranges, and names the offending key in a :class:`ConfigError`.
"""

import dataclasses
import difflib
import typing
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def rule(default: Any, check: Callable[[Any], bool], allowed: str) -> Any:
    """Declare a dataclass field whose value must satisfy ``check`` (described by ``allowed``)."""
    return field(default=default, metadata={"check": check, "allowed": allowed})


def positive(default: float) -> Any:
    """Declare a field that must be > 0."""
    return rule(default, lambda v: v > 0, "a number > 0")


def at_least(default: int, low: int) -> Any:
    """Declare an integer field that must be >= ``low``."""
    return rule(default, lambda v: v >= low, f"an integer >= {low}")


def fraction(default: float) -> Any:
    """Declare a field strictly between 0 and 1."""
    return rule(default, lambda v: 0 < v < 1, "a number strictly between 0 and 1")


class Params(dict[str, Any]):
    """A plug-in's keyword arguments (``[strategy.params]``): a read-only, hashable dict.

    Configs are frozen and hashable (processes cache what they build per config);
    a params table is too. Its values are TOML's, checked against the plug-in's
    signature by ``fedsim.composition``.
    """

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(repr(sorted(self.items())))

    def __reduce__(self) -> tuple[type, tuple[dict[str, Any]]]:
        return Params, (dict(self),)  # pickle builds it whole, not item by item

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("config params are read-only")

    __setitem__ = __delitem__ = update = pop = clear = setdefault = _read_only  # type: ignore[assignment]


def build_dataclass(cls: type, raw: Any, *, prefix: str) -> Any:
    """Return ``cls`` built from the table ``raw`` (keys under ``prefix``), every value checked."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table, got {type(raw).__name__} {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown key {prefix + str(key)!r}{hint}; allowed in {where}: {', '.join(fields)}"
            )
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        if hint is Params:  # a plug-in's keyword arguments: checked against its signature
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{key} must be a table, got {value!r}")
            values[key] = Params(value)
        elif dataclasses.is_dataclass(hint):
            values[key] = build_dataclass(typing.cast(type, hint), value, prefix=f"{prefix}{key}.")
        else:
            values[key] = check_value(f"{prefix}{key}", value, hint, fields[key].metadata)
    return cls(**values)


def check_value(key: str, value: Any, hint: Any, metadata: Mapping[str, Any]) -> Any:
    """Return ``value`` for the field ``key`` of type ``hint``, or raise naming what is wrong."""
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{key} = {value!r} is not allowed; choose one of {allowed}")
        return value
    expected = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[hint]
    ok = (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
        if hint is not float
        else isinstance(value, int | float) and not isinstance(value, bool)
    )
    if not ok:
        raise ConfigError(f"{key} = {value!r} has the wrong type; expected {expected}")
    value = float(value) if hint is float else value
    if "check" in metadata and not metadata["check"](value):
        raise ConfigError(f"{key} = {value!r} is out of range; expected {metadata['allowed']}")
    return value
