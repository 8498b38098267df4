"""`asobi replay`: a match recorded on a real server (ASOBI_RECORD=1), played by real clients,
re-run by the real command on the data dir.

Each test plays a match, stops the server (the recorder writes out what it holds), then runs
`python -m asobi replay` on the same database, as a developer would on a laptop.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

import orjson

from asobi.engine import Engine
from asobi.lua.runtime import Limits
from asobi.recording import Recorder
from asobi.scripts import ScriptRegistry
from asobi.store import Store, open_backend
from asobi.store.sqlite import SQLiteBackend
from tests.conftest import Client, Logs

GAME = """\
match_size = 2
max_players = 4
tick_rate = 20
version = "one"

function init(state)
  state.score = {}
  state.total = 0
  state.first = game.random(1, 1000000)  -- the generator moves before the first snapshot
  return state
end
function join(state, player_id)
  state.score[player_id] = 0
  return state
end
function leave(state, player_id)
  state.score[player_id] = nil
  return state
end
function handle_input(state, player_id, input)
  if input.boom and state.total >= 3 then error("boom at total " .. state.total) end
  local add = input.add or 0
  state.score[player_id] = state.score[player_id] + add
  state.total = state.total + add
  return state
end
function tick(state)
  state.roll = game.random(1, 1000000)
  return state
end
function get_state(state, player_id)
  return { score = state.score, total = state.total, roll = state.roll, tick = game.tick(),
           version = version }
end
"""

# The same game with a module: the replay must load the module's recorded version too.
UTIL = "local M = {}\nfunction M.bonus(total) return total * 2 + 1 end\nreturn M\n"
WITH_MODULE = GAME.replace(
    "function tick(state)\n",
    "local util = require('util')\nfunction tick(state)\n  state.bonus = util.bonus(state.total)\n",
)

# Keeps 1 MiB more every tick from its third (outside the state table, which stays small to
# print): a tight memory cap is reached a few ticks in, at the same tick wherever the match runs
# under that cap.
HUNGRY = """\
match_size = 2
max_players = 4
tick_rate = 20
local hoard = {}

function init(state)
  state.n = 0
  return state
