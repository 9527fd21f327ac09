"""One config mechanism: a typed dataclass <-> a TOML recipe <-> ``--set key=value`` overrides.

Every trainer's hyperparameters are one frozen dataclass whose field defaults and comments are the
documentation. A recipe file is that dataclass written as TOML (plus the descriptive keys in
:data:`RECIPE_META_KEYS`), and ``--set key=value`` overrides one field from the command line, the
value read as TOML (``--set epochs=5``, ``--set eps='"8/255"'`` or just ``--set eps=8/255``). One
reader, :func:`config_from_dict`, validates all three: an unknown key lists its close matches and a
wrongly typed value names the field and the expected type, each as a one-line :class:`ConfigError`
(exit 2), so a typo in a recipe costs a second, not a silently ignored hyperparameter.

The resolved config (:func:`config_to_dict`) is what a checkpoint records, so a shipped weight file
can be compared with the recipe that claims to have produced it.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from robustkit.core.errors import ConfigError, close_matches_hint

C = TypeVar("C")

# Keys of a recipe file that describe the file rather than set a field.
RECIPE_META_KEYS = ("trainer", "name", "description")


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The settable fields of a config dataclass (``init=False`` fields are derived, not set)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple, Sequence):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return f"a list of {plural.get(args[0], _type_name(args[0]))}" if args else "a list"
    if origin in (dict, Mapping):
        return "a table"
    if tp is type(None):
        return "none"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` as type ``tp``, converting only what is unambiguous (an int where a float is
    expected, a list where a tuple is); anything else is a :class:`ConfigError` naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where} = {value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        raise ConfigError(f"{where} = {value!r}: expected {_type_name(tp)}"
                          f"{close_matches_hint(str(value), [str(a) for a in get_args(tp)])}")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r}: expected {_type_name(tp)}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:  # a fixed-length tuple
            if len(args) != len(value):
                raise ConfigError(f"{where} = {value!r}: expected {len(args)} values")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} = {value!r}: expected a table, e.g. {{ key = 1 }}")
        key_t, val_t = get_args(tp) or (str, Any)
        return {str(k): _coerce(v, val_t, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return config_from_dict(tp, value, source=where)
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where} = {value!r}: expected {_type_name(tp)}")


def config_from_dict(cls: type[C], data: Mapping[str, Any], *, source: str = "config",
                     base: C | None = None) -> C:
    """Build ``cls`` from ``data`` (fields missing from it keep ``base``'s or the defaults);
    unknown keys and wrong types are one-line errors naming ``source``."""
    fields = config_fields(cls)
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        raise ConfigError(f"{source}: unknown key {key!r} for {cls.__name__}"
                          f"{close_matches_hint(key, list(fields))}")
    values = {k: _coerce(v, hints[k], f"{source}: {k}") for k, v in data.items()}
    if base is not None:
        return dataclasses.replace(base, **values)
    try:
        return cls(**values)
    except TypeError as e:  # a required field without a value
        raise ConfigError(f"{source}: {e}") from None
    except ValueError as e:  # __post_init__ validation
        raise ConfigError(f"{source}: {e}") from None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON/TOML data (tuples become lists), every field included."""
    return _plain(config)


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as TOML (numbers, booleans, lists, tables), else as a string,
    so ``--set eps=8/255`` and ``--set name=run1`` need no quotes."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise ConfigError(f"--set {text!r}: write KEY=VALUE, e.g. --set epochs=5")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def read_recipe(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A recipe file as ``(meta, fields)``: ``meta`` holds :data:`RECIPE_META_KEYS`."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"recipe {p} is a folder, not a .toml file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"recipe not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read recipe {p}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {p} is not valid TOML: {e}") from None
    meta = {k: data.pop(k) for k in RECIPE_META_KEYS if k in data}
    for k, v in meta.items():
        if not isinstance(v, str):
            raise ConfigError(f"recipe {p}: {k} = {v!r}: expected a string")
    return meta, data


def resolve_config(cls: type[C], *, recipe: Mapping[str, Any] | None = None, recipe_source: str = "recipe",
                   overrides: Sequence[str] = (), fixed: Mapping[str, Any] | None = None) -> C:
    """Defaults, then the recipe's fields, then ``--set`` overrides, then ``fixed`` (what the
    command line sets through a common option, e.g. ``--seed``): the config a run uses."""
    config = config_from_dict(cls, dict(recipe or {}), source=recipe_source)
    if overrides:
        hints = typing.get_type_hints(cls)
        values = {}
        for text in overrides:
            key, value = parse_override(text)
            # A number typed on the command line for a text field (``--set eps=0.1``) is that text:
            # quotes a shell would strip anyway must not be required.
            text_field = hints.get(key) is str or (get_origin(hints.get(key)) in (Union, types.UnionType)
                                                  and set(get_args(hints[key])) == {str, type(None)})
            if text_field and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = text.partition("=")[2].strip()
            values[key] = value
        config = config_from_dict(cls, values, source="--set", base=config)
    if fixed:
        settable = config_fields(cls)
        config = config_from_dict(cls, {k: v for k, v in fixed.items() if k in settable},
                                  source="option", base=config)
    return config


def describe_config(cls: type) -> list[tuple[str, str, str]]:
    """``(name, type, default)`` rows for ``robustkit train NAME --help``."""
    hints = typing.get_type_hints(cls)
    rows = []
    for name, f in config_fields(cls).items():
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((name, _type_name(hints[name]), default))
    return rows
