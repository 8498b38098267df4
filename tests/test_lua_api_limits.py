"""The game developer's match API (docs/lua-api.md): the script's globals (tick rate, player
cap, modes, shared state) and what failing callbacks and overrun budgets do, through real
matches on a real server with real WebSocket clients."""

from __future__ import annotations

import pytest

from asobi.config import Settings
from asobi.lua.runtime import Limits
from tests.conftest import Logs, run_queue_wait
from tests.lua_api_support import PLAIN, frames_until, matched, no_frame_of, script_failures

# Every test runs on the C budgeted calls and on calls.lua's (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("budget_machinery")


# -- globals --------------------------------------------------------------------------------------
async def test_tick_rate_is_honoured(start_server) -> None:
    for rate in (25, 8):
        server = await start_server({"match.lua": PLAIN.format(size=1) + f"tick_rate = {rate}\n"})
        (client,), info = await matched(server, "rate", 1)
        await client.states(1)
        engine = server.app.engine
        match = engine.matches[info["match_id"]]
        # Counted on the server: ticks run, plus ticks the engine logged as skipped, against the
        # engine's own clock over about 1.2 s.  Frames timed by a client on a busy machine
        # measure the machine; the count measures the schedule.
        started, ticks, waited = engine.clock(), match.tick_no, run_queue_wait()
        skipped_before = match.ticks_skipped
        for _ in range(int(rate * 1.2) + 1):
            await client.states(1)
        elapsed = engine.clock() - started
        ran = match.tick_no - ticks
        skipped = match.ticks_skipped - skipped_before
        # Ticks due while the process waited for a CPU may not have run yet at the window's end.
        stolen = max(run_queue_wait() - waited, 0.0)
        expected = elapsed * rate
        assert abs(ran + skipped - expected) <= 1.5 + stolen * rate, (
            rate,
            ran,
            skipped,
            expected,
            stolen,
        )
        await client.close()


async def test_max_players_caps_joins_after_matchmaking(start_server) -> None:
    script = PLAIN.format(size=1) + "max_players = 2\n"
    server = await start_server({"match.lua": script, "solo.lua": PLAIN.format(size=1)})
    _, info = await matched(server, "lobby", 1)
    b = await server.player()
    c = await server.player()
    engine = server.app.engine
    assert engine.matches[info["match_id"]].script.meta.max_players == 2
    await b.send("match.join", {"match_id": info["match_id"]})
    joined = await b.expect("match.joined")
    assert joined["payload"]["match_id"] == info["match_id"]
    await b.states(1)  # b now receives the match's frames
    await c.send("match.join", {"match_id": info["match_id"]})
    assert (await c.expect("error"))["payload"]["code"] == "match_full"
    assert engine.match_of(c.player_id) is None
    # Without max_players a match holds exactly match_size players.
    _, solo = await matched(server, "solo", 1)
    await c.send("match.join", {"match_id": solo["match_id"]})
    assert (await c.expect("error"))["payload"]["code"] == "match_full"


async def test_config_lua_maps_modes_to_files(start_server) -> None:
    def named(name: str) -> str:
        return PLAIN.format(size=1).replace("n = state.n }", f'n = state.n, script = "{name}" }}')

    files = {
        "config.lua": 'return { ranked = "modes/duel.lua", casual = "match.lua" }\n',
        "modes/duel.lua": named("duel"),
        "match.lua": named("default"),
        "ffa.lua": named("ffa"),
    }
    server = await start_server(files)
    for mode, expected in [
        ("ranked", "duel"),
        ("casual", "default"),
        ("ffa", "ffa"),
        ("anything", "default"),
    ]:
        (client,), _ = await matched(server, mode, 1)
        (state,) = await client.states(1)
        assert state["script"] == expected, mode
        await client.request("match.leave", reply="match.left")


async def test_shared_state_calls_get_state_once_per_tick(start_server) -> None:
    script = """
match_size = 2
shared_state = true
function init(state) state.calls = 0 return state end
function tick(state) return state end
function get_state(state, player_id)
  state.calls = state.calls + 1
  return { calls = state.calls, tick = game.tick(), anonymous = player_id == nil }
end
"""
    server = await start_server({"match.lua": script})
    (a, b), _ = await matched(server, "shared", 2)
    a_states = await a.states(3)
    b_states = await b.states(3)
    assert a_states[0]["anonymous"] is True
    assert all(s["calls"] == s["tick"] for s in a_states)  # one call per tick, not per player
    by_tick = {s["tick"]: s for s in b_states}
    assert all(by_tick[s["tick"]] == s for s in a_states if s["tick"] in by_tick)


