"""Lua values to plain Python data (and back) for frames, logs and game.* arguments.

Lua tables have no array/object distinction and may be cyclic, huge or full of binary strings; a
script is not trusted to return something JSON can carry.  Conversion is therefore bounded (depth
and node count) and strict (strings must be UTF-8), and fails with a `ConversionError` whose message
names the offending path, instead of sending a player garbage.

Rules: a table whose keys are exactly 1..n becomes a list; any other table becomes an object with
string keys (integer and float keys are written in decimal); an empty table becomes `{}`.
Booleans, integers, finite floats and strings map to their JSON counterparts.  Refused, with the
path of the value: functions, coroutines and userdata; NaN and infinity (JSON has no spelling for
them, and writing `null` would silently turn a number into nothing); a table with two keys that
become the same JSON key (`[1]` and `["1"]`, `[true]` and `["true"]`), which would lose a value.

The other direction (`to_lua`) refuses integers outside the signed 64-bit range, which Lua cannot
hold: a client's input or a stored value never turns into a Python exception inside Lua.
"""

from __future__ import annotations

import sys
from itertools import islice
from typing import Any

from lupa import lua54

_lua_type = lua54.lua_type

MAX_DEPTH = 32
MAX_NODES = 100_000
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # Lua 5.4 integers
_INF = float("inf")
CACHED = 4096
CACHED_TEXT_BYTES = 32


class _Decoded(dict[bytes, str]):
    """Text already decoded, by its bytes: every tick's walk meets the same few keys ("x", "hp",
    entity ids) and values (names, kinds), and one str object per key also spares the dicts built
    from them hashing it again.  Side by side on the field game, keys 3-8% and values another 1-6%
    less server CPU per frame; the bench game, with 3 strings in 20 values, neither gains nor
    loses.  A hit is a plain dict lookup; a miss decodes (raising UnicodeDecodeError, and keeping
    nothing, for text that is not UTF-8) and keeps the text unless CACHED entries are held (a
    script inventing keys, values that are all different) or it is longer than `max_bytes`."""

    __slots__ = ("max_bytes",)

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes

    def __missing__(self, raw: bytes) -> str:
        text = raw.decode()
        if len(raw) <= self.max_bytes and len(self) < CACHED:
            self[raw] = text
        return text


# Keys of any length (a table's keys are few and come back); values only when short.
_KEYS = _Decoded(max_bytes=sys.maxsize)
_TEXTS = _Decoded(max_bytes=CACHED_TEXT_BYTES)


class ConversionError(ValueError):
    """A Lua value cannot be represented as JSON data."""


def to_python(value: Any, *, what: str = "value", max_nodes: int = MAX_NODES) -> Any:
    """Convert a Lua value (as lupa hands it over, strings as bytes) into JSON-ready data.

    This runs for every `match.state` frame, so the walk is written for speed: scalars are
    handled inline, and the path of an offending value is only assembled when there is one.
    """
    try:
        kind = type(value)
        if kind is bytes:
            return value.decode()
        if kind is int or kind is bool or value is None:
            return value
        if kind is float:
            if -_INF < value < _INF:
                return value
            raise _Failure(_not_finite(value))
        return _table(value, [max_nodes], 0)
    except UnicodeDecodeError:
        raise ConversionError(f"{what} is not valid UTF-8 text") from None
    except _Failure as failure:
        raise ConversionError(failure.describe(what)) from None


