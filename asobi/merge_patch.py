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

from typing import Any


def diff(old: Any, new: Any) -> Any:
    """The merge patch that turns `old` into `new` (`{}` when they are the same object).

    Unchanged keys are left out, removed keys become `null`, changed objects recurse, anything
    else is sent whole.  The patch shares sub-values with `new` (nothing is copied or mutated), so
    it must be encoded before `new` changes.
    """
    if type(new) is not dict or type(old) is not dict:
        return new
    patch: dict[str, Any] = {}
    for key in old:
        if key not in new:
            patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
            continue
        before = old[key]
        if value is before:
            continue
        kind = type(value)
        if kind is dict:
            if type(before) is dict:
                sub = diff(before, value)
                if sub:
                    patch[key] = sub
            else:
                patch[key] = value
        elif (
            kind is not type(before)
            or value != before
            or (kind is list and not same(before, value))
        ):
            patch[key] = value
    return patch


def same(a: Any, b: Any) -> bool:
    """Deep equality that also tells `1`, `1.0` and `true` apart (their JSON differs)."""
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is dict:
        return len(a) == len(b) and all(k in b and same(v, b[k]) for k, v in a.items())
    if kind is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


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
