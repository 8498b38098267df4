"""The game developer's match API (docs/lua-api.md), callback by callback: init, join, leave,
handle_input, finishing and what callbacks return, through real matches on a real server with
real WebSocket clients."""

from __future__ import annotations

from typing import Any

from tests.conftest import Logs
from tests.lua_api_support import PLAIN, frames_until, matched, no_frame_of, script_failures

# -- init / join / game.id / game.tick / game.players ------------------------------------------
IDENTITY = """
match_size = 2
function init(state, ctx)
  state.ctx = ctx
  state.init_id = game.id()
  state.init_tick = game.tick()
  state.init_players = #game.players()
  state.joins = {}
  return state
end
function join(state, player_id)
  state.joins[#state.joins + 1] = { id = player_id, players = game.players(), tick = game.tick() }
  return state
end
function tick(state) state.ticked = game.tick() return state end
function get_state(state, player_id)
  return {
    ctx = state.ctx, init_id = state.init_id, init_tick = state.init_tick,
    init_players = state.init_players, joins = state.joins,
    id = game.id(), tick = game.tick(), ticked = state.ticked, players = game.players(),
    me = player_id,
  }
end
"""


async def test_init_join_and_game_identity(start_server) -> None:
    server = await start_server({"duel.lua": IDENTITY})
    (a, b), info = await matched(server, "duel", 2)
    ids = [a.player_id, b.player_id]
    assert info["players"] == ids
    states = await a.states(3)
    first = states[0]
    assert first["ctx"] == {"match_id": info["match_id"], "mode": "duel", "players": ids}
    assert first["init_id"] == first["id"] == info["match_id"]
    # init runs before anyone has joined, at tick 0; join sees the joiner already listed.
    assert first["init_tick"] == 0 and first["init_players"] == 0
    assert first["joins"] == [
        {"id": ids[0], "players": ids[:1], "tick": 0},
        {"id": ids[1], "players": ids, "tick": 0},
    ]
    ticks = [s["tick"] for s in states]
    assert ticks == list(range(ticks[0], ticks[0] + 3)) and ticks[0] >= 1
    assert all(s["ticked"] == s["tick"] for s in states)
    assert all(s["players"] == ids and s["me"] == a.player_id for s in states)
    (theirs,) = await b.states(1)
    assert theirs["me"] == b.player_id


ONE_SEAT = """
match_size = 2
function init(state) state.seated = {} return state end
function join(state, player_id)
  if #state.seated >= 1 then return nil, "only one seat" end
  state.seated[#state.seated + 1] = player_id
  return state
end
function tick(state) return state end
function get_state(state, player_id) return { seated = state.seated } end
"""


async def test_join_refusing_with_reason(start_server, logs: Logs) -> None:
    server = await start_server({"seat.lua": ONE_SEAT})
    a = await server.player("seat")
    b = await server.player("seat")
    matched_frame = await a.expect("matchmaker.matched")
    assert matched_frame["payload"]["players"] == [a.player_id]
    error = await b.expect("error")
    assert error["payload"]["code"] == "match_failed"
    assert "only one seat" in error["payload"]["message"]
    (state,) = await a.states(1)
    assert state["seated"] == [a.player_id]
    engine = server.app.engine
    match = engine.matches[matched_frame["payload"]["match_id"]]
    assert match.players == [a.player_id]
    assert engine.match_of(b.player_id) is None
    line = await logs.wait_for("join_refused")
    assert line["player_id"] == b.player_id and line["reason"] == "only one seat"
    # The refused player is not in the match: no state frames, inputs refused, free to queue.
    await b.send("match.input", {"x": 1}, cid="in")
    refused_input = await b.expect("error")
    assert refused_input["payload"]["code"] == "not_in_match"
    await b.send("matchmaker.add", {"mode": "seat"})
    await b.expect("matchmaker.queued")