# -- failures and budgets -------------------------------------------------------------------------
async def test_budget_overrun_keeps_state_and_repeated_failures_stop_the_match(
    start_server, logs: Logs
) -> None:
    script = """
match_size = 1
function init(state) state.n = 0 return state end
function tick(state)
  if game.tick() == 2 then
    local spin = {}
    while true do spin[1] = 1 end
  end
  if game.tick() >= 4 then error("broken for good") end
  return { n = state.n + 1 }
end
function get_state(state, player_id) return { n = state.n, t = game.tick() } end
"""
    server = await start_server(
        {"match.lua": script}, limits=Limits(tick=0.02), max_consecutive_failures=3
    )
    (client,), info = await matched(server, "spin", 1)
    frames = await frames_until(client, "match.finished")
    states = [f["payload"] for f in frames if f["type"] == "match.state"]
    # Failed ticks (2, then 4, 5, 6) keep the previous state; the match still streams.
    assert [(s["t"], s["n"]) for s in states] == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]
    error = frames[-1]["payload"]["result"]["error"]
    assert error.startswith("tick failed 3 times in a row: match.lua:")
    assert "broken for good" in error
    failures = script_failures(logs, info["match_id"], "tick")
    assert failures[0]["error"].startswith("tick exceeded its 20 ms budget at match.lua:")
    assert failures[0]["error"].endswith(" (raise with ASOBI_LUA_TICK)")
    assert info["match_id"] not in server.app.engine.matches
    assert Settings.from_env({"ASOBI_LUA_TICK": "0.05"}).limits.tick == 0.05


async def test_other_matches_are_untouched_by_a_failing_one(start_server) -> None:
    broken = PLAIN.format(size=1).replace("state.n = state.n + 1", 'error("always")')
    server = await start_server({"match.lua": PLAIN.format(size=1), "broken.lua": broken})
    (good,), _ = await matched(server, "good", 1)
    (bad,), _ = await matched(server, "broken", 1)
    await bad.states(2)
    states = await good.states(5)
    ns = [s["n"] for s in states]
    assert ns == list(range(ns[0], ns[0] + 5))


GARBAGE = """
match_size = 2
function init(state) state.inputs = 0 return state end
function handle_input(state, player_id, input)
  game.send(player_id, { note = "never sent" })
  state.inputs = state.inputs + 1
  if input.explode then error("bad input") end
end
function tick(state) return state end
function get_state(state, player_id)
  if player_id == game.players()[1] then return { name = "\\255\\254" } end
  return { t = game.tick(), inputs = state.inputs }
end
"""


async def test_players_get_no_garbage_from_failing_callbacks(start_server, logs: Logs) -> None:
    server = await start_server({"match.lua": GARBAGE})
    (a, b), info = await matched(server, "junk", 2)
    await b.send("match.input", {"explode": True})
    for state in await b.states(10):
        if state["inputs"] == 1:
            break
    else:
        raise AssertionError("the input was never handled")
    # The input's in-place change stayed; its message was dropped; a's view never converts.
    await no_frame_of(b, {"match.message"}, 0.2)
    await no_frame_of(a, {"match.state", "match.message"}, 0.2)
    (failure,) = script_failures(logs, info["match_id"], "handle_input")
    assert "bad input" in failure["error"]
    bad_state = script_failures(logs, info["match_id"], "get_state")[0]
    assert bad_state["error"] == "get_state result.name is not valid UTF-8 text"


async def test_failing_get_state_logs_are_capped_per_tick(start_server, logs: Logs) -> None:
    script = """
match_size = 6
function init(state) state.n = 0 return state end
function tick(state) state.n = state.n + 1 return state end
function get_state(state, player_id) error("broken view") end
"""
    server = await start_server({"match.lua": script})
    players = [await server.player("six") for _ in range(6)]
    await players[0].expect("matchmaker.matched")
    await logs.wait_for("callback_failed", lambda ln: "suppressed" in ln, timeout=5)
    lines = [ln for ln in logs.events("callback_failed") if ln["callback"] == "get_state"]
    per_tick: dict[int, int] = {}
    for line in lines:
        per_tick[line["tick"]] = per_tick.get(line["tick"], 0) + 1
    # Six players fail every tick; three lines a tick are logged, the rest counted.
    assert max(per_tick.values()) == 3
    assert any(ln.get("suppressed") == 3 for ln in lines)
