"""asobi's Lua C functions (`_native.c`): where they are, and whether this process uses them.

Three jobs on the tick path are done in C inside each match's Lua state, because crossing into
Python value by value or assembling bytes in Lua cost more than the work itself:

- `tojson` (`_tojson.c`) writes a `get_state` result as JSON text; only the text crosses
  (`calls.lua`, `B.call_each`).  Converting results value by value into Python objects, then
  encoding those, was a third of the server's CPU per state frame.  It writes only what the
  host's walk (`asobi.lua.convert.to_python`) accepts and declines anything else, so errors still
  come from the walk, worded as before.
- `pack` (`_pack.c`) writes a snapshot in pack.lua's format, the same bytes; it declines what
  pack.lua refuses, whose error then names the path (`sandbox.lua`, `api.snapshot`).
- `now` reads the budgets' clock (`time.perf_counter`'s) without calling into Python: it is read
  before every `get_state` and input call and every 1,000 instructions (`calls.lua`).
- `budget` (`_budget.c`) makes the budgeted calls of the tick path (`B.call`, `B.call_each`,
  `B.tick`, which is `api.tick`), and `math.*` and `game.players()` as scripts call them, in C:
  one copy of that code for every match's Lua state, where the Lua functions are a copy per
  state, cold at every match-tick once there are hundreds of them.
  calls.lua keeps everything else of the containment rules (the budget error, the wrappers of
  pcall, xpcall and coroutines, host functions' clock checks) and shares its state with them.

They are optional.  They are built at install time when a C compiler is there (`pyproject.toml`,
`ext-modules`, optional); without them, or with `ASOBI_NATIVE=0` in the environment, the host's
walk and pack.lua do that work, as they always did, with the same results.  They are Lua C
functions, not Python ones: each Lua state loads them with `package.loadlib` (never reachable
from a script).  They call the Lua API of lupa's `lua54` extension through pointers looked up
there once per process (`asobi_native_bind`): Python loads extensions privately, and making
lupa's symbols global instead (lupa's `allow_lua_module_loading`) would let them bind into any
other Lua loaded later.  Before they are trusted, each must write a probe table as expected.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
from importlib import machinery
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import structlog
from lupa import lua54

from asobi import c_parts
from asobi.lua.convert import MAX_NODES, to_python

__all__ = ["MAX_NODES", "Functions", "library", "load_into"]

log = structlog.get_logger("asobi.lua")

_OPEN = b"luaopen_asobi_native"

# Every kind of value and table shape the encoder writes itself, with text to escape, floats on
# both of its paths, the integer extremes and empty and nested tables.
_PROBE = (
    b"return { s = 'caf\\195\\169 \"q\" \\\\ \\n\\t\\1', i = 9223372036854775807,"
    b" j = -9223372036854775807 - 1, f = 0.1, g = -12.375, h = 1e300, k = 5e-324, z = -0.0,"
    b" w = 100.0, t = true, u = false, e = {}, list = {1, 2.5, 'x', {a = {}}},"
    b" nested = { deeper = { [1] = 'one', [2] = 'two' } } }"
)
# pack.lua's bytes for { a = 1 }: magic, one table of one pair, "a" (tag 1) -> 1 (tag 2).
_PACKED_PROBE = b"ASN1\x01\x00\x00\x00\x01\x01\x00\x00\x00a\x02" + (1).to_bytes(8, "little")


def _built() -> Path | None:
    here = Path(__file__).resolve().parent
    for suffix in machinery.EXTENSION_SUFFIXES:
        path = here / f"_native{suffix}"
        if path.is_file():
            return path
    return None


class Functions(NamedTuple):
    """The C functions as functions of one Lua state."""

    tojson: Any
    pack: Any
    # The budgets' clock, `time.perf_counter` read in C, or that function itself when the two
    # did not agree (another platform's perf_counter need not be CLOCK_MONOTONIC).
    now: Any
    # The C budgeted calls' maker for calls.lua, or None (calls.lua's own then run): they read
    # the C clock, so they are used only with it, and only once they passed their probe.
    budget: Any


def load_into(runtime: Any, path: bytes) -> Functions:
    """The C functions in `runtime`'s Lua state (one `package.loadlib`)."""
    loader = runtime.globals()[b"package"][b"loadlib"](path, _OPEN)
    functions = loader() if callable(loader) else None
    if functions is None:
        raise OSError(f"package.loadlib could not open {path!r} (or it was never bound)")
    now = functions[b"now"] if _c_clock else time.perf_counter
    budget = functions[b"budget"] if _c_clock and budget_in_c else None
    return Functions(functions[b"tojson"], functions[b"pack"], now, budget)


