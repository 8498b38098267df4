"""The Lua-side JSON encoder of state frames (`asobi/lua/_tojson.c`, `asobi.lua.native`).

It is a fast path beside the host's walk (`to_python` + `orjson.dumps`): whatever it writes must
read back as exactly the walk's data (types included: 1 is not 1.0, [] is not {}), it must
refuse what the walk refuses, and frames must not change when it is turned off.  Broader
property tests of `call_each` against the walk are in `tests/test_state_batch.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asobi.lua import native
from asobi.lua.convert import MAX_NODES, to_python
from asobi.lua.runtime import Limits, MatchLua
from tests.conftest import engine_match
from tests.test_patterns import _QuietHost

pytestmark = pytest.mark.skipif(
    native.library() is None,
    reason="asobi's Lua C functions are not built here (no C compiler at install)",
)


def encoder() -> tuple[MatchLua, Any]:
    lua = MatchLua(_QuietHost(), Limits(), seed=1)
    library = native.library()
    assert library is not None
    return lua, native.load_into(lua.runtime, library).tojson


def test_common_values_are_written_as_orjson_writes_them() -> None:
    lua, write = encoder()
    value = lua.runtime.execute(
        b"return { name = 'ann \\226\\152\\131', hp = 100, x = 1.5, y = -0.25, vx = 0.1,"
        b" big = 9007199254740993, t = true, f = false, none = {}, at = {3, 4.0, -12.375},"
        b" line = 'a\\nb\\t\"c\" \\\\ \\1', nested = { kinds = {'orc', 'elf'} } }"
    )
    assert write(value, MAX_NODES) == orjson.dumps(to_python(value))


def test_a_large_text_then_a_small_one() -> None:
    """The output buffer grows for a large state and is given back; the next is unaffected."""
    lua, write = encoder()
    big = lua.runtime.execute(b"return { blob = string.rep('xy', 2 ^ 20) }")
    assert orjson.loads(write(big, MAX_NODES)) == {"blob": "xy" * 2**20}
    small = lua.runtime.execute(b"return { a = 1 }")
    assert write(small, MAX_NODES) == b'{"a":1}'


@pytest.mark.parametrize(
    "source",
    [
        b"return { f = print }",
        b"return { x = 0/0 }",
        b"return { 1, math.huge }",
        b"return { [1] = 'a', ['1'] = 'b' }",  # two keys, one JSON key: the walk names it
        b"return { name = '\\255' }",
        b"return { ['\\255'] = 1 }",
        b"return { [2.5] = 'f' }",
        b"return { [true] = 1 }",
        b"local t = {} t.self = t return t",
        b"return { [1] = 'a', [3] = 'c' }",
        b"return { 1, 2, x = 3 }",
    ],
)
def test_what_it_does_not_write_is_left_to_the_walk(source: bytes) -> None:
    """nil: the host walks the value, and either converts it (holes, mixed keys) or names what
    is wrong with it."""
    lua, write = encoder()
    assert write(lua.runtime.execute(source), MAX_NODES) is None


def test_node_budget_and_depth_match_the_walk() -> None:
    lua, write = encoder()
    many = lua.runtime.execute(b"local t = {} for i = 1, 99 do t[i] = i end return t")
    assert write(many, 100) == orjson.dumps(list(range(1, 100)))  # 1 table + 99 values
    assert write(many, 99) is None
    deep = lua.runtime.execute(
        b"local d = {} local t = d for _ = 1, 31 do t.x = {} t = t.x end return d"
    )
    assert orjson.loads(write(deep, MAX_NODES)) == to_python(deep)  # 32 levels: allowed
    deeper = lua.runtime.execute(
        b"local d = {} local t = d for _ = 1, 32 do t.x = {} t = t.x end return d"
    )
    assert write(deeper, MAX_NODES) is None


def test_metamethods_are_not_run() -> None:
    """Tables are read raw, like the walk: __index and __pairs never run."""
    lua, write = encoder()
    value = lua.runtime.execute(
        b"return setmetatable({ a = 1 }, { __index = function() error('ran') end,"
        b" __pairs = function() error('ran') end })"
    )
    assert write(value, MAX_NODES) == b'{"a":1}'


_values = st.recursive(
    st.one_of(
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.text(max_size=8),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_values)
def test_what_it_writes_reads_back_as_the_walks_data(value: Any) -> None:
    """Same data and the same JSON types; floats may be spelled differently (1e+300 vs 1e300),
    never valued differently."""
    lua, write = encoder()
    lua_value = lua.to_lua(value)
    written = write(lua_value, MAX_NODES)
    walked = to_python(lua_value)
    if written is None:  # lists arrive in order and dict keys are text: nothing to decline
        pytest.fail(f"declined {value!r}")
    assert orjson.dumps(orjson.loads(written)) == orjson.dumps(walked)


GAME = """\
match_size = 2
tick_rate = 10
function init(state) state.n = 0 return state end
function tick(state) state.n = state.n + 1 return state end
function get_state(state, id)
  return { n = state.n, you = id, x = state.n / 3, tags = { "a", "b" }, empty = {},
           odd = state.n % 2 == 0 and { [1] = "x", [3] = "y" } or { 1, 2 } }
end
"""


class RawOutbox:
    def __init__(self) -> None:
        self.frames: list[tuple[str, bytes]] = []

    def send(self, player_id: str, frame: bytes, *, droppable: bool = False) -> bool:
        self.frames.append((player_id, frame))
        return True


def _frames(game_dir: Path) -> list[tuple[str, bytes]]:
    """Every frame four ticks of GAME send, as bytes."""
    game_dir.mkdir()
    outbox = RawOutbox()
    match = engine_match(game_dir, GAME, outbox, ["p1", "p2"])
    for _ in range(4):
        match.run_tick()
    # Key order follows each Lua state's string hashing, which is seeded per state.
    return [
        (pid, orjson.dumps(orjson.loads(f), option=orjson.OPT_SORT_KEYS))
        for pid, f in outbox.frames
    ]


def test_frames_are_the_same_with_the_encoder_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_encoder = _frames(tmp_path / "on")
    monkeypatch.setattr(native, "library", lambda: None)
    without = _frames(tmp_path / "off")
    assert with_encoder == without
    assert len(with_encoder) == 8  # 4 ticks x 2 players, one state frame each


def test_turned_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASOBI_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None
    finally:
        monkeypatch.delenv("ASOBI_NATIVE")
        native.library.cache_clear()
    assert native.library() is not None
