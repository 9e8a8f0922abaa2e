"""Strict run configuration: TOML files loaded into frozen dataclasses, with dotted `key=value` overrides.

Every recipe declares its schema as nested frozen dataclasses (one per TOML table). Loading is strict: an unknown
table or key is an error naming it (with the closest valid name), a value of the wrong type is an error naming the key,
the expected type and the value. Overrides (`train.steps=200`, `lora.targets=all-linear`) are parsed as TOML values
when they parse (numbers, booleans, lists, quoted strings), else taken as bare strings, then type-checked like the
file. The resolved config is written back as TOML beside every checkpoint (`dump_toml`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from dev2pro.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "a table"
    if typing.get_origin(tp) in (tuple, list):
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp) or getattr(
        tp, "__name__", None) or str(tp).replace("typing.", "")


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(choices))})"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`; ints are accepted for floats, lists become tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tables = [a for a in args if dataclasses.is_dataclass(a) or typing.get_origin(a) is dict]
        if isinstance(value, dict) and len(tables) == 1:  # descend, so the error names the key inside the table
            return _coerce(value, tables[0], where)
        lists = [a for a in args if typing.get_origin(a) in (tuple, list)]
        if isinstance(value, (list, tuple)) and len(lists) == 1:
            return _coerce(value, lists[0], where)
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_t = args[0] if args else Any
        return tuple(_coerce(v, item_t, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _build(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")


def _build(cls: type[T], data: dict, where: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"{path}: unknown key" + _suggest(key, list(fields)))
        kwargs[key] = _coerce(value, hints[key], path)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key '{(where + '.') if where else ''}{missing[0]}'")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):  # a validate(where) names keys by their full path (tables inside lists)
        validate(where) if inspect.signature(validate).parameters else validate()
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value). Values parse as TOML where they can, else as bare strings."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def _set(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{part}' is not a table")
    node[path[-1]] = value


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None


def from_dict(cls: type[T], data: dict, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build `cls` from a nested dict plus dotted overrides, strictly."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        _set(data, path, value)
    return _build(cls, data)


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load a TOML file (or nothing) into `cls`, apply overrides, check everything."""
    data = read_toml(path) if path is not None else {}
    try:
        return from_dict(cls, data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def dump_toml(obj: Any) -> str:
    """Resolved config as TOML text (None values are left out: TOML has no null)."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    top = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
    lines = top + ([""] if top else [])
    for section, table in data.items():
        if not isinstance(table, dict):
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
        lines.append("")
    return "\n".join(lines)