end
function join(state, player_id) return state end
function tick(state)
  state.n = state.n + 1
  if state.n >= 3 then
    hoard[#hoard + 1] = string.rep(string.char(65 + state.n % 26), 1024 * 1024)
  end
  return state
end
function get_state(state, player_id)
  return { n = state.n, held = #hoard }
end
"""
TIGHT = 6 * 1024 * 1024

Job = Generator[tuple[str, tuple[Any, ...]], list[tuple[Any, ...]], Any]


class _Discard:
    def send(self, player_id: str, frame: bytes, *, droppable: bool = False) -> bool:
        return True


async def _pair(server: Any) -> tuple[Client, Client, str]:
    """Two players matched together; the match id."""
    a = await server.player("default")
    b = await server.player("default")
    matched = await a.expect("matchmaker.matched")
    await b.expect("matchmaker.matched")
    return a, b, matched["payload"]["match_id"]


async def _state_where(client: Client, wanted: Any, timeout: float = 5.0) -> dict[str, Any]:
    """The first state frame `wanted(state)` holds for (earlier ones are skipped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        state = (await client.states(1, max(deadline - loop.time(), 0.01)))[0]
        if wanted(state):
            return state


async def _replay(
    tmp_path: Path, database_url: str, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str]:
    env = {**os.environ, "ASOBI_DATABASE_URL": database_url, **(env or {})}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "asobi",
        "replay",
        *args,
        "--data-dir",
        str(tmp_path / "data"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert "Traceback" not in err.decode(), err.decode()
    return process.returncode or 0, out.decode()


async def _db(tmp_path: Path, database_url: str, job: Job) -> Any:
    backend = open_backend(database_url, tmp_path / "data")
    await backend.open()
    try:
        return await backend.transact(job)
    finally:
        await backend.close()


def _ticks(match_id: str) -> Job:
    rows = yield (
        "SELECT tick, body FROM match_record_ticks WHERE match_id = ? ORDER BY tick",
        (match_id,),
    )
    return [(tick, orjson.loads(body)) for tick, body in rows]


def _without_limits(match_id: str) -> Job:
    """The record as a server from before limits were recorded wrote it."""
    rows = yield ("SELECT meta FROM match_records WHERE match_id = ?", (match_id,))
    meta = orjson.loads(rows[0][0])
    del meta["limits"]
    yield (
        "UPDATE match_records SET meta = ? WHERE match_id = ?",
        (orjson.dumps(meta).decode(), match_id),
    )


def _set_body(match_id: str, tick: int, body: dict[str, Any]) -> Job:
    yield (
        "UPDATE match_record_ticks SET body = ? WHERE match_id = ? AND tick = ?",
        (orjson.dumps(body), match_id, tick),
    )


async def test_a_recorded_match_replays_identically_after_the_game_dir_changed(
    start_server, logs: Logs, tmp_path: Path, database_url: str
) -> None:
    server = await start_server({"match.lua": WITH_MODULE, "util.lua": UTIL}, record=True)
    a, b, match_id = await _pair(server)
    for i in range(1, 6):
        await a.send("match.input", {"add": i})
        await b.send("match.input", {"add": 10 * i, "note": "ünïcode", "list": [1, 2.5, None]})
        await a.states(2)
    # A third player joins the running match, plays, and leaves again.
    c = await server.player()
    await c.send("match.join", {"match_id": match_id})
    await c.expect("match.joined")
    await c.send("match.input", {"add": 100})
    await c.states(2)
    await c.send("match.leave")
    await c.expect("match.left")
    # The script changes while the match runs: it switches to "two".
    server.write("match.lua", WITH_MODULE.replace('version = "one"', 'version = "two"'))
    await logs.wait_for("reloaded")
    for _ in range(3):
        await a.send("match.input", {"add": 1000})
        await a.states(2)
    await _state_where(a, lambda s: s["version"] == "two" and s["total"] >= 3000)
    await server.server.stop()
    server.clients.clear()
    ran = server.app.engine.matches[match_id].tick_no

    # The game dir changes again after the match: the replay runs the recorded code anyway.
    (server.game_dir / "match.lua").write_text("this is not lua")
    (server.game_dir / "util.lua").write_text("return { bonus = function() return 0 end }")

    rows = await _db(tmp_path, database_url, _ticks(match_id))
    kinds = {event[0] for _, body in rows for event in body.get("ev", [])}
    inputs = [i for _, body in rows for i in body.get("in", [])]
    reloads = [r for _, body in rows for r in body.get("rl", [])]
    assert {"join", "leave"} <= kinds and len(inputs) == 5 + 5 + 1 + 3
    assert [r[2] for r in reloads] == ["reloaded"]
    assert [t for t, _ in rows] == list(range(1, len(rows) + 1))
    assert len(rows) == ran

    code, out = await _replay(tmp_path, database_url, match_id)
    assert code == 0, out
    assert f"replayed {len(rows)} ticks, identical" in out, out
    # --until stops early; a unique start of the id is enough.
    code, out = await _replay(tmp_path, database_url, match_id[:10], "--until", "5")
    assert code == 0 and "replayed 5 ticks, identical" in out, out

    # The record says the reload rolled back: the replay, where it went through, says so.
    switched, body = next((t, body) for t, body in rows if body.get("rl"))
    body["rl"][0][2] = "reload_rolled_back"
    await _db(tmp_path, database_url, _set_body(match_id, switched, body))
    code, out = await _replay(tmp_path, database_url, match_id)
    assert code == 1, out
    assert out.splitlines()[0] == (
        f"divergence at tick {switched}: the reload ended reload_rolled_back in the record, "
        "reloaded here"
    )


async def test_a_failing_callback_is_pinpointed_with_the_state_before_it(
    start_server, logs: Logs, tmp_path: Path, database_url: str
) -> None:
    server = await start_server({"match.lua": GAME}, record=True)
    a, b, match_id = await _pair(server)
    await a.send("match.input", {"add": 2})
    await b.send("match.input", {"add": 3})
    await a.states(3)
    await a.send("match.input", {"boom": True})
    failed = await logs.wait_for("callback_failed")
    assert failed["callback"] == "handle_input" and "boom at total 5" in failed["error"]
    await a.states(3)
    await server.server.stop()
    server.clients.clear()

    code, out = await _replay(tmp_path, database_url, match_id)
    assert code == 1, out
    first = out.splitlines()[0]
    assert first.startswith(f"tick {failed['tick']}: handle_input failed:"), out
    assert "boom at total 5" in first
    before = re.search(rf"^state before tick {failed['tick']}: (.*)$", out, re.M)
    assert before is not None, out
    state = orjson.loads(before.group(1))
    assert state["total"] == 5
    assert sorted(state["score"].values()) == [2, 3]
    assert "the failure is reproduced" in out
    # Up to the tick before, the match replays cleanly.
    code, out = await _replay(tmp_path, database_url, match_id, "--until", str(failed["tick"] - 1))
    assert code == 0 and f"replayed {failed['tick'] - 1} ticks, identical" in out, out


async def test_a_match_that_hit_its_memory_cap_fails_at_the_same_tick_under_other_settings(
    start_server, logs: Logs, tmp_path: Path, database_url: str
) -> None:
    """Production ran with a tight memory cap; the laptop's settings allow 64 MiB.  The replay
    runs under the recorded cap and fails at the tick production did; `--local-limits` and a
    record made before limits were kept run under the laptop's, and say so."""
    server = await start_server(
        {"match.lua": HUNGRY}, record=True, snapshot_ticks=-1, limits=Limits(max_memory=TIGHT)
    )
    a, _, match_id = await _pair(server)
    failed = await logs.wait_for("callback_failed")
    assert failed["callback"] == "tick" and "not enough memory" in failed["error"]
    await a.states(3)
    await server.server.stop()
    server.clients.clear()
    laptop = {"ASOBI_LUA_MAX_MEMORY": str(64 * 1024 * 1024)}

    code, out = await _replay(tmp_path, database_url, match_id, env=laptop)
    assert code == 1, out
    lines = out.splitlines()
    assert lines[0].startswith(f"tick {failed['tick']}: tick failed: "), out
    assert "not enough memory" in lines[0]
    assert "the failure is reproduced" in out
    code, out = await _replay(
        tmp_path, database_url, match_id, "--until", str(failed["tick"] - 1), env=laptop
    )
    assert (code, out.strip()) == (0, f"replayed {failed['tick'] - 1} ticks, identical"), out

    # Under the laptop's own cap the tick runs through: the record says otherwise.
    code, out = await _replay(tmp_path, database_url, match_id, "--local-limits", env=laptop)
    assert code == 1, out
    lines = out.splitlines()
    assert lines[0] == ("replaying under this machine's Lua limits (ASOBI_LUA_*), not the recorded")
    assert lines[1].startswith(f"divergence at tick {failed['tick']}, player "), out

    await _db(tmp_path, database_url, _without_limits(match_id))
    code, out = await _replay(tmp_path, database_url, match_id, env=laptop)
    assert code == 1, out
    lines = out.splitlines()
    assert lines[0] == (
        "the record keeps no Lua limits (made before they were recorded): replaying under this "
        "machine's (ASOBI_LUA_*)"
    )
    assert lines[1].startswith(f"divergence at tick {failed['tick']}, player "), out


async def test_a_tampered_record_is_reported_at_the_tick_it_differs(
    start_server, logs: Logs, tmp_path: Path, database_url: str
) -> None:
    server = await start_server({"match.lua": GAME}, record=True)
    a, b, match_id = await _pair(server)
    for i in range(1, 4):
        await a.send("match.input", {"add": i})
        await a.states(3)
    # Both leave: the match ends between ticks, and the record says so.
    await a.send("match.leave")
    await a.expect("match.left")
    await b.send("match.leave")
    await b.expect("match.left", skip=("match.finished",))
    await logs.wait_for("match_finished")
    await server.server.stop()
    server.clients.clear()
    rows = await _db(tmp_path, database_url, _ticks(match_id))
    last_tick, last_row = rows[-1]
    assert last_row["ran"] is False and last_row["ev"][-1] == ["leave", b.player_id]
    code, out = await _replay(tmp_path, database_url, match_id)
    assert code == 0, out
    assert out.strip() == (
        f"replayed {last_tick - 1} ticks, identical; the last player left after tick "
        f"{last_tick - 1}"
    )

    # One recorded input changed: the frames of that very tick differ.
    tick, body = next((t, body) for t, body in rows[3:] if body.get("in"))
    body["in"][0][1]["add"] = 50
    await _db(tmp_path, database_url, _set_body(match_id, tick, body))
    code, out = await _replay(tmp_path, database_url, match_id)
    assert code == 1, out
    assert out.startswith(f"divergence at tick {tick}, player {a.player_id}:"), out
    assert f"inputs at tick {tick}: " in out and '"add":50' in out

    # One recorded digest changed at an earlier tick: reported there, expected vs got.
    early, early_body = rows[1]
    good = early_body["s"][b.player_id]
    early_body["s"][b.player_id] = "0123456789abcdef"
    await _db(tmp_path, database_url, _set_body(match_id, early, early_body))
    code, out = await _replay(tmp_path, database_url, match_id)
    assert code == 1, out
    assert out.splitlines()[0] == (
        f"divergence at tick {early}, player {b.player_id}: expected digest 0123456789abcdef, "
        f"got {good}"
    )
    assert f"get_state for {b.player_id} (replayed): " in out


async def _recording_engine(
    tmp_path: Path, source: str, max_pending_bytes: int = 1 << 20
) -> tuple[Engine, Recorder, Store]:
    """An engine driven directly (no sockets), recording into a real SQLite store whose writer
    task is not started yet: rows stay queued until the test starts it."""
    (tmp_path / "game").mkdir()
    (tmp_path / "game" / "match.lua").write_text(source)
    registry = ScriptRegistry(tmp_path / "game")
    assert registry.load_all() == []
    store = Store(SQLiteBackend(tmp_path / "data" / "asobi.db"))
    await store.start()
    engine = Engine(registry, _Discard())
    recorder = Recorder(store.backend, registry, max_pending_bytes=max_pending_bytes)
    engine.recorder = recorder
    engine.listeners.append(recorder)
    return engine, recorder, store


async def test_recording_memory_is_bounded_and_the_match_plays_on(
    tmp_path: Path, logs: Logs
) -> None:
    """A database that does not keep up: past `max_pending_bytes` of rows waiting, a match stops
    recording (logged once) and keeps ticking; the rows already queued are still written."""
    engine, recorder, store = await _recording_engine(tmp_path, GAME, max_pending_bytes=1000)
    script = engine.registry.get("match.lua")
    assert script is not None
    match = engine.start_match("default", script, ["p1", "p2"])
    assert match.recorder is not None
    for _ in range(50):  # the writer is not running: nothing leaves the queue
        match.run_tick()
        match.recorder.ticked(match.tick_no)
    assert match.tick_no == 50 and match.recorder.stopped
    overflows = logs.events("record_overflow")
    assert len(overflows) == 1 and 5 < overflows[0]["tick"] < 50
    stopped_at = overflows[0]["tick"]
    assert 1000 - 100 < recorder.pending_bytes <= 1000
    await recorder.start()
    await recorder.stop()
    rows = await store.backend.transact(_ticks(match.id))
    assert [t for t, _ in rows] == list(range(1, stopped_at))
    assert recorder.bytes_written == sum(len(orjson.dumps(body)) for _, body in rows)
    await store.stop()


async def test_a_match_whose_state_cannot_be_copied_runs_unrecorded(
    tmp_path: Path, logs: Logs
) -> None:
    source = GAME.replace("  state.total = 0\n", "  state.total = 0\n  state.fn = function() end\n")
    engine, recorder, store = await _recording_engine(tmp_path, source)
    script = engine.registry.get("match.lua")
    assert script is not None
    match = engine.start_match("default", script, ["p1", "p2"])
    assert match.recorder is None
    refused = logs.events("record_refused")
    assert [e["match_id"] for e in refused] == [match.id]
    assert refused[0]["error"].startswith("state.fn is a function")
    for _ in range(3):
        match.run_tick()
    assert match.tick_no == 3 and not match.finished
    assert recorder.pending_bytes == 0
    await store.stop()
