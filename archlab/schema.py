"""One way to read and check settings-like input: configs, ladders, search spaces, training, search,
ablation and fidelity settings, and settings read back from a run folder.

Each is a dataclass whose fields carry their rules (`setting(...)`: valid values, a range, help);
`build(cls, data, where)` makes one from a parsed YAML/JSON mapping (unknown and missing keys, types,
ranges), `check(obj, where)` checks one made in code (e.g. from command-line flags). Every problem is
one `ArchlabError` line naming where (a file, `train`, a flag), the field and the value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from typing import Any, Callable, Literal, Union, get_args, get_origin, get_type_hints

from archlab.errors import ArchlabError

MISSING = dataclasses.MISSING


def setting(default: Any = MISSING, help: str = "", valid: Callable[[Any], bool] | None = None, rule: str = "",
            choices: tuple = (), *, default_factory: Any = MISSING) -> Any:
    """A dataclass field with its rules: `choices` (the valid values), or `valid` (a test) with the
    `rule` it states ("> 0"); `help` is what `--help` and the docs say of it."""
    meta = {"help": help, "valid": valid, "rule": rule, "choices": tuple(choices)}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def positive(v) -> bool:
    return v > 0


def at_least(n: float) -> Callable[[Any], bool]:
    return lambda v: v >= n


# ---- checking ------------------------------------------------------------------------------------

def check(obj: Any, where: str = "", label: Callable[[str], str] | None = None, prefix: str = "") -> None:
    """Every field of a dataclass instance (and of the dataclasses in it) against its rules.
    `label` turns a field name into what the user typed (e.g. a flag: budget_ms -> --budget-ms)."""
    for name, nested, choices, valid, rule in _rules(type(obj)):
        value = getattr(obj, name)
        if nested:
            if dataclasses.is_dataclass(value):
                check(value, where, label, _dot(prefix, name))
            continue
        if value is None:
            continue
        if choices and value not in choices:
            path = _dot(prefix, name)
            raise ArchlabError(f"{located(where, label(path) if label else path)}: {value!r} is not one of "
                               f"{', '.join(map(str, choices))}")
        if valid is not None and not valid(value):
            path = _dot(prefix, name)
            raise ArchlabError(f"{located(where, label(path) if label else path)}: must be {rule}, got {value!r}")


@functools.lru_cache(maxsize=None)
def _rules(cls: type) -> tuple:
    """(name, nested dataclass?, choices, valid, rule) of each field that has rules or holds a dataclass."""
    hints, known = schema_fields(cls)
    out = []
    for name, f in known.items():
        nested = dataclasses.is_dataclass(hints[name])
        meta = f.metadata
        if nested or meta.get("choices") or meta.get("valid") is not None:
            out.append((name, nested, meta.get("choices", ()), meta.get("valid"), meta.get("rule", "")))
    return tuple(out)


def describe(cls: type) -> dict[str, dict]:
    """Every field of a dataclass: {name: {type, default, help, choices}} (flags are made from it);
    `type` is int, float, str or bool where the field is one (or one or None)."""
    hints, known = schema_fields(cls)
    out = {}
    for name, f in known.items():
        kind = hints[name]
        if get_origin(kind) in (Union, types.UnionType):
            kind = next((a for a in get_args(kind) if a is not type(None)), kind)
        out[name] = {"type": kind, "default": f.default, "help": f.metadata.get("help", ""),
                     "choices": f.metadata.get("choices", ())}
    return out


def flag(name: str) -> str:
    """A settings field as the command-line flag that sets it: budget_ms -> --budget-ms."""
    return "--" + name.replace("_", "-")


# ---- building from parsed YAML / JSON -----------------------------------------------------------

def build(cls: type, data: Any, where: str = "", prefix: str = "") -> Any:
    """A `cls` from a mapping: unknown keys, missing required keys, types and ranges checked, one
    line naming `where`, the dotted path of the field and the value."""
    data = require_mapping(data, located(where, prefix) if prefix else (where or cls.__name__))
    hints, known = schema_fields(cls)
    for key in data:
        if key not in known:
            raise ArchlabError(f"{located(where, _dot(prefix, str(key)))}: unknown key (allowed: {', '.join(known)})")
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ArchlabError(f"{located(where, _dot(prefix, name))}: missing required key")
            continue
        kwargs[name] = coerce(hints[name], data[name], where, _dot(prefix, name))
    obj = cls(**kwargs)
    check(obj, where, prefix=prefix)
    return obj


@functools.lru_cache(maxsize=None)
def schema_fields(cls: type) -> tuple[dict, dict]:
    """(type hints, fields by name) of a settings dataclass; cached, resolving hints is slow."""
    return get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def coerce(tp: Any, value: Any, where: str, path: str) -> Any:
    """`value` as type `tp` (a hint: int, float, str, bool, Literal, unions, lists, dicts, dataclasses)."""
    def bad(msg: str) -> ArchlabError:
        return ArchlabError(f"{located(where, path)}: {msg}")

    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, path)
    if origin in (tuple, list):  # tuple[X, ...] / list[X]
        if not isinstance(value, (list, tuple)):
            raise bad(f"must be a list, got {value!r}")
        items = [coerce(get_args(tp)[0], v, where, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is dict or origin is dict:  # dict / dict[K, V]
        value = require_mapping(value, located(where, path))
        if origin is None:
            return dict(value)
        key_tp, value_tp = get_args(tp)
        if get_origin(key_tp) is Literal:
            for k in value:
                if k not in get_args(key_tp):
                    raise ArchlabError(f"{located(where, _dot(path, str(k)))}: unknown key (allowed: "
                                       f"{', '.join(map(str, get_args(key_tp)))})")
        return {k: coerce(value_tp, v, where, _dot(path, str(k))) for k, v in value.items()}
    if origin is Literal:
        if isinstance(value, bool) or value not in get_args(tp):
            raise bad(f"{value!r} is not one of {', '.join(map(str, get_args(tp)))}")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for opt in options:
            if opt is not type(None):
                try:
                    return coerce(opt, value, where, path)
                except ArchlabError:
                    pass
        raise bad(f"{value!r} is not {' or '.join(_type_name(o) for o in options)}")
    checks = {
        bool: (lambda v: isinstance(v, bool), "true or false"),
        int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
        float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a number"),
        str: (lambda v: isinstance(v, str), "a string"),
    }
    ok, name = checks[tp]
    if not ok(value):
        raise bad(f"must be {name}, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    return {int: "an integer", float: "a number", type(None): "null", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def require_mapping(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise ArchlabError(f"{path}: must be a mapping, got {type(value).__name__} {value!r}")
    return value


def located(where: str, path: str) -> str:
    return f"{where}: {path}" if where else path


def _dot(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
