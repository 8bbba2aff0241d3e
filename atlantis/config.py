"""Typed stage configs: dataclasses with help text, loaded from YAML and `key=value` overrides.

Every stage (score, weights, select, ...) declares one dataclass. Fields carry `metadata={"help": ...}`;
validation lives in each dataclass's `__post_init__`, so a config is checked the same way whether it came
from YAML, the CLI or Python. Nested dataclasses are addressed with dots: `render.max_length=1024`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid."""


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with its help text (shown by `atlantis <verb> --help`)."""
    kwargs: dict[str, Any] = {"metadata": {"help": help}}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    return dataclasses.field(**kwargs)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):  # `seeds=0,1,2`: each item read as YAML, as a single value would be
            items = [v for v in value.split(",") if v]
            value = items if inner is str else [yaml.safe_load(v) for v in items]
        elif isinstance(value, (int, float)) and origin is list:  # `seeds=0` on the command line: one item
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        items = [_coerce(v, inner, key) for v in value]
        return items if origin is list else tuple(items)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and "path" in {f.name for f in dataclasses.fields(tp)}:
            value = {"path": value}  # shorthand: `data=FILE` for `data.path=FILE`
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build(tp, value, prefix=f"{key}.")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Instantiate `cls` from a (nested) mapping, rejecting unknown keys."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        # A section given partly (`render.max_length=4096`) keeps the field's own defaults for the rest, not
        # the section class's: TrainConfig's render default trains the end-of-turn token, RenderConfig's not.
        if (
            _is_dataclass_type(hints[f.name])
            and isinstance(value, dict)
            and f.default_factory is not dataclasses.MISSING
        ):
            value = {**dataclasses.asdict(f.default_factory()), **value}
        kwargs[f.name] = _coerce(value, hints[f.name], prefix + f.name)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{cls.__name__}: {err}") from err


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c=value` in `tree`. A setting given twice is refused (which one should win is a guess); a section's
    shorthand (`data=FILE` for `data.path=FILE`) merges with the section's other settings in either order."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):  # `data=FILE data.limit=5`: FILE is the section's path
            child = node[part] = {"path": child}
        node = child
    if leaf not in node:
        node[leaf] = value
    elif isinstance(node[leaf], dict) and not isinstance(value, dict) and "path" not in node[leaf]:
        node[leaf]["path"] = value  # `data.limit=5 data=FILE`
    else:
        old = node[leaf].get("path") if isinstance(node[leaf], dict) else node[leaf]
        raise ConfigError(f"{dotted} is given twice ({old!r}, then {value!r}); give each setting once")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["a.b=3", "c=x"]` -> `{"a": {"b": 3}, "c": "x"}`; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The command line over the YAML file, key by key (a section's shorthand replaces only its path)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v if isinstance(v, dict) else {"path": v})
        elif isinstance(v, dict) and k in out and out[k] is not None:
            out[k] = _merge({"path": out[k]}, v)
        else:
            out[k] = v
    return out


def load(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    section: str | None = None,
) -> T:
    """Load `cls` from an optional YAML file (optionally one `section` of it) plus `key=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if section is not None:
            loaded = loaded.get(section, {})
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        values = loaded
    values = _merge(values, parse_overrides(overrides or []))
    return build(cls, values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) rows for `--help`, nested sections flattened with dots."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            rows.extend(describe(tp, prefix=f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((prefix + f.name, default, f.metadata.get("help", "")))
    return rows
