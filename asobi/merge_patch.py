"""JSON Merge Patch (RFC 7396): the difference between two JSON values, and its application.

`match.patch` frames carry `diff(last_sent, now)` so a client that applies it to the state it
already holds gets exactly the state a full `match.state` frame would have carried.  Pure
functions over plain JSON data (dicts with string keys, lists, strings, numbers, booleans), as
`asobi.lua.convert.to_python` produces it; nothing here knows about matches or sockets.

What RFC 7396 can and cannot say, and what that means here:
- `null` in a patch deletes the key.  So a value that is itself `null` inside an object cannot be
  sent as a patch.  Match states never hold one (a Lua table cannot hold `nil`: the field is
  simply absent, and the patch deletes it), so `diff` does not look for them.
- Arrays are replaced whole: one changed element resends the array.  A state keyed by id (a Lua
  table of tables keyed by string) patches far better than one built of arrays.
- A change of kind (object to array, `{}` to `[1]`, number to object) replaces the value whole.
  An empty Lua table is `{}` in full frames (see `asobi.lua.convert`), and `apply` reproduces it
  as `{}`, never `[]`.
- Types are compared strictly: `1`, `1.0` and `true` are equal in Python but are three different
  JSON spellings, so a change between them is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from asobi import c_parts

_ABSENT: Any = object()


def python_diff(old: Any, new: Any) -> Any:
    """The merge patch that turns `old` into `new` (`{}` when they are the same).

    Unchanged keys are left out, removed keys become `null`, changed objects recurse, anything
    else is sent whole.  The patch shares sub-values with `new` (nothing is copied or mutated), so
    it must be encoded before `new` changes.  This runs per player per tick: values of the same
    type are compared with C-level `==` first, and the old keys are only walked when some of them
    are gone.
    """
    if type(new) is not dict or type(old) is not dict:
        return new
    patch: dict[str, Any] = {}
    get = old.get
    kept = 0
    for key, value in new.items():
        before = get(key, _ABSENT)
        kind = type(value)
        if kind is type(before):
            kept += 1
            if kind is dict:
                if value == before and same_json(before, value):
                    continue
                sub = python_diff(before, value)
                if sub:
                    patch[key] = sub
                continue
            if value == before and (kind is not list or same_json(before, value)):
                continue
        elif before is not _ABSENT:
            kept += 1
        patch[key] = value
    if kept < len(old):
        for key in old:
            if key not in new:
                patch[key] = None
    return patch


# `diff` is `python_diff` written in C (asobi/_merge_patch.c, built at install when a C compiler
# is there; tests/test_merge_patch_c.py holds the two equal): per player per tick on patch frames,
# the Python walk was a sixth of the server's CPU on the field game.  `ASOBI_NATIVE=0` keeps the
# Python one.
def _diff_in_c() -> Callable[[Any, Any], Any] | None:
    if not c_parts.wanted():
        return None
    try:
        from asobi import _merge_patch
    except ImportError:
        return None
    return _merge_patch.diff


diff: Callable[[Any, Any], Any] = _diff_in_c() or python_diff


def _diff_text_in_c() -> Callable[[bytes, bytes], bytes | None] | None:
    if not c_parts.wanted():
        return None
    try:
        from asobi import _merge_patch
    except ImportError:
        return None
    return _merge_patch.diff_text


# `diff` of two JSON object texts as JSON text, without parsing them into Python objects
# (asobi/_merge_patch.c, `diff_text`), or None where not built.  It returns None for a text it
# does not expect; the caller then parses both and runs `diff`.  Meant for frame bodies asobi's
# encoders wrote: one spelling per value, so equal text means the same JSON.
diff_text = _diff_text_in_c()


def same_json(a: Any, b: Any) -> bool:
    """Whether two values Python calls equal also have the same JSON (`[1]` is not `[true]`).

    Compared as encoded bytes (in C): a false "different" (the same object with its keys in
    another order) only costs a value sent whole, never a wrong state.
    """
    return orjson.dumps(a) == orjson.dumps(b)


def apply(target: Any, patch: Any) -> Any:
    """`target` with `patch` applied (RFC 7396, section 2), as a new value.

    `target` is left untouched: objects on the patched paths are copied, the rest is shared.
    """
    if type(patch) is not dict:
        return patch
    result = dict(target) if type(target) is dict else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply(result.get(key), value)
    return result