# Whether the C clock reads what `time.perf_counter` reads: checked once, by `library`'s probe,
# before any match's Lua state loads the functions.
_c_clock = True
# Whether the budgeted calls run in C (`_budget.c`): set by `library`'s probe.  The containment
# tests turn it off to run calls.lua's own calls under the same attacks.
budget_in_c = True

# The C budgeted calls on a state of their own: a call's results, an error's message, and a
# runaway loop cut by the count hook through `cut`, which sets the budget error they report.
_BUDGET_PROBE = b"""
local budget, now = ...
local S = { math.huge, false, "", "", 0, false }
S[2] = nil
S[6] = function() S[2] = "cut"; error("cut", 0) end
local call, each = budget(S, function(e) return e end, 100, 1000, {})
if not call then return "it did not open" end
local ok, a, b = call("", "", now() + 1, function(x) return x + 1, "two" end, 41)
if ok ~= true or a ~= 42 or b ~= "two" then return "a call returned " .. tostring(a) end
ok, a = call("", "", now() + 1, function() error("no", 0) end)
if ok ~= false or a ~= "no" then return "an error came back as " .. tostring(a) end
ok, a = call("", "", now() + 0.005, function() while true do end end)
if ok ~= false or a ~= "cut" or S[2] ~= nil or S[1] ~= math.huge then
  return "a runaway call came back as " .. tostring(a)
end
local r = { each("", "", 1, function(state, id) return { id = id } end, {}, "p1", "p2") }
if #r ~= 4 or r[1] ~= 1 or r[2] ~= '{"id":"p1"}' or r[4] ~= '{"id":"p2"}' then
  return "call_each returned " .. tostring(r[2])
end
return true
"""


def _same_clock(now: Any) -> bool:
    """Whether the C clock reads what `time.perf_counter` reads (within 1 ms, read in turn)."""
    before = time.perf_counter()
    reading = now()
    after = time.perf_counter()
    return isinstance(reading, float) and before - 0.001 <= reading <= after + 0.001


def _probe_budget(runtime: Any, now: Any, path: bytes) -> None:
    """Run the C budgeted calls' probe; on a failure calls.lua's own calls stay (logged)."""
    global budget_in_c
    maker = runtime.globals()[b"package"][b"loadlib"](path, _OPEN)()[b"budget"]
    probed = runtime.execute(_BUDGET_PROBE, maker, now)
    if probed is not True:
        budget_in_c = False
        log.warning("lua_native_budget_unused", reason=str(probed))


@functools.cache
def library() -> bytes | None:
    """The built library's path for `package.loadlib`, or None when the host's walk and pack.lua
    do the work: not built, turned off (`ASOBI_NATIVE=0`), or it failed its check (logged)."""
    global _c_clock
    if not c_parts.wanted():
        return None
    path = _built()
    if path is None:
        return None
    try:
        if not ctypes.CDLL(str(path)).asobi_native_bind(os.fsencode(lua54.__file__)):
            raise OSError(f"the Lua API was not found in {lua54.__file__}")
        runtime = lua54.LuaRuntime(register_eval=False, register_builtins=False, encoding=None)
        functions = load_into(runtime, bytes(path))
        probe = runtime.execute(_PROBE)
        written = functions.tojson(probe, MAX_NODES)
        if not isinstance(written, bytes) or orjson.loads(written) != to_python(probe):
            raise ValueError(f"the probe table came out as {written!r}")
        packed = functions.pack(
            runtime.execute(b"return { a = 1 }"), float("inf"), time.perf_counter
        )
        if packed != _PACKED_PROBE:
            raise ValueError(f"the probe state was packed as {packed!r}")
        _c_clock = _same_clock(functions.now)
        if not _c_clock:
            log.warning("lua_native_clock_unused", reason="it disagrees with time.perf_counter")
        if _c_clock:
            _probe_budget(runtime, functions.now, bytes(path))
    except Exception as exc:  # any failure means: the host's walk and pack.lua instead
        log.warning("lua_native_unavailable", path=str(path), error=str(exc))
        return None
    return bytes(path)
