"""Matches that outlive their server: the journal, restore at start-up, exactly-once effects.

Real servers (in this process, stopped and started again on the same data dir), real WebSocket
clients and real Lua.  The kill -9 cases run the server as a child process:
`tests/test_durability_crash.py`.
"""

from __future__ import annotations

from typing import Any

from asobi.store import Store, open_backend
from tests.conftest import Client, Logs

COUNTER = """\
match_size = 1
max_players = 4
tick_rate = 20
version = "one"

function init(state)
  state.counter = 0
  state.log = {}
  return state
end
function tick(state)
  state.counter = state.counter + 1
  state.roll = game.random(1, 1000000)
  return state
end
function get_state(state, player_id)
  return { counter = state.counter, tick = game.tick(), roll = state.roll, version = version }
end
"""


async def _state(client: Client, timeout: float = 5.0) -> dict[str, Any]:
    return (await client.states(1, timeout))[0]


async def _resume(server: Any, token: str, resume: str) -> Client:
    client = await server.client()
    await client.send("session.connect", {"token": token, "resume_token": resume})
    connected = await client.expect("session.connected", skip=("match.restored",))
    assert connected["payload"]["resumed"] is True
    return client


async def _player(server: Any) -> tuple[Client, str, str]:
    """A player in a match, with the tokens a reconnect presents."""
    client = await server.client()
    await client.send("auth.guest")
    token = (await client.expect("auth.token"))["payload"]["token"]
    connected = await client.expect("session.connected")
    client.player_id = connected["payload"]["player_id"]
    await client.send("matchmaker.add", {"mode": "default"})
    await client.expect("matchmaker.queued")
    await client.expect("matchmaker.matched")
    return client, token, connected["payload"]["resume_token"]


async def test_a_clean_restart_restores_the_match_without_a_lost_tick(
    start_server, logs: Logs
) -> None:
    first = await start_server({"match.lua": COUNTER})
    client, token, resume = await _player(first)
    before = (await client.states(10))[-1]
    await first.server.stop()
    first.clients.clear()
    stopped_at = first.app.engine.matches
    assert len(stopped_at) == 1
    match_id, match = next(iter(stopped_at.items()))
    last_tick = match.tick_no
    assert last_tick >= before["counter"]

    second = await start_server({"match.lua": COUNTER})
    restored = await logs.wait_for("match_restored")
    assert restored["match_id"] == match_id and restored["tick"] == last_tick
    assert restored["lost_ticks"] == 0

    again = await second.client()
    await again.send("session.connect", {"token": token, "resume_token": resume})
    connected = await again.expect("session.connected")
    assert connected["payload"]["resumed"] is True
    notice = await again.expect("match.restored")
    assert notice["payload"] == {"match_id": match_id, "tick": last_tick, "lost_ticks": 0}
    rejoined = await again.expect("match.rejoined")
    assert rejoined["payload"]["match_id"] == match_id
    state = await _state(again)
    # The counter (script state) and the tick counter (server) both continue from the stop.
    assert state["counter"] == state["tick"] > last_tick
    assert state["counter"] <= last_tick + 5


async def test_the_random_sequence_continues_across_a_restart(start_server, logs: Logs) -> None:
    first = await start_server({"match.lua": COUNTER}, match_seed=7)
    client, token, resume = await _player(first)
    await client.states(3)
    await first.server.stop()
    first.clients.clear()
    match = next(iter(first.app.engine.matches.values()))
    stopped_tick = match.tick_no

    # The same seed without a restart draws this sequence: tick n's roll, for every n.
    reference = await start_server({"match.lua": COUNTER}, match_seed=7, snapshot_ticks=-1)
    ref_client, _, _ = await _player(reference)
    ref_rolls = {s["tick"]: s["roll"] for s in await ref_client.states(stopped_tick + 10, 10)}

    second = await start_server({"match.lua": COUNTER}, match_seed=7)
    await logs.wait_for("match_restored")
    again = await _resume(second, token, resume)
    for state in await again.states(5):
        assert state["roll"] == ref_rolls[state["tick"]], state


