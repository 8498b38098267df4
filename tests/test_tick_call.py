"""The tick's one crossing (`MatchLua.call_tick`): it sets game.tick(), runs `tick` under its
budget, and says whether the state the match adopts asks to end it, exactly as reading
`state._finished` after the call did."""

from __future__ import annotations

import pytest

from asobi.lua.runtime import Limits, MatchLua, compile_script
from tests.test_patterns import _QuietHost

# Every test runs on the C budgeted calls and on calls.lua's (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("budget_machinery")

SCRIPT = b"""
function tick(state)
  local how = state.how
  if how == "return_finished" then return { _finished = true, seen = game.tick() } end
  if how == "mutate" then state._finished = true state.seen = game.tick() return end
  if how == "fail" then error("broken") end
  if how == "not_a_table" then return 7 end
  if how == "false_flag" then state._finished = false return state end
  if how == "spin" then while true do end end
  state.seen = game.tick()
  return state
end
"""


def lua_with(limits: Limits | None = None) -> MatchLua:
    lua = MatchLua(_QuietHost(), limits or Limits(), seed=1)
    lua.load(compile_script(SCRIPT, "tick.lua"), "tick.lua")
    return lua


def state(lua: MatchLua, how: str, finished: bool = False) -> object:
    table = lua.new_table()
    table[b"how"] = how.encode()
    if finished:
        table[b"_finished"] = True
    return table


@pytest.mark.parametrize(
    ("how", "already", "ok", "finished"),
    [
        ("plain", False, True, False),
        ("return_finished", False, True, True),  # the returned table is the adopted state
        ("mutate", False, True, True),  # nothing returned: the given state, as changed
        ("false_flag", True, True, False),
        ("fail", False, False, False),
        ("fail", True, False, True),  # a failed tick keeps the given state, flag and all
        ("not_a_table", True, True, True),  # the host refuses a 7 and keeps the given state
    ],
)
def test_finished_is_read_from_the_state_the_match_adopts(
    how: str, already: bool, ok: bool, finished: bool
) -> None:
    lua = lua_with()
    result, flag = lua.call_tick(state(lua, how, already), 41)
    assert result.ok is ok
    assert flag is finished
    if ok and how in ("plain", "return_finished"):
        assert lua.field(result.value, "seen") == 41  # game.tick() was set in the same crossing
    assert lua.call("tick", state(lua, "plain")).ok
    assert lua.field(lua.call("tick", state(lua, "plain")).value, "seen") == 41


def test_a_tick_cut_at_its_budget_keeps_the_given_state_and_its_flag() -> None:
    lua = lua_with(Limits(tick=0.02))
    result, flag = lua.call_tick(state(lua, "spin", finished=True), 3)
    assert not result.ok and "exceeded its 20 ms budget" in result.error
    assert flag is True


def test_match_states_collect_garbage_generationally() -> None:
    """Young garbage of every tick is collected in minor cycles (see `MatchLua.__init__`):
    switching to generational mode answers with the mode in force, already generational."""
    lua = lua_with()
    collect = lua.runtime.globals()[b"collectgarbage"]
    assert collect(b"generational") == b"generational"


def test_the_budgeted_calls_are_the_ones_asked_for(budget_machinery: str) -> None:
    """With asobi's Lua C functions the tick path's budgeted calls are C functions shared by
    every state (`_budget.c`); without, calls.lua's own Lua functions."""
    lua = lua_with()
    getinfo = lua.runtime.globals()[b"debug"][b"getinfo"]
    expected = b"C" if budget_machinery == "c" else b"Lua"
    names = (b"call", b"call_each", b"tick")
    assert [getinfo(lua.api[name], b"S")[b"what"] for name in names] == [expected] * 3
