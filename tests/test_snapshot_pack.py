"""A match's state written to bytes for the journal, and read back in another Lua state.

The snapshot walks the state as the reload's copy does: the same shapes survive (shared tables,
cycles, integers vs floats, binary strings, any data as keys) and the same values are refused with
the same path.  The checks run in Lua (`tests.test_state_copy`'s BUILD and CHECK).
"""

from __future__ import annotations

import struct

import pytest

from asobi.lua.runtime import Limits, MatchLua, compile_script
from tests import test_state_copy
from tests.test_patterns import _QuietHost
from tests.test_state_copy import runtime

# The cases the copy refuses (its own test's parameters): the snapshot must refuse each alike.
REFUSED = test_state_copy.test_non_data_is_refused_with_its_path.pytestmark[0].args[1]


def test_shape_and_values_survive_a_snapshot_into_another_state() -> None:
    lua = runtime()
    built = lua.call("build")
    packed = lua.pack_state(built.value)
    assert packed.ok, packed.error
    other = runtime()  # another process's Lua state, as after a restart
    unpacked = other.unpack_state(packed.value)
    assert unpacked.ok, unpacked.error
    assert other.call("check", unpacked.value).value == b""
    # Written again, the rebuilt state is the same data (iteration order may differ).
    again = other.pack_state(unpacked.value)
    assert len(again.value) == len(packed.value)


def test_an_empty_state() -> None:
    lua = runtime()
    packed = lua.pack_state(lua.new_table())
    unpacked = lua.unpack_state(packed.value)
    assert unpacked.ok and list(unpacked.value.items()) == []


@pytest.mark.parametrize(("setup", "message"), REFUSED)
def test_what_the_copy_refuses_the_snapshot_refuses_with_the_same_path(
    setup: str, message: str
) -> None:
    lua = MatchLua(_QuietHost(), Limits(), seed=3)
    source = f"function make() local s = {{ ok = 1 }} {setup} return s end".encode()
    lua.load(compile_script(source, "bad.lua"), "bad.lua")
    state = lua.call("make").value
    result = lua.pack_state(state)
    assert not result.ok and message in result.error
    assert message in lua.copy_state(state).error


@pytest.mark.parametrize(
    "data",
    [b"", b"ASN", b"XXXX\x00\x00\x00\x00", b"ASN1\x01\x00\x00\x00\x09", b"ASN1\x00\x00\x00\x00!"],
)
def test_damaged_bytes_are_an_error_not_a_crash(data: bytes) -> None:
    result = runtime().unpack_state(data)
    assert not result.ok and result.error


# Tables of every size around the points where the writer starts a new `string.pack` call (a run
# of small tables, a table longer than one call), each followed by more tables.
SIZES = b"""
function sized(small, long, empty)
  local s = { list = {}, map = {} }
  for i = 1, small do s["t" .. i] = { x = i, y = i + 0.5, name = "n" .. i, on = i % 2 == 0 } end
  for i = 1, long do s.list[i] = i * 1.5 end
  for i = 1, long do s.map["k" .. i] = { i } end
  for i = 1, empty do s["e" .. i] = {} end
  s.last = { s.list, s.map }
  return s
end

-- a and b hold the same data (tables compared by content, a's shape is a tree).
function same(a, b)
  local function eq(x, y)
    if type(x) ~= "table" or type(y) ~= "table" then
      return x == y and math.type(x) == math.type(y)
    end
    for k, v in pairs(x) do if not eq(v, y[k]) then return false end end
    for k in pairs(y) do if x[k] == nil then return false end end
    return true
  end
  return eq(a, b)
end
"""


@pytest.mark.parametrize(
    ("small", "long", "empty"),
    [
        (0, 0, 0),
        (1, 1, 1),
        (31, 127, 2),
        (32, 128, 0),
        (60, 255, 3),
        (64, 256, 1),
        (70, 257, 0),
        (300, 513, 300),
        (5, 3000, 0),
    ],
)
def test_states_of_any_size_come_back_whole(small: int, long: int, empty: int) -> None:
    lua = MatchLua(_QuietHost(), Limits(), seed=3)
    lua.load(compile_script(SIZES, "sizes.lua"), "sizes.lua")
    state = lua.call_function("sized", lua.function("sized"), small, long, empty, budget=5).value
    packed = lua.pack_state(state)
    assert packed.ok, packed.error
    unpacked = lua.unpack_state(packed.value)
    assert unpacked.ok, unpacked.error
    # The comparison walks thousands of values in Lua: a budget of its own, not the default
    # 50 ms, which a busy machine (the two CI suites side by side) can overrun.
    same = lua.function("same")
    for a, b in ((state, unpacked.value), (unpacked.value, state)):
        assert lua.call_function("same", same, a, b, budget=5).value is True


def test_the_layout_is_the_one_every_version_reads() -> None:
    """Snapshots cross versions of the server (a rolling upgrade drains matches to nodes of the
    next version): the bytes of a known state are pinned."""
    lua = MatchLua(_QuietHost(), Limits(), seed=3)
    source = b"function make() return { hp = 7, pos = { 1.5 } } end"
    lua.load(compile_script(source, "fixed.lua"), "fixed.lua")
    packed = lua.pack_state(lua.call("make").value)
    assert packed.ok, packed.error
    root = {
        b"hp": b"\x01" + struct.pack("<I", 2) + b"hp" + b"\x02" + struct.pack("<q", 7),
        b"pos": b"\x01" + struct.pack("<I", 3) + b"pos" + b"\x06" + struct.pack("<I", 2),
    }
    pos = struct.pack("<I", 1) + b"\x02" + struct.pack("<q", 1) + b"\x03" + struct.pack("<d", 1.5)
    # The two keys of the root in either order (Lua's iteration order is its own).
    expected = {
        b"ASN1" + struct.pack("<I", 2) + root[b"hp"] + root[b"pos"] + pos,
        b"ASN1" + struct.pack("<I", 2) + root[b"pos"] + root[b"hp"] + pos,
    }
    assert packed.value in expected


def test_the_snapshot_is_budgeted() -> None:
    """The walk runs without the count hook of script calls: it watches the clock itself."""
    lua = MatchLua(_QuietHost(), Limits(copy=0.001), seed=3)
    source = b"function make() local s = {} for i = 1, 50000 do s[i] = { i } end return s end"
    lua.load(compile_script(source, "big.lua"), "big.lua")
    state = lua.call_function("make", lua.function("make"), budget=5.0).value
    result = lua.pack_state(state)
    assert not result.ok
    assert result.error == "snapshot exceeded its 1 ms budget (raise with ASOBI_LUA_COPY)"
    # With time enough, the same state is written whole.
    assert lua.api[b"snapshot"](b"over budget", 1e300, state)[0] is True


def test_the_random_state_comes_with_the_snapshot() -> None:
    lua = MatchLua(_QuietHost(), Limits(), seed=11)
    packed = lua.pack_state(lua.new_table())
    assert packed.ok and packed.values[1] == lua.random_state()
