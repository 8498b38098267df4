"""A tick's inputs go into Lua in runs, one crossing for many (`MatchLua.call_inputs`), and each
input still behaves as if it had its own call: it sees the state the input before it left, a
failing or refused input changes nothing and is logged, the inputs after it still run, effects
belong to the input that made them, and inputs of a player who left are dropped.

Driven on the engine directly: no sockets, time passed in."""

from __future__ import annotations

from pathlib import Path

import orjson

from asobi.engine import Engine
from asobi.match import Match
from asobi.scripts import ScriptRegistry
from tests.conftest import Logs
from tests.test_engine_reload import Clock, ListOutbox

SCRIPT = b"""
match_size = 2
tick_rate = 10
function init(state) state.log = {} return state end
function handle_input(state, player, input)
  if input.fail then error("bad input " .. input.i) end
  if input.seven then return 7 end
  if input.send then game.send(player, { i = input.i }) end
  if input.fresh then
    local copy = { log = {} }
    for k, v in ipairs(state.log) do copy.log[k] = v end
    copy.log[#copy.log + 1] = input.i
    return copy
  end
  state.log[#state.log + 1] = input.i
  return state
end
function tick(state) return state end
function get_state(state, player) return { log = state.log, tick = game.tick() } end
"""


def _tick_until_handled(engine: Engine, match: Match, clock: Clock) -> None:
    """Tick until the match's queue is empty.  One tick's budget holds them all, unless a call
    was descheduled on a busy machine (the run then stops early and the rest waits): a few
    ticks at most."""
    for _ in range(10):
        clock.now += match.period
        engine.run_due(clock.now)
        if not match.inputs:
            return


def _one_match(
    tmp_path: Path, source: bytes, players: list[str]
) -> tuple[Engine, Match, ListOutbox, Clock]:
    """An engine on a game of one script, with one match of `players` started."""
    (tmp_path / "match.lua").write_bytes(source)
    registry = ScriptRegistry(tmp_path)
    assert registry.load_all() == []
    script = registry.get("match.lua")
    assert script is not None
    outbox, clock = ListOutbox(), Clock()
    engine = Engine(registry, outbox, clock=clock)
    return engine, engine.start_match("runs", script, players), outbox, clock


def test_a_run_of_inputs_keeps_each_inputs_own_outcome(tmp_path: Path, logs: Logs) -> None:
    engine, match, outbox, clock = _one_match(tmp_path, SCRIPT, ["a", "b"])
    inputs = [
        ("a", {"i": 1}),
        ("b", {"i": 2, "fresh": True}),  # a new table: the inputs after it must see it
        ("a", {"i": 3, "fail": True}),
        ("b", {"i": 4}),
        ("a", {"i": 5, "send": True}),  # a host call: the run ends here, the next one goes on
        ("b", {"i": 6, "seven": True}),  # not a table: refused, the state stays
        ("a", {"i": 7, "n": 2**64 - 1}),  # no Lua integer holds it: refused before Lua
        ("b", {"i": 8}),
        ("a", {"i": 9}),
    ]
    for pid, payload in inputs:
        assert engine.submit_input(pid, payload)
    outbox.frames.clear()
    _tick_until_handled(engine, match, clock)
    assert not match.inputs and not match.queued
    states = [orjson.loads(f) for pid, f in outbox.frames if pid == "a" and b"match.state" in f]
    assert states[-1]["payload"]["log"] == [1, 2, 4, 5, 8, 9]
    messages = [orjson.loads(f) for pid, f in outbox.frames if b"match.message" in f]
    assert [(m["payload"]["payload"]) for m in messages] == [{"i": 5}]
    assert [pid for pid, f in outbox.frames if b"match.message" in f] == ["a"]
    errors = [e["error"] for e in logs.events("callback_failed") if e["match_id"] == match.id]
    assert len(errors) == 3, errors
    assert "bad input 3" in errors[0]
    assert "returned a number" in errors[1]
    assert errors[2].startswith("input refused")

    # A player who left: their queued inputs are dropped, the others' still run.
    assert engine.submit_input("b", {"i": 10})
    assert engine.submit_input("a", {"i": 11})
    engine.remove_player("b")
    outbox.frames.clear()
    _tick_until_handled(engine, match, clock)
    states = [orjson.loads(f) for pid, f in outbox.frames if pid == "a" and b"match.state" in f]
    assert states[-1]["payload"]["log"] == [1, 2, 4, 5, 8, 9, 11]


SEEN_SCRIPT = b"""
match_size = 1
tick_rate = 10
function init(state) state.seen = {} return state end
function handle_input(state, player, input)
  local kinds = {}
  if type(input) == "table" then
    for k, v in pairs(input) do kinds[k] = math.type(v) or type(v) end
  end
  state.seen[#state.seen + 1] = { v = input, kinds = kinds }
  return state
end
function tick(state) return state end
function get_state(state, player) return { seen = state.seen } end
"""


def test_inputs_of_every_shape_reach_handle_input_as_the_same_lua_data(tmp_path: Path) -> None:
    """Small flat dicts are built into tables inside the crossing, anything else is converted
    before it (`convert.input_args`): the script cannot tell the two apart."""
    engine, match, outbox, clock = _one_match(tmp_path, SEEN_SCRIPT, ["a"])
    many = {f"k{i}": i for i in range(20)}  # more keys than go flat
    payloads = [
        {"dir": 3, "name": "bolt", "speed": 1.5, "whole": 2.0, "on": False, "gone": None},
        {"1": "a", "big": 2**63 - 1, "small": -(2**63)},
        {},
        many,
        {"move": {"x": 1, "y": [1, 2]}},
        [4, 5],
        7,
        "jump",
    ]
    for payload in payloads:
        assert engine.submit_input("a", payload)
    outbox.frames.clear()
    _tick_until_handled(engine, match, clock)
    states = [orjson.loads(f) for pid, f in outbox.frames if b"match.state" in f]
    seen = states[-1]["payload"]["seen"]
    assert [s["v"] for s in seen] == [
        {"dir": 3, "name": "bolt", "speed": 1.5, "whole": 2.0, "on": False},  # nil: no key
        {"1": "a", "big": 2**63 - 1, "small": -(2**63)},
        {},
        many,
        {"move": {"x": 1, "y": [1, 2]}},
        [4, 5],
        7,
        "jump",
    ]
    assert seen[0]["kinds"] == {
        "dir": "integer",
        "name": "string",
        "speed": "float",
        "whole": "float",
        "on": "boolean",
    }
    assert seen[3]["kinds"] == {k: "integer" for k in many}
