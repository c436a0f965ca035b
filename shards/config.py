"""One way to turn YAML presets and ``--set key.sub=value`` overrides into the typed config dataclasses.

The configs stay frozen stdlib dataclasses; pydantic validates a plain mapping against them strictly
(no "2" for an integer, unknown keys refused) and checks the ranges written in their annotations
(``PositiveInt``, ``UnitFloat``, ... or ``Annotated[int, Field(ge=1, le=100)]``). Every problem is one
``ConfigError`` line naming where it came from (the file, or the override) and the dotted field::

    configs/train/tiny.yaml: optim.lr: must be > 0 (got -1)
    override train.max_steps=0: train.max_steps: must be >= 1 (got 0)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union

import pydantic
import yaml
from pydantic import BeforeValidator, Field

__all__ = [
    "ClipScore",
    "ConfigError",
    "Float",
    "NonNegativeFloat",
    "NonNegativeInt",
    "Overrides",
    "PositiveFloat",
    "PositiveInt",
    "UnitFloat",
    "apply_overrides",
    "build",
    "load",
    "locate",
    "override_items",
    "read_yaml",
]

T = TypeVar("T")
Overrides = Mapping[str, Any] | Sequence[str]  # {"a.b": value} or ["a.b=value", ...]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file or override and the dotted field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field  # dotted path of the offending field when known: lets `locate` blame an override


def _number(value: Any) -> Any:
    # YAML 1.1 reads 1e-5 (no dot) as a string: a float field takes the number it spells.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# Range types for config fields: the bound is checked when a config is built from data.
Float = Annotated[float, BeforeValidator(_number)]  # any finite number
UnitFloat = Annotated[float, BeforeValidator(_number), Field(ge=0, le=1)]  # thresholds, probabilities, fractions
PositiveFloat = Annotated[float, BeforeValidator(_number), Field(gt=0)]  # rates, weights, scales
NonNegativeFloat = Annotated[float, BeforeValidator(_number), Field(ge=0)]  # CPU shares, floors, pixel coordinates
PositiveInt = Annotated[int, Field(ge=1)]  # sizes, batch sizes, counts, steps
NonNegativeInt = Annotated[int, Field(ge=0)]  # seeds, offsets, counts that may be zero
ClipScore = Annotated[float, BeforeValidator(_number), Field(ge=-100, le=100)]  # 100 x cosine (the shards' scale)

# Strict: YAML already gives ints, floats and bools their types, so a string where a number belongs is
# a mistake to report, not to coerce. Validating JSON text (not Python objects) lets lists fill tuples
# and mappings fill dataclasses under strict rules.
_RULES = pydantic.ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


@functools.cache
def _root(cls: type) -> type[pydantic.BaseModel]:
    # The rules reach the (config-less) dataclasses through a wrapper model, so they carry no pydantic state.
    return pydantic.create_model(f"{cls.__name__}Root", __config__=_RULES, value=(cls, ...))


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not plain YAML data")


def build(cls: type[T], data: Any, where: str = "") -> T:
    """Dataclass ``cls`` from a plain mapping (parsed YAML); ``where`` is its dotted place in the file."""
    try:
        text = json.dumps({"value": data}, default=_plain)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}", where) from None
    try:
        return _root(cls).model_validate_json(text).value
    except pydantic.ValidationError as e:
        raise _explain(e, cls, json.loads(text)["value"], where) from None


# ---------------------------------------------------------------------------------------------------
# pydantic's errors -> one line naming the dotted field.

_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}
_EXPECTED = {"int_type": "an integer", "int_from_float": "an integer", "int_parsing": "an integer",
             "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
             "bool_type": "true or false", "string_type": "a string", "tuple_type": "a list",
             "list_type": "a list", "dict_type": "a mapping", "dataclass_type": "a mapping",
             "model_type": "a mapping"}


def _place(error: dict, data: Any) -> tuple[Any, ...]:
    """The error's location in the data: pydantic's, less the root and any union member's tag."""
    loc, node, out = error["loc"][1:], data, []
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif i < len(loc) - 1 or error["type"] not in ("missing", "unexpected_keyword_argument"):
            continue  # e.g. "int" or "function-after[...]": which union member failed, not a place
        out.append(part)
    return tuple(out)


def _dotted(where: str, parts: Sequence[Any]) -> str:
    text = where
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text


def _unwrap(tp: Any) -> Any:
    """``Annotated[X, ...]`` and ``X | None`` -> X."""
    while True:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Annotated:
            tp = args[0]
        elif origin in (Union, types.UnionType) and len([a for a in args if a is not type(None)]) == 1:
            tp = next(a for a in args if a is not type(None))
        else:
            return tp


def _type_at(cls: type, parts: Sequence[Any]) -> Any:
    """The type at ``parts`` below dataclass ``cls``, still ``Annotated`` (None when the path leaves the types)."""
    tp: Any = cls
    for part in parts:
        tp = _unwrap(tp)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp, include_extras=True).get(part)
        elif origin is tuple and args:
            tp = args[0] if args[-1] is Ellipsis else args[min(int(part), len(args) - 1)]
        elif origin in (list, dict) and args:
            tp = args[-1]
        else:
            return None
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None))
    return tp


def _range(tp: Any) -> str | None:
    """``[0, 1]``-style text of the bounds in an ``Annotated`` type's metadata, when it has two."""
    bounds = {}
    for meta in typing.get_args(tp)[1:] if typing.get_origin(tp) is Annotated else ():
        for m in getattr(meta, "metadata", [meta]):
            bounds.update({k: getattr(m, k) for k in ("gt", "ge", "lt", "le") if getattr(m, k, None) is not None})
    lo = f"[{bounds['ge']}" if "ge" in bounds else f"({bounds['gt']}" if "gt" in bounds else None
    hi = f"{bounds['le']}]" if "le" in bounds else f"{bounds['lt']})" if "lt" in bounds else None
    return f"{lo}, {hi}" if lo and hi else None


