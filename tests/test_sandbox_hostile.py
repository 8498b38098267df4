"""Hostile match scripts against a real server, with real clients.

Every attack runs in its own match next to a victim match.  The attack must be refused (the
capability is simply not there) or contained (the callback fails within its budget, the match ends
after `max_consecutive_failures` failed ticks), and meanwhile the victim must keep ticking on time:
its counter climbs by one per frame and no tick of any match starts later than the hostile
callback's budget plus some slack for the machine (measured by the server's own scheduler).
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import pytest
from lupa import lua54

from asobi.lua.runtime import Limits
from tests.conftest import Client, Logs, run_queue_wait, take_lateness

# Every test runs on the C budgeted calls and on calls.lua's (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("budget_machinery")

TICK_BUDGET = 0.02
LIMITS = Limits(tick=TICK_BUDGET, init=0.2, join=0.05, get_state=0.01, max_memory=16 * 2**20)
FAILURES = 3
SLACK = 0.06  # scheduling noise on a loaded test machine

VICTIM = """
tick_rate = 20
function init(state) state.counter = 0 return state end
function tick(state) state.counter = state.counter + 1 return state end
function get_state(state) return { counter = state.counter } end
"""

HOSTILE = """
tick_rate = 20
function init(state) state.n = 0 return state end
function tick(state)
  state.n = state.n + 1
  {attack}
  return state
end
function get_state(state) return {{ n = state.n }} end
"""


def bytecode_module() -> str:
    """A precompiled chunk, as a script author could produce with luac or string.dump."""
    lua = lua54.LuaRuntime(encoding=None)
    dumped = lua.execute(b"return string.dump(function() return os.execute end)")
    return dumped.decode("latin-1")


class VictimWatch:
    """Collects the victim's counters, and the server's tick lateness, while an attack runs."""

    def __init__(self, client: Client, app: Any) -> None:
        self.client = client
        self.app = app
        self.frames: list[int] = []
        self.arrivals: list[float] = []  # client-side, for reports only (same loop as the server)
        self.done = False
        take_lateness(app)  # the attack's window starts now
        self.waited = run_queue_wait()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self.done:
            (state,) = await self.client.states(1, timeout=10)
            self.frames.append(state["counter"])
            self.arrivals.append(time.monotonic())

    async def stop(self, min_frames: int = 8) -> None:
        """Stop watching once at least `min_frames` frames were seen (a short attack still gets
        a meaningful sample)."""
        deadline = time.monotonic() + 5
        while len(self.frames) < min_frames and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # Stopped by a flag, not by cancelling a pending receive: a cancel that lands as the
        # receive completes can be lost (asyncio.wait_for on 3.11) and the watch never ends.
        self.done = True
        await asyncio.wait_for(self._task, 15)

    def worst_gap(self) -> float:
        """The longest time between two victim frames as the client saw them (for reports)."""
        return max(
            (b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)), default=0.0
        )

    def assert_on_time(self, budget: float) -> None:
        counters = self.frames
        assert len(counters) >= 5, counters
        assert counters == list(range(counters[0], counters[0] + len(counters))), counters
        lateness = take_lateness(self.app)
        stolen = max(run_queue_wait() - self.waited, 0.0)  # by other processes, not the server
        allowed = budget + SLACK + stolen
        assert lateness and max(lateness) <= allowed, (
            f"a tick started {max(lateness):.3f}s late (allowed {allowed:.3f}s, "
            f"{stolen:.3f}s of it waiting for a CPU)"
        )


def _seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


async def start(start_server: Any, hostile: str, **files: str) -> tuple[Any, VictimWatch]:
    server = await start_server(
        {"victim.lua": VICTIM, "hostile.lua": hostile, **files},
        limits=LIMITS,
        max_consecutive_failures=FAILURES,
    )
    victim = await server.player("victim")
    await victim.expect("matchmaker.matched")
    await victim.states(2)
    return server, VictimWatch(victim, server.app)


async def join_hostile(server: Any) -> tuple[Client, str]:
    player = await server.player("hostile")
    matched = await player.expect("matchmaker.matched")
    return player, matched["payload"]["match_id"]


# --------------------------------------------------------------------------------------------------
# Refused: the capability does not exist inside the sandbox.
# --------------------------------------------------------------------------------------------------
PROBES = """
local function try(f)
  local ok, e = pcall(f)
  return (ok and "ok: " or "error: ") .. tostring(e)
