"""The game developer's match API (docs/lua-api.md), game.* function by function: send,
broadcast, log and random, through real matches on a real server with real WebSocket
clients."""

from __future__ import annotations

from typing import Any

from asobi.config import Settings
from tests.conftest import Logs
from tests.lua_api_support import matched, script_failures

# -- game.send / game.broadcast -------------------------------------------------------------------
EFFECTS = """
match_size = 2
function init(state) return state end
function tick(state)
  local a, b = game.players()[1], game.players()[2]
  local t = game.tick()
  if t == 1 then
    game.send(a, { secret = "for a", t = t })
    game.broadcast("scored", { by = a, points = 3 })
  elseif t == 2 then
    game.send(a, { secret = "doomed" })
    game.broadcast("doomed", { by = a })
    error("kaboom")
  elseif t == 3 then
    game.send(b, { secret = "for b", t = t })
  end
  return state
end
function get_state(state, player_id) return { t = game.tick() } end
"""


async def test_send_and_broadcast_and_failed_callbacks_deliver_nothing(
    start_server, logs: Logs
) -> None:
    server = await start_server({"match.lua": EFFECTS})
    (a, b), info = await matched(server, "fx", 2)
    got: dict[str, list[dict[str, Any]]] = {}
    for client in (a, b):
        frames: list[dict[str, Any]] = []
        while not frames or frames[-1] != {"type": "match.state", "payload": {"t": 4}}:
            frames.append(await client.recv())
        got[client.player_id] = [f for f in frames if f["type"] != "match.state"]
    assert got[a.player_id] == [
        {
            "type": "match.message",
            "payload": {"match_id": info["match_id"], "payload": {"secret": "for a", "t": 1}},
        },
        {"type": "match.scored", "payload": {"by": a.player_id, "points": 3}},
    ]
    assert got[b.player_id] == [
        {"type": "match.scored", "payload": {"by": a.player_id, "points": 3}},
        {
            "type": "match.message",
            "payload": {"match_id": info["match_id"], "payload": {"secret": "for b", "t": 3}},
        },
    ]
    (failure,) = script_failures(logs, info["match_id"], "tick")
    assert failure["error"].startswith("match.lua:") and "kaboom" in failure["error"]
    assert failure["tick"] == 2 and "stack traceback" in failure["traceback"]


BAD_EVENTS = """
match_size = 1
local attempts = {
  function() game.broadcast("state", {}) end,
  function() game.broadcast("finished", {}) end,
  function() game.broadcast("bad name!", {}) end,
  function() game.broadcast(string.rep("x", 65), {}) end,
  function() game.send("nobody", {}) end,
  function() game.send(game.players()[1], { f = print }) end,
}
function init(state) return state end
function tick(state)
  local attempt = attempts[game.tick()]
  if attempt then attempt() end
  return state
end
function get_state(state, player_id) return { t = game.tick() } end
"""


async def test_invalid_and_reserved_event_names_are_refused(start_server, logs: Logs) -> None:
    server = await start_server({"match.lua": BAD_EVENTS})
    (client,), info = await matched(server, "bad", 1)
    seen = await client.states(7)
    assert [s["t"] for s in seen] == list(range(seen[0]["t"], seen[0]["t"] + 7))
    errors = [f["error"] for f in script_failures(logs, info["match_id"], "tick")]
    assert errors == [
        "match.lua:4: game.broadcast: event name 'state' is reserved",
        "match.lua:5: game.broadcast: event name 'finished' is reserved",
        "match.lua:6: game.broadcast: event name must match [A-Za-z0-9_-]{1,64}",
        "match.lua:7: game.broadcast: event name must match [A-Za-z0-9_-]{1,64}",
        "match.lua:8: game.send: player 'nobody' is not in this match",
        "match.lua:9: game.send payload.f is a function, which is not data",
    ]


START_EFFECTS = """
match_size = 2
function init(state) game.broadcast("hello", { from = "init" }) return state end
function join(state, player_id)
  game.send(player_id, { welcome = player_id })
  return state
end
function tick(state) return state end
function get_state(state, player_id) return {} end
"""


