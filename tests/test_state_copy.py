"""The state copy a reload makes: serialize in the old Lua state, deserialize in a fresh one.

The shape checks run in Lua, in the new state, because Python wrappers of Lua tables cannot tell
two references to one table apart.
"""

from __future__ import annotations

from typing import Any

import pytest

from asobi.lua.runtime import Limits, MatchLua
from tests.test_patterns import _QuietHost

BUILD = b"""
function build()
  local shared = { hp = 10 }
  local s = {
    a = shared, b = shared,            -- one table, two references
    int = 3, float = 3.0, neg = -0.5, big = math.maxinteger, tiny = math.mininteger,
    inf = math.huge, bin = "\\0\\255\\n" .. string.rep("\\1", 300),
    [1] = "one", [2.5] = "float key", [true] = "bool key", [-7] = "negative",
    empty = {}, flag = false, nested = { deeper = { deepest = { "x" } } },
  }
  s.self = s                           -- a cycle through the root
  s.ring = { }
  s.ring.next = { back = s.ring }      -- a cycle below the root
  s[shared] = "table key"              -- a table used as a key
  return s
end
"""

CHECK = b"""
function check(s)
  local problems = {}
  local function expect(cond, what) if not cond then problems[#problems + 1] = what end end
  expect(s.a == s.b and s.a.hp == 10, "shared sub-table")
  expect(s.self == s, "cycle through the root")
  expect(s.ring.next.back == s.ring, "cycle below the root")
  expect(math.type(s.int) == "integer" and s.int == 3, "integer")
  expect(math.type(s.float) == "float" and s.float == 3.0, "float that looks like an integer")
  expect(s.neg == -0.5 and s.inf == math.huge, "floats")
  expect(s.big == math.maxinteger and s.tiny == math.mininteger, "integer limits")
  expect(s.bin == "\\0\\255\\n" .. string.rep("\\1", 300), "binary string")
  expect(s[1] == "one" and s[2.5] == "float key" and s[true] == "bool key", "non-string keys")
  expect(s[-7] == "negative", "negative key")
  expect(s[s.a] == "table key", "table key is the shared table")
  expect(type(s.empty) == "table" and next(s.empty) == nil, "empty table")
  expect(s.flag == false, "false value")
  expect(s.nested.deeper.deepest[1] == "x", "nesting")
  local count = 0
  for _ in pairs(s) do count = count + 1 end
  expect(count == 19, "key count " .. count)
  return table.concat(problems, "; ")
end
"""


def runtime() -> MatchLua:
    lua = MatchLua(_QuietHost(), Limits(), seed=3)
    lua.load(BUILD + CHECK, "state.lua")
    return lua


def copy(old: MatchLua, new: MatchLua, state: Any) -> Any:
    blob = old.api_call("reload copy", "serialize", state, budget=1.0)
    assert blob.ok, blob.error
    assert isinstance(blob.value, bytes)
    restored = new.api_call("reload copy", "deserialize", blob.value, budget=1.0)
    assert restored.ok, restored.error
    return restored.value


def test_shape_and_values_survive_the_copy() -> None:
    old, new = runtime(), runtime()
    built = old.call("build")
    assert built.ok, built.error
    assert old.call("check", built.value).value == b""  # the checks hold on the original
    restored = copy(old, new, built.value)
    assert new.call("check", restored).value == b""


def test_copy_of_a_copy_is_identical() -> None:
    a, b, c = runtime(), runtime(), runtime()
    state = a.call("build").value
    once = copy(a, b, state)
    twice = copy(b, c, once)
    assert c.call("check", twice).value == b""


def test_empty_state() -> None:
    old, new = runtime(), runtime()
    restored = copy(old, new, old.new_table())
    assert MatchLua.is_table(restored)
    assert list(restored.items()) == []


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("s.fn = function() end", "state.fn is a function; only plain data survives a reload"),
        (
            "s.players = { alice = { on_hit = print } }",
            "state.players.alice.on_hit is a function",
        ),
        ("s.co = coroutine.create(function() end)", "state.co is a thread"),
        ("s.list = { 1, 2, function() end }", "state.list[3] is a function"),
        ("s.obj = setmetatable({}, {})", "state.obj has a metatable"),
        (
            "s.inner = { x = setmetatable({}, { __metatable = false }) }",
            "state.inner.x has a metatable",
        ),
        ("setmetatable(s, {})", "state has a metatable"),
        ("s[function() end] = 1", "state(key) is a function"),
    ],
)
def test_non_data_is_refused_with_its_path(setup: str, message: str) -> None:
    old = runtime()
    old.load(f"function make() local s = {{ ok = 1 }} {setup} return s end".encode(), "bad.lua")
    state = old.call("make").value
    result = old.api_call("reload copy", "serialize", state, budget=1.0)
    assert not result.ok
    assert message in result.error


def test_state_that_is_not_a_table() -> None:
    old = runtime()
    result = old.api_call("reload copy", "serialize", 42, budget=1.0)
    assert not result.ok and "state is a number, not a table" in result.error


def test_copy_is_budgeted() -> None:
    old = runtime()
    old.load(
        b"function make() local s = {} for i = 1, 200000 do s[i] = { i, tostring(i) } end "
        b"return s end",
        "big.lua",
    )
    state = old.call_function("make", old.function("make"), budget=5.0).value
    result = old.api_call("reload copy", "serialize", state, budget=0.001)
    assert not result.ok and result.error == "reload copy exceeded its time budget"


def test_python_data_into_lua_is_bounded() -> None:
    """Whoever hands data to Lua, nesting beyond the limit is refused, not a recursion crash."""
    from asobi.lua.convert import MAX_DEPTH, ConversionError

    lua = runtime()
    deep: Any = []
    for _ in range(1000):
        deep = [deep]
    with pytest.raises(ConversionError, match=f"deeper than {MAX_DEPTH}"):
        lua.to_lua(deep)
    table = lua.to_lua({"a": [1, 2, {"b": "c"}]})
    assert table[b"a"][3][b"b"] == b"c"
