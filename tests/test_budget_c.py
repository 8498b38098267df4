"""The budgeted calls in C (`asobi/lua/_budget.c`) against calls.lua's own: every outcome a
script can produce (results, each kind of error object, budget cuts wherever they land, errors
raised while an error unwinds) must come back the same through both, as the host sees it.

The containment suites run on both too (`budget_machinery` in tests/conftest.py); this one
compares them directly, call by call, in one process.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from asobi.lua import native
from asobi.lua.runtime import Limits, MatchLua, compile_script
from tests.test_patterns import _QuietHost

if native.library() is None or not native.budget_in_c:
    pytest.skip("asobi's Lua C functions are not built here", allow_module_level=True)

# Each `tick` is one case, picked by `state.case`; every loop is on one line, so a cut names
# the same line whichever instruction it lands on.
SCRIPT = b"""
local cases = {}
cases.plain = function(state) state.n = (state.n or 0) + 1 return state end
cases.nothing = function(state) end
cases.fresh = function(state) return { case = "fresh", n = 99, _finished = true } end
cases.finished = function(state) state._finished = "yes" end
cases.number = function(state) return 7 end
cases.many = function(state) return state, 2, "three" end
cases.error_string = function(state) error("broken") end
cases.error_level0 = function(state) error("bare", 0) end
cases.error_nil = function(state) error(nil) end
cases.error_number = function(state) error(42) end
cases.error_table = function(state) error({ code = 1 }) end
cases.error_tostring = function(state)
  error(setmetatable({}, { __tostring = function() return "from __tostring" end }))
end
cases.runaway = function(state)
  while true do end
end
cases.runaway_pcall = function(state)
  for i = 1, 100 do pcall(function() while true do end end) end
end
cases.runaway_xpcall = function(state)
  xpcall(function() while true do end end, function(e) while true do end end)
end
cases.runaway_coroutine = function(state)
  local co = coroutine.create(function() while true do end end) coroutine.resume(co)
end
cases.runaway_close = function(state)
  local guard <close> = setmetatable({}, { __close = function() while true do end end })
  error("first")
end
cases.error_in_close = function(state)
  local guard <close> = setmetatable({}, { __close = function() error("from __close") end })
  return state
end
cases.deep = function(state)
  -- Through C at every level: Lua's C stack limit ends it in ~200 levels, long before a budget
  -- or the memory cap could (plain Lua recursion reaches either first, whichever is faster).
  local t = setmetatable({}, { __index = function(t, k) return t[k] end })
  return t.x
end
cases.math_ok = function(state)
  local a, b = math.modf(3.25)
  state.n = math.floor(2.5) + math.max(1, 5, 3) + math.floor("12") + a + b + math.abs(-1)
  return state
end
cases.math_long = function(state) local x = math.floor(("1"):rep(201)) return state end
cases.math_long_third = function(state) local x = math.max(1, 2, ("1"):rep(300)) end
cases.math_table = function(state) local x = math.floor({}) end
cases.math_zero = function(state) local x = math.fmod(1, 0) end
cases.math_none = function(state) local x = math.max() end
cases.math_tail = function(state) return math.ult(1.5, 2) end
cases.math_caught = function(state)
  local ok, e = pcall(math.floor, ("2"):rep(500))
  state.n = ok and 1 or #e
  return state
end
cases.players = function(state)
  local mine = game.players()
  mine[1], mine[4] = "changed", "added"
  local again = game.players()
  state.n = #mine * 100 + #again * 10 + (again[1] == "p1" and 1 or 0) + game.tick()
  return state
end
cases.memory = function(state)
  local t = {} for i = 1, 1e8 do t[i] = ("x"):rep(64) .. i end
end

function tick(state) return cases[state.case](state) end

function get_state(state, player_id)
  if state.case == "error_table" then error({}) end
  if state.case == "runaway" then while true do end end
  if player_id == "p2" and state.case == "error_string" then error("no frame for p2") end
  return { case = state.case, you = player_id, n = state.n }
end
"""

CASES = [
    "plain",
    "nothing",
    "fresh",
    "finished",
    "number",
    "many",
    "error_string",
    "error_level0",
    "error_nil",
    "error_number",
    "error_table",
    "error_tostring",
    "runaway",
    "runaway_pcall",
    "runaway_xpcall",
    "runaway_coroutine",
    "runaway_close",
    "error_in_close",
    "deep",
    "memory",
    "math_ok",
    "math_long",
    "math_long_third",
    "math_table",
    "math_zero",
    "math_none",
    "math_tail",
    "math_caught",
    "players",
]

LIMITS = Limits(tick=0.02, get_state=0.01, max_memory=8 * 2**20)


def _lua(monkeypatch: pytest.MonkeyPatch, in_c: bool, script: bytes = SCRIPT) -> MatchLua:
    monkeypatch.setattr(native, "budget_in_c", in_c)
    lua = MatchLua(_QuietHost(), LIMITS, seed=1, watched=False)
    lua.load(compile_script(script, "match.lua"), "match.lua")
    lua.set_context("m1", 4, ["p1", "p2", "p3"])
    return lua


def _plain(lua: MatchLua, value: Any) -> Any:
    """A call's value as comparable data (a table by its fields)."""
    if lua.runtime.eval("type")(value) == b"table":
        return sorted((k, lua.field(value, k)) for k in ("case", "n"))
    return value