end
local function userdata_in(root)
  local seen, found = {}, {}
  local function walk(t, path)
    if seen[t] then return end
    seen[t] = true
    for k, v in pairs(t) do
      local kind = type(v)
      if kind == "userdata" or kind == "thread" then
        found[#found + 1] = path .. "." .. tostring(k)
      end
      if kind == "table" then walk(v, path .. "." .. tostring(k)) end
    end
  end
  walk(root, "_G")
  return table.concat(found, ",")
end
local later = {}
probes = {
  os_execute = type(os.execute),
  os_exit = type(os.exit),
  os_getenv = type(os.getenv),
  io = type(io),
  io_open = try(function() return io.open("/etc/passwd") end),
  require_python = try(function() return require("python") end),
  require_bytecode = try(function() return require("evil") end),
  package = type(package),
  package_loaded = try(function() return package.loaded.python end),
  load = type(load),
  loadstring = type(loadstring),
  dofile = type(dofile),
  loadfile = type(loadfile),
  string_dump = type(string.dump),
  method_dump = type(("").dump),
  string_metatable = tostring(getmetatable("")),
  string_index = try(function() return getmetatable("").__index end),
  set_string_metatable = try(function() return setmetatable("", {}) end),
  debug = type(debug),
  rawget_debug = type(rawget(_G, "debug")),
  rawget_dump = type(rawget(string, "dump")),
  env_metatable = type(getmetatable(_G)),
  python = type(python),
  collectgarbage = type(collectgarbage),
  gc = try(function() return setmetatable({}, { __gc = function() while true do end end }) end),
  send_error = (function()
    local ok, e = pcall(game.send, "nobody", { x = 1 })
    return type(e)
  end)(),
  broadcast_error = (function()
    local ok, e = pcall(game.broadcast, "state", {})
    return type(e)
  end)(),
  userdata = userdata_in(_G),
}
-- A __gc added after setmetatable never marks the object for finalization (Lua 5.4 rule).
for i = 1, 100 do
  local mt = {}
  later[i] = setmetatable({}, mt)
  mt.__gc = function() while true do end end
end
later = nil
function init(state) state.garbage = 0 return state end
function tick(state)
  local t = {}
  for i = 1, 2000 do t[i] = { i } end -- churn so the collector runs
  state.garbage = state.garbage + 1
  return state
end
function get_state(state) return { probes = probes, garbage = state.garbage } end
"""


async def test_escapes_are_refused(start_server: Any, logs: Logs) -> None:
    server, watch = await start(start_server, PROBES, **{"evil.lua": bytecode_module()})
    player, match_id = await join_hostile(server)
    states = await player.states(6)
    probes = states[-1]["probes"]
    assert states[-1]["garbage"] > states[0]["garbage"]
    await watch.stop()
    watch.assert_on_time(budget=0.0)

    for name in (
        "os_execute", "os_exit", "os_getenv", "io", "package", "load", "loadstring", "dofile",
        "loadfile", "string_dump", "method_dump", "debug", "rawget_debug", "rawget_dump",
        "env_metatable", "python", "collectgarbage",
    ):  # fmt: skip
        assert probes[name] == "nil", (name, probes[name])
    assert probes["io_open"].startswith("error: ") and "io" in probes["io_open"]
    assert "module 'python' not found" in probes["require_python"]
    assert "module 'evil' not found" in probes["require_bytecode"]
    assert probes["package_loaded"].startswith("error: ")
    assert probes["string_metatable"] == "false"
    assert "attempt to index a boolean value" in probes["string_index"]
    assert probes["set_string_metatable"].startswith("error: ")
    assert "__gc metamethods are not allowed" in probes["gc"]
    assert probes["send_error"] == "string"
    assert probes["broadcast_error"] == "string"
    assert probes["userdata"] == ""
    rejected = [line for line in logs.events("script_rejected") if line.get("script") == "evil.lua"]
    assert rejected, logs.events("script_rejected")
    assert not [e for e in logs.events("callback_failed") if e["match_id"] == match_id]


# --------------------------------------------------------------------------------------------------
# Contained: the callback fails within its budget; the match ends after repeated failures.
# --------------------------------------------------------------------------------------------------
BIG = 'local s = ("x"):rep(4 * 2^20)'
BIG_HALF = 'local s = ("x"):rep(2 * 2^20)'
ATTACKS = {
    "infinite_loop": ("while true do end", "ms budget at hostile.lua:"),
    "coroutine_loop": (
        "coroutine.wrap(function() while true do end end)()",
        "ms budget at hostile.lua:",
    ),
    "resume_loop": (
        "local co = coroutine.create(function() while true do end end) "
        "local ok, e = coroutine.resume(co) state.swallowed = e",
        "ms budget at hostile.lua:",
    ),
    "pcall_in_a_loop": (
        "while true do pcall(function() while true do end end) end",
        "ms budget at hostile.lua:",
    ),
    "xpcall_handler_loop": (
        "xpcall(function() while true do end end, function() while true do end end)",
        "ms budget at hostile.lua:",
    ),
    "memory_bomb": (
        "local t, s = {}, ('x'):rep(2^20) for i = 1, 1e9 do t[i] = s .. i end",
        "memory",
    ),
    "string_rep_huge": ("local s = ('x'):rep(2^27)", "not enough memory"),
    "string_rep_too_large": ("local s = ('x'):rep(2^62)", "resulting string too large"),
    "string_rep_empty_huge": ("while true do local s = (''):rep(1e15) end", "ms budget"),
    "big_c_calls_in_a_loop": (BIG + " while true do local t = s:upper() end", "ms budget"),
    "big_concat_in_a_loop": (BIG_HALF + " while true do local t = s .. s end", "ms budget"),
    "pathological_pattern": (
        'local r = string.find(("a"):rep(3000), ".-.-.-.-b$")',
        "ms budget at hostile.lua:",
    ),
    "quadratic_plain_find": (
        'local s = ("a"):rep(2^20) local r = s:find(("a"):rep(2^19) .. "b", 1, true)',
        "ms budget at hostile.lua:",
    ),
    "deep_recursion": (
        "local function f(n) return 1 + f(n + 1) end f(1)",
        ("stack overflow", "ms budget at hostile.lua:", "memory"),
    ),
    "hostile_error_object": (
        "error(setmetatable({}, { __tostring = function() while true do end end }))",
        "error object of type table",
    ),
    "gc_metamethod": ("setmetatable({}, { __gc = function() end })", "__gc metamethods"),
}
# Harmless inside the tick; it would hang a host that read the state outside a budget.
STATE_INDEX_LOOP = "setmetatable(state, { __index = function() while true do end end })"


@pytest.mark.parametrize("attack", sorted(ATTACKS))
async def test_attack_is_contained(start_server: Any, logs: Logs, attack: str) -> None:
    source, expected = ATTACKS[attack]
    server, watch = await start(start_server, HOSTILE.format(attack=source))
    player, match_id = await join_hostile(server)
    finished = await player.expect("match.finished", timeout=10)
    await watch.stop(min_frames=len(watch.frames) + 3)  # the victim goes on after the attack

    error = finished["payload"]["result"]["error"]
    assert error.startswith(f"tick failed {FAILURES} times in a row: ")
    expected_any = (expected,) if isinstance(expected, str) else expected
    assert any(e in error for e in expected_any), error
    watch.assert_on_time(TICK_BUDGET)
    failed = [e for e in logs.events("callback_failed") if e["match_id"] == match_id]
    assert len(failed) == FAILURES
    assert all(e["callback"] == "tick" and e["error"] for e in failed)
    finished_log = await logs.wait_for("match_finished", lambda e: e["match_id"] == match_id)
    assert finished_log["result"] == {"error": error}
    # FAILURES failed ticks at 20 Hz, each cut at its budget, by the server's clock.
    started_log = next(e for e in logs.events("match_started") if e["match_id"] == match_id)
    elapsed = _seconds(finished_log["timestamp"]) - _seconds(started_log["timestamp"])
    assert elapsed < FAILURES * (1 / 20 + TICK_BUDGET) + SLACK, elapsed


async def test_callback_failed_log_has_a_truncated_traceback(start_server: Any, logs: Logs) -> None:
    attack = (
        "local function f(n) if n == 0 then error('too deep: ' .. string.rep('x', 10)) end "
        "return 1 + f(n - 1) end f(40)"
    )
    server, watch = await start(start_server, HOSTILE.format(attack=attack))
    player, match_id = await join_hostile(server)
    await player.expect("match.finished", timeout=10)
    await watch.stop()
    line = await logs.wait_for("callback_failed", lambda e: e["match_id"] == match_id)
    assert line["callback"] == "tick"
    assert line["error"].startswith("hostile.lua:") and "too deep: xxxxxxxxxx" in line["error"]
    assert "\n" not in line["error"]
    trace = line["traceback"].splitlines()
    assert trace[0] == line["error"]
    assert len(trace) <= 9 and trace[-1].startswith("... (") and trace[-1].endswith("more lines)")
    assert any("hostile.lua" in t for t in trace[1:])


async def test_state_metamethods_never_run_outside_a_budget(start_server: Any, logs: Logs) -> None:
    """The host reads state._finished after each tick; a looping __index must not run there."""
    server, watch = await start(start_server, HOSTILE.format(attack=STATE_INDEX_LOOP))
    player, match_id = await join_hostile(server)
    states = await player.states(5, timeout=5)
    ns = [s["n"] for s in states]
    assert ns == list(range(ns[0], ns[0] + 5))
    await watch.stop()
    watch.assert_on_time(TICK_BUDGET)
    # The tick itself succeeds every time: nothing the host did ran the metamethod.
    assert not [e for e in logs.events("callback_failed") if e["match_id"] == match_id]


async def test_hostile_input_handler_is_contained(start_server: Any, logs: Logs) -> None:
    """Players can trigger the attack too: a looping handle_input fails alone, the tick goes on."""
    script = HOSTILE.format(attack="") + (
        "function handle_input(state, player, input) while true do end end\n"
    )
    server, watch = await start(start_server, script)
    player, match_id = await join_hostile(server)
    for _ in range(3):
        await player.send("match.input", {"move": 1})
    line = await logs.wait_for(
        "callback_failed", lambda e: e["match_id"] == match_id and e["callback"] == "handle_input"
    )
    assert line["error"] == (
        "handle_input exceeded its 50 ms budget at hostile.lua:10"
        " (raise with ASOBI_LUA_HANDLE_INPUT)"
    )
    states = await player.states(3)
    assert states[-1]["n"] > states[0]["n"]
    await watch.stop()
    # Inputs run as they arrive, each cut at its own budget: three sent at once can hold the
    # loop for three budgets.
    watch.assert_on_time(3 * LIMITS.handle_input)


# --------------------------------------------------------------------------------------------------
# The whole reachable surface, pinned: a name appearing here is a decision, not an accident.
# --------------------------------------------------------------------------------------------------
SURFACE = {
    "_G": (
        "_ASOBI_LOADED _G _VERSION assert coroutine error game getmetatable ipairs math next os "
        "pairs pcall print rawequal rawget rawlen rawset require select setmetatable string table "
        "tonumber tostring type utf8 xpcall"
    ),
    "string": (
        "byte char find format gmatch gsub len lower match pack packsize rep reverse sub unpack "
        "upper"
    ),
    "table": "concat insert move pack remove sort unpack",
    "math": (
        "abs acos asin atan ceil cos deg exp floor fmod huge log max maxinteger min mininteger "
        "modf pi rad random randomseed sin sqrt tan tointeger type ult"
    ),
    "utf8": "char charpattern codepoint codes len offset",
    "os": "clock date time",
    "coroutine": "close create isyieldable resume running status wrap yield",
    "game": "broadcast economy id leaderboard log players random send storage tick",
    "game.economy": "balance debit grant",
    "game.leaderboard": "around rank submit top",
    "game.storage": "get player_get player_set set",
}

LIST_SURFACE = b"""
local function keys(t)
  local out = {}
  for k in pairs(t) do out[#out + 1] = k end
  table.sort(out)
  return table.concat(out, " ")
end
function surface()
  return {
    _G = keys(_G), string = keys(string), table = keys(table), math = keys(math),
    utf8 = keys(utf8), os = keys(os), coroutine = keys(coroutine), game = keys(game),
    ["game.economy"] = keys(game.economy), ["game.leaderboard"] = keys(game.leaderboard),
    ["game.storage"] = keys(game.storage),
  }
end
"""


def test_reachable_surface_is_exactly_the_whitelist() -> None:
    from asobi.lua.convert import to_python
    from asobi.lua.runtime import MatchLua
    from tests.test_patterns import _QuietHost, load_source

    lua = MatchLua(_QuietHost(), Limits(), seed=1)
    load_source(lua, LIST_SURFACE, "surface.lua")
    result = lua.call("surface")
    assert result.ok, result.error
    surface = to_python(result.value, what="surface")
    # `surface` itself is a global of this script.
    surface["_G"] = " ".join(k for k in surface["_G"].split() if k != "surface")
    assert surface == SURFACE
