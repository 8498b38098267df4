"""A match's state written to bytes for the journal, and read back in another Lua state.

The snapshot walks the state as the reload's copy does: the same shapes survive (shared tables,
cycles, integers vs floats, binary strings, any data as keys) and the same values are refused with
the same path.  The checks run in Lua (`tests.test_state_copy`'s BUILD and CHECK).
"""

from __future__ import annotations

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
