"""The state copy a reload makes: the new version of a script runs on a data-only copy.

The shape checks run in Lua because Python wrappers of Lua tables cannot tell two references to
one table apart.
"""

from __future__ import annotations

from typing import Any

import pytest

from asobi.lua.runtime import Limits, MatchLua, compile_script
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

-- No table of the copy is a table of the original: the new code cannot touch the running state.
local function tables_of(root)
  local seen, queue, i = { [root] = true }, { root }, 1
  while queue[i] do
    for k, v in pairs(queue[i]) do
      for _, x in ipairs({ k, v }) do
        if type(x) == "table" and not seen[x] then seen[x] = true; queue[#queue + 1] = x end
      end
    end
    i = i + 1
  end
  return seen, #queue
end

function disjoint(a, b)
  local in_a = tables_of(a)
  local in_b, count = tables_of(b)
  for t in pairs(in_b) do
    if in_a[t] then return false end
  end
  return count
end
"""


def runtime() -> MatchLua:
    lua = MatchLua(_QuietHost(), Limits(), seed=3)
    lua.load(compile_script(BUILD + CHECK, "state.lua"), "state.lua")
    return lua


def copy(lua: MatchLua, state: Any) -> Any:
    copied = lua.copy_state(state)
    assert copied.ok, copied.error
    return copied.value


def test_shape_and_values_survive_the_copy() -> None:
    lua = runtime()
    built = lua.call("build")
    assert built.ok, built.error
    assert lua.call("check", built.value).value == b""  # the checks hold on the original
    copied = copy(lua, built.value)
    assert lua.call("check", copied).value == b""
    # root, shared, empty, nested, deeper, deepest, ring, ring.next
    assert lua.call("disjoint", built.value, copied).value == 8


def test_copy_of_a_copy_is_identical() -> None:
    lua = runtime()
    state = lua.call("build").value
    twice = copy(lua, copy(lua, state))
    assert lua.call("check", twice).value == b""
    assert lua.call("disjoint", state, twice).value == 8


def test_empty_state() -> None:
    lua = runtime()
    copied = copy(lua, lua.new_table())
    assert MatchLua.is_table(copied)
    assert list(copied.items()) == []


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
    source = f"function make() local s = {{ ok = 1 }} {setup} return s end".encode()
    old.load(compile_script(source, "bad.lua"), "bad.lua")
    state = old.call("make").value
    result = old.copy_state(state)
    assert not result.ok
    assert message in result.error


def test_state_that_is_not_a_table() -> None:
    old = runtime()
    result = old.copy_state(42)
    assert not result.ok and "state is a number, not a table" in result.error


def test_copy_is_budgeted() -> None:
    old = runtime()
    source = (
        b"function make() local s = {} for i = 1, 200000 do s[i] = { i, tostring(i) } end "
        b"return s end"
    )
    old.load(compile_script(source, "big.lua"), "big.lua")
    state = old.call_function("make", old.function("make"), budget=5.0).value
    result = old.call_function("reload copy", old.api[b"copy"], state, budget=0.001)
    assert not result.ok and result.error == (
        "reload copy exceeded its 1 ms budget (raise with ASOBI_LUA_COPY)"
    )


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


def test_replaced_versions_are_collected() -> None:
    """Every reload leaves the old version's environment behind in the match's Lua state: once
    no longer running, it must be garbage, or a long match would grow with every save."""
    lua = runtime()
    count = lua.runtime.eval("function() collectgarbage() return collectgarbage('count') end")
    versions = [
        compile_script(BUILD + CHECK + f"-- {i}\n".encode() + b"x = string.rep('y', 4096)", "s.lua")
        for i in range(20)
    ]
    lua.load(versions[0], "s.lua")
    baseline = count()
    for round_ in range(10):
        for code in versions:
            running = lua.current()
            lua.load(code, "s.lua")
            if round_ % 2:
                lua.restore(running)  # a rolled-back reload drops the new version instead
    assert count() < baseline + 64  # KB: 200 versions of 4 KB each would be 800 KB
