"""One crossing per round of state frames (`MatchLua.call_each`) gives exactly what one call and
one table walk per player gave: the same data (lists vs objects, int vs float, key order), the
same errors with the same paths, and effects of `get_state` (game.send, game.log) still
belong to the player whose call made them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asobi.lua.convert import ConversionError, to_python
from asobi.lua.runtime import Limits, MatchLua, compile_script
from tests.conftest import each_data, engine_match
from tests.test_patterns import _QuietHost

# Every test runs on the C budgeted calls and on calls.lua's (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("budget_machinery")

# get_state answers with whatever the state holds for the player (set from Python below).
PICK = b"""
function get_state(state, id) return state[id] end
function fail(state, id) error("no state for " .. tostring(id)) end
"""

ODD = rb"""
local odd = {}
odd.fn = { f = print }
odd.nan = { x = { 0/0 } }
odd.inf = { list = { 1, 2, math.huge } }
odd.collide = { inner = { [1] = "a", ["1"] = "b" } }
odd.collide_bool = { [true] = 1, ["true"] = 2 }
odd.binary = { name = "\255\254" }
odd.binary_key = { ["\255"] = 1 }
odd.cycle = { a = {} }
odd.cycle.a.back = odd.cycle
odd.deep = {}
do local t = odd.deep for _ = 1, 40 do t.x = {} t = t.x end end
odd.holes = { [1] = "a", [3] = "c" }
odd.mixed = { 1, 2, x = 3 }
odd.float_keys = { [2.5] = "f", [-7] = "neg", [true] = "t" }
odd.empty = {}
odd.nested_empty = { a = {}, b = { {} } }
odd.string = "just text"
odd.number = 4.5
odd.shuffled = {}
for i = 10, 1, -1 do odd.shuffled[i] = i * 1.5 end
function odd_state() return odd end
"""


def runtime(extra: bytes = b"") -> MatchLua:
    lua = MatchLua(_QuietHost(), Limits(), seed=1)
    lua.load(compile_script(PICK + extra, "batch.lua"), "batch.lua")
    return lua


def one_by_one(lua: MatchLua, state: Any, ids: list[str | None]) -> list[tuple[Any, Any]]:
    """What the frame path did before: one budgeted call and one walk per id."""
    out: list[tuple[Any, Any]] = []
    for pid in ids:
        result = lua.call("get_state", state, pid.encode() if pid else None)
        if not result.ok:
            out.append((None, result.error))
            continue
        try:
            out.append((to_python(result.value, what="get_state result"), None))
        except ConversionError as exc:
            out.append((None, str(exc)))
    return out


def batched(lua: MatchLua, state: Any, ids: list[str | None]) -> list[tuple[Any, Any]]:
    """(data, error) per id, whether a result crossed as data or as JSON text."""
    out: list[tuple[Any, Any]] = []
    while len(out) < len(ids):
        got = lua.call_each("get_state", state, ids[len(out) :], what="get_state result")
        out += [(each_data(result), result[2]) for result in got]
    return out


def same(a: list[tuple[Any, Any]], b: list[tuple[Any, Any]]) -> None:
    """Equal as JSON bytes (so 1 vs 1.0 and [] vs {} count) and with equal errors."""
    assert [orjson.dumps(d) if e is None else e for d, e in a] == [
        orjson.dumps(d) if e is None else e for d, e in b
    ]


def test_odd_values_answer_like_the_walk() -> None:
    lua = runtime(ODD)
    state = lua.call("odd_state").value
    ids = [k.decode() for k in state] + ["missing"]
    expected = one_by_one(lua, state, ids)
    got = batched(lua, state, ids)
    same(got, expected)
    errors = {pid: e for pid, (_, e) in zip(ids, got, strict=True) if e is not None}
    # every kind of refusal is there, with the path of the offending value
    assert set(errors) == {
        "fn",
        "nan",
        "inf",
        "collide",
        "collide_bool",
        "binary",
        "binary_key",
        "cycle",
        "deep",
    }
    assert errors["nan"] == "get_state result.x[1] is NaN"
    assert errors["collide"] == 'get_state result.inner has two keys that both become "1"'
    data = dict(zip(ids, (d for d, _ in got), strict=True))
    assert data["holes"] == {"1": "a", "3": "c"}
    assert data["shuffled"] == [i * 1.5 for i in range(1, 11)]
    assert data["nested_empty"] == {"a": {}, "b": [{}]}
    assert data["missing"] is None and data["string"] == "just text"


def test_a_failing_call_fails_for_its_player_only() -> None:
    lua = runtime(b"function get_state(s, id) if id == 'p2' then error('boom') end return {id} end")
    got = batched(lua, lua.new_table(), ["p1", "p2", "p3"])
    assert got[0] == (["p1"], None) and got[2] == (["p3"], None)
    assert got[1][0] is None and "boom" in got[1][1]


def test_each_call_has_its_own_budget() -> None:
    """A call that runs out of its budget costs its player's frame only: the calls after it in
    the same crossing start with a budget of their own (and do enough work for the budget hook
    to look at the clock)."""
    lua = MatchLua(_QuietHost(), Limits(get_state=0.2), seed=1)
    stuck = (
        b"function get_state(s, id) if id == 'b' then while true do end end "
        b"local x = 0 for i = 1, 20000 do x = x + i end return {id} end"
    )
    lua.load(compile_script(stuck, "stuck.lua"), "stuck.lua")
    got = batched(lua, lua.new_table(), ["a", "b", "c"])
    assert got[0] == (["a"], None) and got[2] == (["c"], None)
    assert "get_state exceeded its 200 ms budget" in got[1][1]


_keys = st.one_of(
    st.text(max_size=4),
    st.integers(-3, 6),
    st.booleans(),
    st.sampled_from([2.5, -0.5]),
    st.sampled_from([b"\xff", b"ok"]),
)
_scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=6),
    st.sampled_from([b"\xfe\xff", b"bytes"]),
)
_data = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(_keys, inner, max_size=5)),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_data, min_size=1, max_size=5))
def test_any_data_answers_like_the_walk(values: list[Any]) -> None:
    lua = runtime()
    ids = [f"p{i}" for i in range(len(values))]
    state = lua.to_lua(dict(zip(ids, values, strict=True)))
    same(batched(lua, state, ids), one_by_one(lua, state, ids))


EFFECTS = """\
match_size = 3
tick_rate = 10
function init(state) return state end
function tick(state) state.n = (state.n or 0) + 1 return state end
function get_state(state, id)
  if id == "p2" then game.send(id, {note = "from get_state"}) end
  if id == "p3" then
    game.send(id, {note = "never delivered"})
    error("p3 fails after sending")
  end
  return {n = state.n, id = id}