async def test_frames_from_init_and_join_come_after_matched(start_server) -> None:
    server = await start_server({"match.lua": START_EFFECTS})
    a = await server.player("greet")
    b = await server.player("greet")
    for client in (a, b):
        kinds = [(await client.recv())["type"] for _ in range(3)]
        assert kinds == ["matchmaker.matched", "match.hello", "match.message"]


# -- game.log ------------------------------------------------------------------------------------
CHATTY = """
match_size = 1
function init(state)
  game.log("info", "from init")
  game.log("info", "bad meta", { f = print })
  game.log("info", "list meta", { 1, 2 })
  return state
end
function tick(state)
  if game.tick() == 1 then
    game.log("warn", "with meta", { hp = 3, tags = { "a" } })
    for i = 1, 100 do game.log("debug", "spam " .. i) end
  elseif game.tick() == 4 then
    print("printed", 1, true)
    state._finished = true
  end
  return state
end
function get_state(state, player_id) return {} end
"""


async def test_game_log_is_structured_and_rate_limited(start_server, logs: Logs) -> None:
    server = await start_server({"match.lua": CHATTY})
    (client,), info = await matched(server, "chat", 1)
    match_id = info["match_id"]
    await client.expect("match.finished")
    lines = [ln for ln in logs.events("script_log") if ln["match_id"] == match_id]
    assert lines[0]["message"] == "from init" and lines[0]["level"] == "info"
    # Meta that cannot be logged does not fail the callback; the line says what was wrong.
    assert lines[1]["message"] == "bad meta" and "meta" not in lines[1]
    assert lines[1]["meta_error"] == "game.log meta.f is a function, which is not data"
    assert lines[2]["meta_error"] == "game.log meta must be a table of named fields"
    assert lines[3]["message"] == "with meta" and lines[3]["level"] == "warning"
    assert lines[3]["meta"] == {"hp": 3, "tags": ["a"]}
    spam = [ln for ln in lines if ln["message"].startswith("spam")]
    # 20 lines per second with a burst of 20: most of the 100 lines in one tick are dropped.
    assert 15 <= len(spam) <= 20
    assert [ln["message"] for ln in spam] == [f"spam {i}" for i in range(1, len(spam) + 1)]
    printed = lines[-1]
    assert printed["message"] == "printed\t1\ttrue"
    assert printed["dropped"] == 100 - len(spam)
    finished = await logs.wait_for("match_finished", lambda ln: ln["match_id"] == match_id)
    assert finished["logs_dropped"] == 100 - len(spam)


# -- random ---------------------------------------------------------------------------------------
DICE = """
match_size = 1
function init(state)
  state.rolls = {}
  for i = 1, 5 do state.rolls[i] = game.random(1, 1000000) end
  state.f = math.random()
  return state
end
function tick(state) return state end
function get_state(state, player_id) return { rolls = state.rolls, f = state.f } end
"""


async def rolls(server: Any, logs: Logs) -> tuple[dict[str, Any], int]:
    (client,), info = await matched(server, "dice", 1)
    (state,) = await client.states(1)
    await client.request("match.leave", reply="match.left")
    line = await logs.wait_for("match_started", lambda ln: ln["match_id"] == info["match_id"])
    return state, line["seed"]


async def test_random_is_seeded_per_match_and_replayable(start_server, logs: Logs) -> None:
    server = await start_server({"match.lua": DICE})
    first, seed_1 = await rolls(server, logs)
    second, seed_2 = await rolls(server, logs)
    assert seed_1 != seed_2 and first != second
    # Replaying: a server forced to a logged seed draws the same numbers.
    replay = await start_server({"match.lua": DICE}, match_seed=seed_1)
    again, seed = await rolls(replay, logs)
    assert seed == seed_1 and again == first
    assert Settings.from_env({"ASOBI_MATCH_SEED": str(seed_1)}).match_seed == seed_1