async def test_a_state_holding_a_function_is_refused_once_and_the_match_plays_on(
    start_server, logs: Logs
) -> None:
    script = COUNTER.replace(
        "  state.roll = game.random(1, 1000000)\n",
        "  state.roll = game.random(1, 1000000)\n"
        "  if state.counter == 3 then state.fn = function() end end\n",
    )
    server = await start_server({"match.lua": script}, snapshot_ticks=2)
    client, _, _ = await _player(server)
    refused = await logs.wait_for("snapshot_refused")
    assert refused["error"].startswith("state.fn is a function")
    states = await client.states(20)
    counters = [s["counter"] for s in states]
    assert counters == list(range(counters[0], counters[0] + 20))  # nothing skipped
    # Ten more snapshot intervals went by: still one line.
    assert len(logs.events("snapshot_refused")) == 1
    # Not restorable: no snapshot of it is kept (a restart would not bring it back).
    await server.app.journal.flush()
    assert await server.app.journal.all() == []


async def test_a_changed_script_restores_through_migrate(start_server, logs: Logs) -> None:
    first = await start_server({"match.lua": COUNTER})
    client, token, resume = await _player(first)
    await client.states(3)
    await first.server.stop()
    first.clients.clear()
    stopped_tick = next(iter(first.app.engine.matches.values())).tick_no

    changed = COUNTER.replace('version = "one"', 'version = "two"') + (
        "function migrate(state, info)\n"
        "  state.counter = state.counter + 1000\n"
        "  state.from = info.from_version .. '>' .. info.to_version\n"
        "  state.restored = info.restored\n"
        "  return state\n"
        "end\n"
    )
    second = await start_server({"match.lua": changed})
    restored = await logs.wait_for("match_restored")
    assert restored["migrated_from"] == "one" and restored["version"] == "two"
    again = await _resume(second, token, resume)
    state = await _state(again)
    assert state["version"] == "two"
    assert state["counter"] == state["tick"] + 1000 > stopped_tick + 1000


async def test_a_snapshot_that_cannot_be_restored_is_refused_and_dropped(
    start_server, logs: Logs
) -> None:
    first = await start_server({"match.lua": COUNTER})
    client, _, _ = await _player(first)
    await client.states(3)
    await first.server.stop()
    first.clients.clear()

    failing = COUNTER + "function migrate(state, info) error('cannot migrate this') end\n"
    failing = failing.replace('version = "one"', 'version = "two"')
    second = await start_server({"match.lua": failing})
    refused = await logs.wait_for("match_restore_refused")
    assert "cannot migrate this" in refused["error"]
    assert second.app.engine.matches == {}
    await second.app.journal.flush()
    assert await second.app.journal.all() == []


async def test_a_damaged_journal_row_is_logged_and_the_rest_restored(
    start_server, logs: Logs, tmp_path, database_url: str
) -> None:
    first = await start_server({"match.lua": COUNTER})
    one, _, _ = await _player(first)
    two, token, resume = await _player(first)
    await two.states(3)
    await first.server.stop()
    first.clients.clear()
    damaged = first.app.engine.match_of(one.player_id).id
    intact = first.app.engine.match_of(two.player_id).id

    store = Store(open_backend(database_url, tmp_path / "data"))
    await store.start()
    try:
        await store.backend.transact(_damage(damaged))
    finally:
        await store.stop()

    second = await start_server({"match.lua": COUNTER})
    unreadable = await logs.wait_for("journal_row_unreadable")
    assert unreadable["match_id"] == damaged
    restored = await logs.wait_for("match_restored")
    assert restored["match_id"] == intact
    assert set(second.app.engine.matches) == {intact}
    again = await _resume(second, token, resume)
    assert (await _state(again))["counter"] > 3


def _damage(match_id: str) -> Any:
    yield ("UPDATE match_journal SET meta = ? WHERE match_id = ?", ('{"mode": 1}', match_id))


async def test_a_player_joining_a_running_match_is_in_the_journal_at_the_next_tick(
    start_server,
) -> None:
    server = await start_server({"match.lua": COUNTER}, snapshot_ticks=100_000)
    first, _, _ = await _player(server)
    await first.states(2)  # the match's first snapshot (tick 1) holds one seat
    match_id = server.app.engine.match_of(first.player_id).id
    second = await server.player()
    await second.send("match.join", {"match_id": match_id})
    await second.expect("match.joined")
    await second.states(2)
    await server.app.journal.flush()
    latest = await server.app.journal.latest(match_id)
    assert latest is not None
    assert {pid for pid, _ in latest.seats} == {first.player_id, second.player_id}
    resume = server.app.presence.token_of(second.player_id)
    assert dict(latest.seats)[second.player_id] == resume