async def test_join_that_errors_refuses_and_all_refused_fails_the_match(
    start_server, logs: Logs
) -> None:
    script = """
match_size = 1
function init(state) return state end
function join(state, player_id) error("no entry today") end
function tick(state) return state end
function get_state(state, player_id) return {} end
"""
    server = await start_server({"match.lua": script})
    client = await server.player("closed")
    error = await client.expect("error")
    assert error["payload"]["code"] == "match_failed"
    assert "join refused every player" in error["payload"]["message"]
    assert server.app.engine.matches == {}
    (failure,) = [line for line in logs.events("callback_failed") if line["callback"] == "join"]
    assert "no entry today" in failure["error"]


# -- leave ----------------------------------------------------------------------------------------
LEAVE = """
match_size = 3
function init(state) state.present = {} return state end
function join(state, player_id) state.present[player_id] = true end
function leave(state, player_id)
  state.present[player_id] = nil
  game.broadcast("gone", { player = player_id, players_during_leave = #game.players() })
end
function tick(state) return state end
function get_state(state, player_id)
  local present = {}
  for pid in pairs(state.present) do present[#present + 1] = pid end
  table.sort(present)
  return { present = present, players = #game.players() }
end
"""


async def test_leave_on_match_leave_and_on_disconnect(start_server, logs: Logs) -> None:
    # A dropped player's seat is held for the reconnect grace period; keep it short here.
    server = await start_server({"trio.lua": LEAVE}, reconnect_grace_s=0.2)
    (a, b, c), info = await matched(server, "trio", 3)
    match_id = info["match_id"]
    await a.send("match.leave")
    own = await frames_until(a, "match.left")
    assert [f["type"] for f in own if f["type"] != "match.state"] == ["match.gone", "match.left"]
    for other in (b, c):
        gone = await other.expect("match.gone")
        assert gone["payload"] == {"player": a.player_id, "players_during_leave": 3}
    (state,) = await b.states(1)
    assert state == {"present": sorted([b.player_id, c.player_id]), "players": 2}
    assert server.app.engine.match_of(a.player_id) is None
    # A dropped connection is a leave too.
    await b.close()
    gone = await c.expect("match.gone")
    assert gone["payload"]["player"] == b.player_id
    (state,) = await c.states(1)
    assert state == {"present": [c.player_id], "players": 1}
    # The last player leaving ends the match and frees it.
    await c.send("match.leave")
    await frames_until(c, "match.left")
    line = await logs.wait_for("match_finished", lambda ln: ln["match_id"] == match_id)
    assert line["result"] == {"reason": "empty"}
    assert match_id not in server.app.engine.matches


# -- handle_input ---------------------------------------------------------------------------------
INPUTS = """
match_size = 2
tick_rate = 5
function init(state) state.seen = {} state.last_tick = 0 return state end
function handle_input(state, player_id, input)
  state.seen[#state.seen + 1] = {
    from = player_id, n = input.n, nested = input.nested,
    during = game.tick(), after = state.last_tick,
  }
  return state
end
function tick(state) state.last_tick = game.tick() return state end
function get_state(state, player_id) return { seen = state.seen, tick = game.tick() } end
"""


async def test_handle_input_in_arrival_order_between_ticks(start_server) -> None:
    server = await start_server({"inputs.lua": INPUTS})
    (a, b), _ = await matched(server, "inputs", 2)
    await a.states(1)
    for n in range(1, 6):
        await a.send("match.input", {"n": n, "nested": {"list": [n, "x"], "ok": True}})
    await b.send("match.input", {"n": 100})
    seen: list[dict[str, Any]] = []
    for state in await a.states(10):
        seen = state["seen"]
        if len(seen) == 6:
            break
    assert len(seen) == 6
    from_a = [s for s in seen if s["from"] == a.player_id]
    assert [s["n"] for s in from_a] == [1, 2, 3, 4, 5]
    assert from_a[0]["nested"] == {"list": [1, "x"], "ok": True}
    assert [s["n"] for s in seen if s["from"] == b.player_id] == [100]
    # Each input ran after the previous tick finished and before the next one.
    assert all(s["during"] == s["after"] + 1 for s in seen)