class _Failure(Exception):
    """Raised deep in the walk; parents add their key on the way up."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.keys: list[str] = []

    def describe(self, root: str) -> str:
        path = root
        for key in reversed(self.keys):
            path += key
        return f"{path} {self.problem}"


def _table(value: Any, budget: list[int], depth: int) -> Any:
    kind = _lua_type(value)
    if kind != "table":
        raise _Failure(f"is a {kind or type(value).__name__}, which is not data")
    if depth >= MAX_DEPTH:
        raise _Failure(f"is nested deeper than {MAX_DEPTH} levels (a cycle?)")
    # Never copy more than the remaining budget out of Lua: a huge table fails fast.
    items = list(islice(value.items(), max(budget[0], 0) + 1))
    n = len(items)
    budget[0] -= n + 1
    if budget[0] < 0:
        raise _Failure(f"holds too many values (limit {MAX_NODES})")
    if not n:
        return {}
    # The scalar cases are written out in both loops below on purpose: a helper call per value
    # would cost more than the rest of the walk.
    if type(items[0][0]) is int and _is_sequence(items):
        out_list: list[Any] = []
        append = out_list.append
        texts = _TEXTS
        for index, v in items:
            kind = type(v)
            try:
                if kind is bytes:
                    v = texts[v]
                elif kind is float:
                    if not -_INF < v < _INF:
                        raise _Failure(_not_finite(v))
                elif not (kind is int or kind is bool):
                    v = _table(v, budget, depth + 1)
            except UnicodeDecodeError:
                not_text = _Failure("is not valid UTF-8 text")
                not_text.keys.append(f"[{index}]")
                raise not_text from None
            except _Failure as failure:
                failure.keys.append(f"[{index}]")
                raise
            append(v)
        return out_list
    out: dict[str, Any] = {}
    keys = _KEYS
    texts = _TEXTS
    for k, v in items:
        kind = type(k)
        if kind is bytes:
            try:
                key = keys[k]
            except UnicodeDecodeError:
                raise _Failure("has a key that is not valid UTF-8 text") from None
        elif kind is bool:
            key = "true" if k else "false"
        elif kind is int:
            key = str(k)
        elif kind is float:
            key = repr(k)
        else:
            raise _Failure("has a key that is not a string or number")
        kind = type(v)
        try:
            if kind is bytes:
                v = texts[v]
            elif kind is float:
                if not -_INF < v < _INF:
                    raise _Failure(_not_finite(v))
            elif not (kind is int or kind is bool):
                v = _table(v, budget, depth + 1)
        except UnicodeDecodeError:
            not_text = _Failure("is not valid UTF-8 text")
            not_text.keys.append(f".{key}")
            raise not_text from None
        except _Failure as failure:
            failure.keys.append(f".{key}")
            raise
        out[key] = v
    if len(out) != n:
        raise _Failure(f"has two keys that both become {_collision(items)}")
    return out


def _not_finite(value: float) -> str:
    return "is NaN" if value != value else "is infinite"


def _collision(items: list[tuple[Any, Any]]) -> str:
    """The JSON key two of `items`' keys share (only called when there is one)."""
    seen: set[str] = set()
    for k, _ in items:
        if type(k) is bytes:
            key = k.decode()
        elif type(k) is bool:
            key = "true" if k else "false"
        else:
            key = str(k) if type(k) is int else repr(k)
        if key in seen:
            return f'"{key}"'
        seen.add(key)
    return "the same key"


def _is_sequence(items: list[tuple[Any, Any]]) -> bool:
    """Keys exactly 1..n.  Lua hands the array part over in order, so check that first; a
    sequence stored in the hash part arrives shuffled and is sorted in place."""
    for expected, (k, _) in enumerate(items, 1):
        if k != expected or type(k) is not int:
            break
    else:
        return True
    if not all(type(k) is int for k, _ in items):
        return False
    items.sort(key=lambda kv: kv[0])
    return (
        items[0][0] == 1 and items[-1][0] == len(items) and len({k for k, _ in items}) == len(items)
    )


# A tuple, not `dict | list | tuple`: that union is a new object at every evaluation.
_CONTAINERS = (dict, list, tuple)


def to_lua(runtime: Any, value: Any, _depth: int = 0) -> Any:
    """Convert plain Python data into Lua values inside `runtime` (strings become bytes).

    Bounded like `to_python`: data nested deeper than MAX_DEPTH is refused here, whoever the
    caller is, rather than exhausting Python's recursion.
    """
    if isinstance(value, str):
        return value.encode()
    if type(value) is int and not INT_MIN <= value <= INT_MAX:
        raise ConversionError(f"data holds the integer {value}, outside the 64-bit range")
    if isinstance(value, _CONTAINERS):
        if _depth >= MAX_DEPTH:
            raise ConversionError(f"data is nested deeper than {MAX_DEPTH} levels")
        # Children first, then the table in one crossing (`table_from`), not one per key: a
        # third less time per input.
        depth = _depth + 1
        if isinstance(value, dict):
            return runtime.table_from(
                {to_lua(runtime, k, depth): to_lua(runtime, v, depth) for k, v in value.items()}
            )
        return runtime.table_from([to_lua(runtime, v, depth) for v in value])
    return value


# Keys of an input dict passed flat (`input_args`); a larger one is made a table by `to_lua`.
FLAT_KEYS = 8


def input_args(runtime: Any, value: Any) -> list[Any]:
    """An input payload as arguments of `B.call_inputs`: [n, key1, value1, ... keyn, valuen]
    for a dict of at most FLAT_KEYS keys with no dict, list or tuple among its values, which
    Lua builds into the table itself, else [-1, the value as `to_lua` makes it].  Keys and
    values go through `to_lua` either way, so the rules (and the errors) are the same.

    Inputs are mostly small flat dicts (`{"dir": 3}`), and lupa's `table_from` costs several
    microseconds each (a Python wrapper object, a registry reference, the runtime's lock) where
    the table built inside the crossing costs a fraction of one.
    """
    if type(value) is dict and len(value) <= FLAT_KEYS:
        out: list[Any] = [len(value)]
        for k, v in value.items():
            kind = type(v)
            if kind is dict or kind is list or kind is tuple:
                break
            # Text, the usual key and a common value, is encoded here: a call saved per item.
            out.append(k.encode() if type(k) is str else to_lua(runtime, k))
            out.append(v.encode() if kind is str else to_lua(runtime, v))
        else:
            return out
    return [-1, to_lua(runtime, value)]