def _message(error: dict, tp: Any) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    got = f" (got {error['input']!r})"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        interval = _range(tp)
        return f"must be in {interval}{got}" if interval else f"must be {op} {ctx[key]}{got}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}{got}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}{got}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "too_long":
        n = ctx["max_length"]
        return f"must have at most {n} item{'s' * (n != 1)}{got}"
    if kind == "too_short":
        n = ctx["min_length"]
        return f"must have at least {n} item{'s' * (n != 1)}{got}"
    return f"{error['msg']}{got}"


def _explain(e: pydantic.ValidationError, cls: type, data: Any, where: str) -> ConfigError:
    errors = e.errors(include_url=False)
    places = [_place(err, data) for err in errors]
    first, kind = places[0], errors[0]["type"]
    if kind == "unexpected_keyword_argument":
        parent = first[:-1]
        unknown = [p[-1] for p, err in zip(places, errors, strict=True)
                   if err["type"] == kind and p[:-1] == parent]
        names = ", ".join(repr(k) for k in unknown)
        tp = _unwrap(_type_at(cls, parent))
        valid = sorted(f.name for f in dataclasses.fields(tp)) if dataclasses.is_dataclass(tp) else []
        text = f"unknown key{'s' * (len(unknown) > 1)} {names} (valid keys: {', '.join(valid)})"
        where_text = _dotted(where, parent)
        return ConfigError(f"{where_text}: {text}" if where_text else text, _dotted(where, first))
    if kind == "missing" and first and isinstance(first[-1], int):  # a fixed-size list too short
        first = first[:-1]
        size = len(typing.get_args(_unwrap(_type_at(cls, first))))
        text = f"must have {size} items (got {errors[0]['input']!r})"
    elif kind == "missing":
        text = "required, not given"
    else:
        # A union's members fail at the same place: say what each wanted.
        tp = _type_at(cls, first)
        text = " or ".join(dict.fromkeys(_message(err, tp) for p, err in zip(places, errors, strict=True) if p == first))
    field = _dotted(where, first)
    return ConfigError(f"{field}: {text}" if field else text, field)


# ---------------------------------------------------------------------------------------------------
# Files and overrides.


def read_yaml(path: str | Path) -> dict:
    """The top-level mapping of a YAML file; a missing file or bad YAML is a ConfigError naming it."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{line}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def _flatten(key: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping) and value:
        return [item for k, v in value.items() for item in _flatten(f"{key}.{k}", v)]
    return [(key, value)]


def override_items(overrides: Overrides) -> list[tuple[str, Any, str]]:
    """``(dotted key, value, label)`` of each override: ``"a.b=value"`` strings (value parsed as YAML),
    or a mapping of dotted keys whose mapping values are spread into their leaves."""
    if isinstance(overrides, Mapping):
        return [(k, v, f"{k}={json.dumps(v, default=str)}") for key, value in overrides.items()
                for k, v in _flatten(str(key), value)]
    if isinstance(overrides, str):
        overrides = [overrides]
    items = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
        items.append((key, value, item))
    return items


def apply_overrides(data: Mapping[str, Any] | None, overrides: Overrides) -> dict:
    """A copy of ``data`` with each override set, creating sections as needed (a number indexes a list)."""
    return _apply(data, override_items(overrides))


def _apply(data: Mapping[str, Any] | None, items: Sequence[tuple[str, Any, str]]) -> dict:
    out = copy.deepcopy(dict(data or {}))
    for key, value, label in items:
        parts = key.split(".")
        node: Any = out
        for i, part in enumerate(parts):
            here = ".".join(parts[:i])
            if isinstance(node, list):
                if not (part.isdigit() and int(part) < len(node)):
                    raise ConfigError(f"override {label}: {here} has no item {part}", key)
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {label}: {here} is a value, not a section", key)
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = _section(node, part)
    return out


def _section(node: dict | list, part: str | int) -> Any:
    # A key that is absent or null becomes an empty section the override fills.
    if isinstance(node, dict) and node.get(part) is None:
        node[part] = {}
    return node[part]


def locate(error: ConfigError, source: str | Path | None, items: Sequence[tuple[str, Any, str]] = (),
           prefix: str = "") -> ConfigError:
    """``error`` prefixed by the override it came from (the last one at or under/over its field) or ``source``."""
    field = (error.field or "").replace("[", ".").replace("]", "")  # datasets[0].weight ~ datasets.0.weight
    blamed = None
    if field:
        for key, _, label in items:
            key = f"{prefix}.{key}" if prefix else key
            if key == field or key.startswith(field + ".") or field.startswith(key + "."):
                blamed = f"override {label}"
    where = blamed or (str(source) if source is not None else "defaults")
    return ConfigError(f"{where}: {error}", error.field)


def load(target: type[T] | Callable[[dict], T], path: str | Path | None, overrides: Overrides = (),
         section: str | None = None) -> T:
    """A config from a YAML file (or the defaults, ``path`` None) with overrides applied, then validated.

    ``target`` is a config dataclass or a function building one from the mapping. With ``section``, only that
    top-level key of the file is read and the overrides' keys are relative to it.
    """
    data = read_yaml(path) if path is not None else {}
    if section is not None:
        data = data.get(section) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: {section}: expected a mapping, got {type(data).__name__}", section)
    items = override_items(overrides)
    data = _apply(data, items)
    try:
        if isinstance(target, type):
            return build(target, data, section or "")
        return target(data)
    except ConfigError as e:
        raise locate(e, path, items, section or "") from None