# -- finishing ------------------------------------------------------------------------------------
FINISH = """
match_size = 2
function init(state) state.n = 0 return state end
function tick(state)
  state.n = state.n + 1
  if state.n == 3 then
    state._finished = true
    state._result = { winner = game.players()[2], ticks = state.n, tags = {} }
  end
  return state
end
function get_state(state, player_id) return { n = state.n } end
"""


async def test_finished_result_reaches_all_players_and_frees_the_match(
    start_server, logs: Logs
) -> None:
    server = await start_server({"match.lua": FINISH})
    (a, b), info = await matched(server, "race", 2)
    match_id = info["match_id"]
    for client in (a, b):
        frames = await frames_until(client, "match.finished")
        states = [f["payload"]["n"] for f in frames if f["type"] == "match.state"]
        assert states[-1] == 3, "the final state comes before the result"
        assert frames[-1]["payload"] == {
            "match_id": match_id,
            "result": {"winner": b.player_id, "ticks": 3, "tags": {}},
        }
    engine = server.app.engine
    assert match_id not in engine.matches
    assert engine.match_of(a.player_id) is None and engine.match_of(b.player_id) is None
    line = await logs.wait_for("match_finished", lambda ln: ln["match_id"] == match_id)
    assert line["ticks"] == 3
    await no_frame_of(a, {"match.state"}, 0.25)
    await a.send("matchmaker.add", {"mode": "race"})
    await a.expect("matchmaker.queued")


# -- return values --------------------------------------------------------------------------------
NO_RETURNS = """
match_size = 1
function init(state) state.init = true end
function join(state, player_id) state.joined = player_id end
function handle_input(state, player_id, input) state.inputs = (state.inputs or 0) + 1 end
function tick(state) state.ticks = (state.ticks or 0) + 1 end
function get_state(state, player_id)
  return { init = state.init, joined = state.joined, inputs = state.inputs, ticks = state.ticks }
end
"""


async def test_callbacks_returning_nothing_keep_the_mutated_table(start_server) -> None:
    server = await start_server({"match.lua": NO_RETURNS})
    (client,), _ = await matched(server, "quiet", 1)
    await client.send("match.input", {})
    await client.send("match.input", {})
    for state in await client.states(10):
        if state.get("inputs") == 2:
            break
    else:
        raise AssertionError("inputs never counted")
    assert state["init"] is True and state["joined"] == client.player_id
    later = await client.states(2)
    assert later[1]["ticks"] == later[0]["ticks"] + 1 > state["ticks"]


NON_TABLE = """
match_size = 1
function init(state) state.n = 0 return state end
function tick(state)
  state.n = state.n + 1
  if state.n == 2 then return 42 end
  if state.n == 3 then return "three" end
  return state
end
function get_state(state, player_id) return { n = state.n } end
"""


async def test_returning_a_non_table_is_a_failure(start_server, logs: Logs) -> None:
    server = await start_server({"match.lua": NON_TABLE})
    (client,), info = await matched(server, "odd", 1)
    states = await client.states(5)
    # The state table was mutated in place before the bad return, so counting goes on.
    ns = [s["n"] for s in states]
    assert ns == list(range(ns[0], ns[0] + 5))
    failures = script_failures(logs, info["match_id"], "tick")
    assert [f["error"] for f in failures[:2]] == [
        "tick returned a number, not a table (or nothing)",
        "tick returned a string, not a table (or nothing)",
    ]


async def test_init_returning_a_non_table_fails_the_match(start_server, logs: Logs) -> None:
    script = PLAIN.format(size=1).replace("state.n = 0 return state", 'return "nope"')
    server = await start_server({"match.lua": script})
    client = await server.player("x")
    error = await client.expect("error")
    assert error["payload"]["code"] == "match_failed"
    assert "init returned a string" in error["payload"]["message"]
    assert server.app.engine.matches == {}
    await logs.wait_for("match_start_failed")