end
"""


class ListOutbox:
    def __init__(self) -> None:
        self.frames: list[tuple[str, dict[str, Any]]] = []

    def send(self, player_id: str, frame: bytes, *, droppable: bool = False) -> bool:
        self.frames.append((player_id, orjson.loads(frame)))
        return True


def test_effects_of_get_state_stay_with_their_player(tmp_path: Path) -> None:
    outbox = ListOutbox()
    match = engine_match(tmp_path, EFFECTS, outbox, ["p1", "p2", "p3"])
    match.run_tick()
    messages = [
        (pid, f["payload"]["payload"]["note"])
        for pid, f in outbox.frames
        if f["type"] == "match.message"
    ]
    # p2's get_state succeeded: its message is sent; p3's failed: its message is dropped
    assert messages == [("p2", "from get_state")]
    states = {pid: f["payload"] for pid, f in outbox.frames if f["type"] == "match.state"}
    assert states == {"p1": {"n": 1, "id": "p1"}, "p2": {"n": 1, "id": "p2"}}


TICK_EFFECTS = """\
match_size = 3
tick_rate = 10
function init(state) return state end
function tick(state)
  state.n = (state.n or 0) + 1
  if state.n == 1 then game.broadcast("ticked", {n = state.n}) end
  return state
end
function get_state(state, id)
  if id == "p1" then
    game.send(id, {note = "never delivered"})
    error("p1 fails after sending")
  end
  return {n = state.n, id = id}
end
"""


def _count_crossings(lua: MatchLua) -> list[str]:
    """The names of the crossings into Lua for state frames made from now on, besides the one
    `tick_states` makes: `call_each` (get_state for players the tick's crossing did not answer
    for) and `call_tick` (a tick without get_state)."""
    crossings: list[str] = []
    for name in ("call_each", "call_tick"):
        real = getattr(lua, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            crossings.append(_name)
            return _real(*args, **kw)

        setattr(lua, name, counted)
    return crossings


def test_a_quiet_tick_and_every_state_frame_take_one_crossing(tmp_path: Path) -> None:
    quiet = EFFECTS.replace('game.send(id, {note = "from get_state"})', "")
    outbox = ListOutbox()
    match = engine_match(tmp_path, quiet, outbox, ["p1", "p2", "p3"])
    crossings = _count_crossings(match.lua)
    match.run_tick()
    states = {pid: f["payload"] for pid, f in outbox.frames if f["type"] == "match.state"}
    assert states == {"p1": {"n": 1, "id": "p1"}, "p2": {"n": 1, "id": "p2"}}
    # p3's call sent a message (then failed, so it is dropped): the batch could end only there.
    assert crossings == []
    assert [f["type"] for _, f in outbox.frames] == ["match.state", "match.state"]


def test_tick_and_state_frames_share_a_crossing_and_keep_their_effects_apart(
    tmp_path: Path,
) -> None:
    """A tick that made no host calls is followed by get_state in the same crossing
    (`MatchLua.tick_states`); a tick that did is not (its effects are committed first).  Either
    way the first player's failed get_state loses its message, and the tick's is delivered."""
    outbox = ListOutbox()
    match = engine_match(tmp_path, TICK_EFFECTS, outbox, ["p1", "p2", "p3"])
    crossings = _count_crossings(match.lua)
    for tick in (1, 2):
        outbox.frames.clear()
        crossings.clear()
        match.run_tick()
        kinds = [(pid, f["type"]) for pid, f in outbox.frames]
        states = {pid: f["payload"] for pid, f in outbox.frames if f["type"] == "match.state"}
        assert ("p1", "match.message") not in kinds
        assert states == {"p2": {"n": tick, "id": "p2"}, "p3": {"n": tick, "id": "p3"}}
        ticked = [(pid, "match.ticked") for pid in ("p1", "p2", "p3")]
        if tick == 1:
            # The tick broadcast: get_state could not share its crossing, and the event went
            # out first.  A batch ends after a call that used a host function (p1's), so p2 and
            # p3 took one more.
            assert kinds[:3] == ticked
            assert crossings == ["call_each", "call_each"]
        else:
            # get_state for p1 ran in the tick's crossing; p2 and p3 in one more.
            assert not set(ticked) & set(kinds)
            assert crossings == ["call_each"]


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_infinite_root_value(value: float) -> None:
    lua = runtime()
    state = lua.to_lua({"p": value})
    same(batched(lua, state, ["p"]), one_by_one(lua, state, ["p"]))
