"""One pattern for every config vllm-guard reads: a frozen dataclass built from JSON by
:func:`from_dict` (or :func:`load_json_file` for a file), which refuses unknown keys, repeated
keys and wrong types with one line naming the file and the key.

Types understood: ``bool``, ``int``, ``float``, ``str``, ``X | None``, ``tuple[X, ...]`` and
``frozenset[X]`` (from JSON lists), ``dict[str, X]`` and nested frozen dataclasses. A bool is
never accepted for an int, nor a string for a bool (``"false"`` is not false).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from vllm_guard.errors import GuardError

T = TypeVar("T")


class ConfigError(GuardError):
    """A config file or option has an unknown key or a value of the wrong type."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, frozenset, list):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"an object of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "an object"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _json_name(value: object) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(type(value),
                                                                      type(value).__name__)


class _WrongType(Exception):
    pass


def _convert(tp: Any, value: object, where: str) -> object:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(arg, value, where)
            except _WrongType:
                continue
        raise _WrongType
    if origin in (tuple, frozenset):
        if not isinstance(value, list):
            raise _WrongType
        items = [_convert(typing.get_args(tp)[0], v, f"{where}[{i}]")
                 for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else frozenset(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise _WrongType
        inner = typing.get_args(tp)[1]
        return {str(k): _convert(inner, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _WrongType
        return from_dict(tp, value, where)
    if tp is type(None):
        if value is not None:
            raise _WrongType
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise _WrongType
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _WrongType
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _WrongType
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _WrongType
        return value
    raise TypeError(f"config type {tp!r} is not supported")


def from_dict(cls: type[T], doc: Mapping[str, object], where: str) -> T:
    """Build the frozen dataclass ``cls`` from ``doc``; unknown keys and wrong types raise
    :class:`ConfigError` naming ``where`` and the key. Fields starting with ``_`` and fields
    declared with ``metadata={"config": False}`` are not settable from a file."""
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where}: must be a JSON object, got {_json_name(doc)}")
    hints = typing.get_type_hints(cls)
    settable = {f.name: f for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if not f.name.startswith("_") and f.metadata.get("config", True)}
    unknown = sorted(set(doc) - set(settable))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {sorted(settable)})")
    kwargs = {}
    for key, value in doc.items():
        try:
            kwargs[key] = _convert(hints[key], value, f"{where}.{key}")
        except _WrongType:
            raise ConfigError(f"{where}: {key!r} must be {_type_name(hints[key])}, got "
                              f"{_json_name(value)}") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last of two equal keys: a second "revoked" would silently win
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def load_json_file(cls: type[T], path: str | os.PathLike[str], what: str) -> T:
    """Read the JSON file ``path`` into ``cls`` with :func:`from_dict`; every problem (missing
    file, bad JSON, repeated key, unknown key, wrong type) is one :class:`ConfigError` line
    naming ``what`` and the file."""
    p = Path(path)
    where = f"{what} {p}"
    try:
        doc = json.loads(p.read_text(), object_pairs_hook=_no_duplicates)
    except OSError as e:
        raise ConfigError(f"cannot read {where}: {e.strerror or e}") from None
    except _DuplicateKey as e:
        raise ConfigError(f"{where}: key {e.args[0]!r} appears twice") from None
    except ValueError as e:
        raise ConfigError(f"{where}: not valid JSON: {e}") from None
    return from_dict(cls, doc, where)