def _script_lines(error: str | None) -> str | None:
    """An error without the traceback's host frames (below the script's, they differ: calls.lua's
    xpcall in one, the C call in the other)."""
    if not error:
        return error
    message, _, trace = error.partition("\nstack traceback:")
    return message + "".join(f"|{line}" for line in trace.splitlines() if "match.lua" in line)


def _outcome(lua: MatchLua, case: str) -> tuple[Any, ...]:
    state = lua.new_table()
    state[b"case"] = case.encode()
    result, finished, states = lua.tick_states(state, 5, ["p1", "p2", None])
    ticked = (
        result.ok,
        [_plain(lua, v) for v in result.values],
        _script_lines(result.error),
        finished,
    )
    # get_state's JSON texts as data: key order follows each Lua state's own string hashing.
    frames = [
        (data, None if text is None else orjson.loads(text), _script_lines(error))
        for data, text, error in states or ()
    ]
    called = lua.call("tick", state)
    values = [_plain(lua, v) for v in called.values]
    return ticked, frames, (called.ok, values, _script_lines(called.error))


@pytest.mark.parametrize("case", CASES)
def test_both_machineries_give_the_same_outcome(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    in_c = _outcome(_lua(monkeypatch, True), case)
    in_lua = _outcome(_lua(monkeypatch, False), case)
    if case == "math_tail":
        # A math function's error from a tail call: calls.lua's wrapper, itself tail-called,
        # replaced every script frame, so its message names no line; the C wrapper runs above
        # the script's frame and names it.  The message is otherwise the same.
        c_error, lua_error = in_c[0][2], in_lua[0][2]
        assert lua_error == "bad argument #1 to 'math.ult' (number has no integer representation)"
        assert c_error.startswith("match.lua:") and lua_error in c_error
        return
    if case == "deep":
        # The C calls take fewer levels of the C stack than calls.lua's xpcall, so the overflow
        # comes a level or two deeper and the traceback's frames differ; the message does not.
        first_line = [outcome[0][2].split("|")[0] for outcome in (in_c, in_lua)]
        assert first_line[0] == first_line[1] == "match.lua:40: C stack overflow"
        return
    assert in_c == in_lua
    if case.startswith("runaway"):
        assert "tick exceeded its 20 ms budget at match.lua:" in in_c[0][2]


def test_the_state_after_a_cut_is_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a budget cut (and after an ordinary error) the next calls run under a fresh
    deadline with nothing of the cut left over: same outcomes, in C as in Lua."""
    for in_c in (True, False):
        lua = _lua(monkeypatch, in_c)
        outcomes = [_outcome(lua, case)[0] for case in ("runaway", "plain", "error_nil", "plain")]
        assert [ok for ok, _, _, _ in outcomes] == [False, True, False, True]
        assert outcomes[1] == outcomes[3]


# handle_input for the inputs' cases: each input says what the call does.  `B.call_inputs` is
# calls.lua's loop either way; each of its calls is the C `B.call` or calls.lua's.
INPUTS_SCRIPT = b"""
function handle_input(state, player_id, input)
  local how = type(input) == "table" and input.how or input
  if type(how) ~= "string" then how = type(how) end
  state.seen = (state.seen or "") .. player_id .. ":" .. tostring(how) .. ";"
  if how == "fail" then error("no " .. player_id) end
  if how == "number" then return 5 end
  if how == "fresh" then return { seen = state.seen .. "fresh;" } end
  if how == "log" then game.log("info", "from " .. player_id) end
  if how == "spin" then while true do end end
  if how == "nothing" then return end
  if type(input) == "table" then state.seen = state.seen .. tostring(input.n) .. ";" end
  return state
end
"""

INPUT_RUNS = {
    "flat": [{"how": "ok", "n": 1}, {"how": "ok", "n": 2.5}, {"how": "nothing"}, {"how": "ok"}],
    "raw": ["ok", ["nested", {"deep": 1}], {"how": "ok", "more": {"x": 1}}],
    "fresh state": [{"how": "fresh"}, {"how": "ok", "n": 3}],
    "failure ends it": [{"how": "ok"}, {"how": "fail"}, {"how": "ok"}],
    "non-table ends it": [{"how": "number"}, {"how": "ok"}],
    "host call ends it": [{"how": "log"}, {"how": "ok"}],
    "runaway": [{"how": "ok"}, {"how": "spin"}, {"how": "ok"}],
}


def _inputs_outcome(lua: MatchLua, inputs: list[Any]) -> tuple[Any, ...]:
    fn = lua.function("handle_input")
    pairs: list[Any] = []
    for index, payload in enumerate(inputs):
        pairs += [f"p{index}".encode(), *lua.input_args(payload)]
    done = lua.call_inputs(fn, lua.new_table(), pairs, time.perf_counter() + 0.05, 0.0, True)
    return (
        done.made,
        lua.field(done.state, "seen"),
        done.last.ok,
        _script_lines(done.last.error),
        [lua.field(v, "seen") if MatchLua.is_table(v) else v for v in done.last.values],
    )


@pytest.mark.parametrize("run", INPUT_RUNS)
def test_both_run_inputs_the_same(monkeypatch: pytest.MonkeyPatch, run: str) -> None:
    outcomes = [
        _inputs_outcome(_lua(monkeypatch, in_c, INPUTS_SCRIPT), INPUT_RUNS[run])
        for in_c in (True, False)
    ]
    assert outcomes[0] == outcomes[1]
    made = outcomes[0][0]
    assert made >= 1
    if run == "runaway":
        assert made == 2 and "exceeded its" in outcomes[0][3]
