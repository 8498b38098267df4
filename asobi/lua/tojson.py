"""The Lua-side JSON encoder for state frames (`_tojson.c`): where it is and whether it is used.

Converting a `get_state` result value by value into Python objects, then encoding those, was a
third of the server's CPU per state frame.  The encoder writes the result's JSON text inside the
match's Lua state, in one call, and only the text crosses to Python (`calls.lua`, `B.call_each`).
It writes only what the host's walk (`asobi.lua.convert.to_python`) would accept and returns nil
for anything else, so errors still come from the walk, worded as before.

It is optional.  It is built at install time when a C compiler is there (`pyproject.toml`,
`ext-modules`, optional); without it, or with `ASOBI_NATIVE_ENCODER=0` in the environment, every
result is walked in Python, as it always was.  It is a Lua C module, not a Python one: each Lua
state loads it with `package.loadlib` (never reachable from a script).  It calls the Lua API of
lupa's `lua54` extension through pointers it looks up there once (`asobi_tojson_bind`): Python
loads extensions privately, and making lupa's symbols global instead (lupa's
`allow_lua_module_loading`) would let them bind into any other Lua loaded later.  Before it is
trusted, it must write a probe table exactly as the walk and orjson read it.
"""

from __future__ import annotations

import ctypes
import functools
import os
from importlib import machinery
from pathlib import Path
from typing import Any

import orjson
import structlog
from lupa import lua54

from asobi.lua.convert import MAX_NODES, to_python

__all__ = ["MAX_NODES", "OPEN_SYMBOL", "library", "load_into"]

log = structlog.get_logger("asobi.lua")

OPEN_SYMBOL = b"luaopen_asobi_tojson"

# Every kind of value and table shape the encoder writes itself, with text to escape, floats on
# both of its paths, the integer extremes and empty and nested tables.
_PROBE = (
    b"return { s = 'caf\\195\\169 \"q\" \\\\ \\n\\t\\1', i = 9223372036854775807,"
    b" j = -9223372036854775807 - 1, f = 0.1, g = -12.375, h = 1e300, k = 5e-324, z = -0.0,"
    b" w = 100.0, t = true, u = false, e = {}, list = {1, 2.5, 'x', {a = {}}},"
    b" nested = { deeper = { [1] = 'one', [2] = 'two' } } }"
)


def _built() -> Path | None:
    here = Path(__file__).resolve().parent
    for suffix in machinery.EXTENSION_SUFFIXES:
        path = here / f"_tojson{suffix}"
        if path.is_file():
            return path
    return None


def load_into(runtime: Any, path: bytes) -> Any:
    """The encoder as a function of `runtime`'s Lua state (`package.loadlib`)."""
    loader = runtime.globals()[b"package"][b"loadlib"](path, OPEN_SYMBOL)
    if not callable(loader):
        raise OSError(f"package.loadlib could not load {path!r}")
    return loader()


@functools.cache
def library() -> bytes | None:
    """The built encoder's path for `package.loadlib`, or None when state results are walked in
    Python: not built, turned off (`ASOBI_NATIVE_ENCODER=0`), or it failed its check (logged)."""
    if os.environ.get("ASOBI_NATIVE_ENCODER", "1") in ("0", "off", "false"):
        return None
    path = _built()
    if path is None:
        return None
    try:
        if not ctypes.CDLL(str(path)).asobi_tojson_bind(os.fsencode(lua54.__file__)):
            raise OSError(f"the Lua API was not found in {lua54.__file__}")
        runtime = lua54.LuaRuntime(register_eval=False, register_builtins=False, encoding=None)
        tojson = load_into(runtime, bytes(path))
        probe = runtime.execute(_PROBE)
        written = tojson(probe, MAX_NODES)
        if not isinstance(written, bytes) or orjson.loads(written) != to_python(probe):
            raise ValueError(f"the probe table came out as {written!r}")
    except Exception as exc:  # any failure means: walk in Python instead
        log.warning("lua_tojson_unavailable", path=str(path), error=str(exc))
        return None
    return bytes(path)
