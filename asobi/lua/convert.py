"""Lua values to plain Python data (and back) for frames, logs and game.* arguments.

Lua tables have no array/object distinction and may be cyclic, huge or full of binary strings; a
script is not trusted to return something JSON can carry.  Conversion is therefore bounded (depth
and node count) and strict (strings must be UTF-8), and fails with a `ConversionError` whose message
names the offending path, instead of sending a player garbage.

Rules: a table whose keys are exactly 1..n becomes a list; any other table becomes an object with
string keys (integer and float keys are written in decimal); an empty table becomes `{}`.
Booleans, integers, floats and strings map to their JSON counterparts.  Functions, coroutines and
userdata are refused.
"""

from __future__ import annotations

from typing import Any

from lupa import lua54

_lua_type = lua54.lua_type

MAX_DEPTH = 32
MAX_NODES = 100_000


class ConversionError(ValueError):
    """A Lua value cannot be represented as JSON data."""


def to_python(value: Any, *, what: str = "value", max_nodes: int = MAX_NODES) -> Any:
    """Convert a Lua value (as lupa hands it over, strings as bytes) into JSON-ready data."""
    budget = [max_nodes]
    return _convert(value, what, 0, budget)


def _decode(raw: bytes, path: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ConversionError(f"{path} is not valid UTF-8 text") from None


def _convert(value: Any, path: str, depth: int, budget: list[int]) -> Any:
    if isinstance(value, bytes):
        return _decode(value, path)
    if value is None or isinstance(value, bool | int | float):
        return value
    kind = _lua_type(value)
    if kind != "table":
        raise ConversionError(f"{path} is a {kind or type(value).__name__}, which is not data")
    if depth >= MAX_DEPTH:
        raise ConversionError(f"{path} is nested deeper than {MAX_DEPTH} levels (a cycle?)")
    items = list(value.items())
    budget[0] -= len(items) + 1
    if budget[0] < 0:
        raise ConversionError(f"{path} holds too many values (limit {MAX_NODES})")
    if not items:
        return {}
    n = len(items)
    if all(type(k) is int for k, _ in items):
        keys = {k for k, _ in items}
        if min(keys) == 1 and max(keys) == n:
            ordered = sorted(items, key=lambda kv: kv[0])
            return [_convert(v, f"{path}[{k}]", depth + 1, budget) for k, v in ordered]
    out: dict[str, Any] = {}
    for k, v in items:
        if isinstance(k, bytes):
            key = _decode(k, f"{path} key")
        elif isinstance(k, bool):
            key = "true" if k else "false"
        elif isinstance(k, int | float):
            key = repr(k) if isinstance(k, float) else str(k)
        else:
            raise ConversionError(f"{path} has a key that is not a string or number")
        out[key] = _convert(v, f"{path}.{key}", depth + 1, budget)
    return out


def to_lua(runtime: Any, value: Any) -> Any:
    """Convert plain Python data into Lua values inside `runtime` (strings become bytes)."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict):
        table = runtime.table()
        for k, v in value.items():
            table[to_lua(runtime, k)] = to_lua(runtime, v)
        return table
    if isinstance(value, list | tuple):
        table = runtime.table()
        for i, v in enumerate(value, 1):
            table[i] = to_lua(runtime, v)
        return table
    return value
