"""Typed settings from YAML mappings: the reader behind pipeline.config.load_config, and behind
every other reader of a logged config (the evaluation jobs read a run's data and eval sections
with it). A dataclass's type hints say what each key must be; an unknown key, a wrong type or
an impossible value is a ConfigError that names the key, e.g.
`config key 'stage1.steps': expected an integer, got 'many'`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

from pipeline.errors import ConfigError


def _type_name(expected: Any) -> str:
    if typing.get_origin(expected) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(expected))
    if typing.get_origin(expected) is list:
        return f"a list of {_type_name(typing.get_args(expected)[0])}"
    names = {int: "an integer", float: "a float", bool: "true or false", str: "a string",
             type(None): "null"}
    return names.get(expected, getattr(expected, "__name__", str(expected)))


def _convert(value: Any, expected: Any, key: str) -> Any:
    """Checks `value` against the annotation `expected`, converting where YAML is lenient."""
    if expected is Any:  # checked where it is used (e.g. a sweep's values, by the config they go into)
        return value
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"config key '{key}': expected {' or '.join(_type_name(o) for o in options)},"
                          f" got {value!r}")
    if origin is Literal:
        if value is False and "no" in typing.get_args(expected):
            value = "no"  # YAML 1.1 reads a bare `no` as false
        if value not in typing.get_args(expected):
            raise ConfigError(f"config key '{key}': expected {_type_name(expected)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        item_type = typing.get_args(expected)[0]
        return tuple(_convert(item, item_type, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected {_type_name(expected)}, got {value!r}")
        (item_type,) = typing.get_args(expected)
        return [_convert(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config key '{key}': expected a mapping of names to values, got {value!r}")
        item_type = typing.get_args(expected)[1]
        if item_type is Any:
            return dict(value)
        return {name: _convert(item, item_type, f"{key}.{name}") for name, item in value.items()}
    if dataclasses.is_dataclass(expected):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of settings, got {value!r}")
        return from_dict(expected, value, prefix=f"{key}.")
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if expected is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"config key '{key}': expected a float, got {value!r}")
        if not math.isfinite(number):  # nan passes every `<` check after this one
            raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
        return float(number)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {expected!r} for {key}")


def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass `cls` from a mapping; unknown keys and bad types name the key."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}'; known keys under "
                              f"'{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(known))}")
    kwargs = {key: _convert(value, hints[key], prefix + key) for key, value in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as error:  # the dataclass's own checks (__post_init__)
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'top level'}': {error}") from None
