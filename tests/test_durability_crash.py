"""A server killed with -9 and started again on the same data dir: its matches come back.

Each server is `python -m asobi serve` in its own process (SQLite in the data dir, or PostgreSQL
with ASOBI_TEST_DATABASE_URL), so the kill is a real crash: nothing is written out on the way
down.  The journal then holds each match as of its latest snapshot.
"""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from asobi.journal import COALESCE_S
from tests.cluster_support import LISTENING, Node
from tests.conftest import Client

GRANTING = """\
match_size = 1
max_players = 4
tick_rate = 20

function init(state)
  state.counter = 0
  return state
end
function tick(state)
  state.counter = state.counter + 1
  -- One grant per tick, named after its tick: a grant applied twice shows up twice.
  local pid = game.players()[1]
  if pid then game.economy.grant(pid, "gold", 1, "t" .. game.tick()) end
  return state
end
function get_state(state, player_id)
  return { counter = state.counter, tick = game.tick() }
end
"""


async def _serve(home: Path, database_url: str, env: dict[str, str]) -> Node:
    game_dir = home / "game"
    log_path, err_path = home / f"log{len(list(home.glob('log*')))}.jsonl", home / "stderr.txt"
    environment = {
        **os.environ,
        "ASOBI_DATABASE_URL": database_url,
        "ASOBI_SECRET": "durability-test-secret-long-enough-for-hs256",
        "ASOBI_LOG_FORMAT": "json",
        "ASOBI_HOST": "127.0.0.1",
        "ASOBI_PORT": "0",
        "ASOBI_GAME_DIR": str(game_dir),
        "ASOBI_DATA_DIR": str(home / "data"),
        "ASOBI_RELOAD": "off",
        **env,
    }
    err_path.write_bytes(b"")
    process = subprocess.Popen(
        [sys.executable, "-m", "asobi", "serve"],
        env=environment,
        stdout=open(log_path, "wb"),  # noqa: SIM115
        stderr=open(err_path, "wb"),  # noqa: SIM115
    )
    node = Node("single", process, log_path, err_path, game_dir)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = LISTENING.search(err_path.read_bytes())
        if found:
            node.port = int(found.group(1))
            return node
        if not node.alive():
            raise RuntimeError(f"server exited: {err_path.read_text()[-2000:]}")
        await asyncio.sleep(0.05)
    raise RuntimeError("server did not start")


async def _player(node: Node) -> tuple[Client, str, str]:
    client = await node.client()
    await client.send("auth.guest")
    token = (await client.expect("auth.token"))["payload"]["token"]
    connected = await client.expect("session.connected")
    client.player_id = connected["payload"]["player_id"]
    await client.send("matchmaker.add", {"mode": "default"})
    await client.expect("matchmaker.queued")
    await client.expect("matchmaker.matched")
    return client, token, connected["payload"]["resume_token"]


async def _ledger_reasons(home: Path, database_url: str, player_id: str) -> list[str]:
    sql = "SELECT reason FROM ledger WHERE player_id = {} ORDER BY id"
    if database_url:
        url, settings = database_url.split("?")[0], _path(database_url)
        conn = await asyncpg.connect(url, server_settings=settings)
        try:
            rows = await conn.fetch(sql.format("$1"), player_id)
        finally:
            await conn.close()
        return [r[0] for r in rows]
    with sqlite3.connect(home / "data" / "asobi.db") as conn:
        return [r[0] for r in conn.execute(sql.format("?"), (player_id,))]


def _path(database_url: str) -> dict[str, str]:
    query = database_url.partition("?")[2]
    return dict(p.split("=", 1) for p in query.split("&") if p)


async def test_kill_9_restores_the_match_and_its_player_from_the_snapshot(
    tmp_path: Path, database_url: str
) -> None:
    (tmp_path / "game").mkdir()
    (tmp_path / "game" / "match.lua").write_text(GRANTING)
    env = {"ASOBI_SNAPSHOT_TICKS": "15"}  # every 0.75 s at 20 Hz
    first = await _serve(tmp_path, database_url, env)
    second = None
    try:
        client, token, resume = await _player(first)
        seen = [s["counter"] for s in await client.states(50, 10)]
        first.kill9()
        last_seen = seen[-1]
        # Ticks the crash lost after the snapshot but whose grants were already written.
        written = await _ledger_reasons(tmp_path, database_url, client.player_id)
        last_written = int(written[-1][1:])
        assert last_written >= last_seen - 2

        second = await _serve(tmp_path, database_url, env)
        restored = await second.wait_event("match_restored")
        snapshot_tick = restored["tick"]
        # A snapshot every 15 ticks, and the journal writes behind (COALESCE_S, then the write
        # itself): the newest snapshot may still have been on its way when the kill came, while
        # the grants of the ticks after it were already in the ledger.
        in_flight = math.ceil((COALESCE_S + 0.05) * 20)
        assert last_written - 15 - in_flight <= snapshot_tick <= last_written
        assert restored["lost_ticks"] == last_written - snapshot_tick

        again = await second.client()
        await again.send("session.connect", {"token": token, "resume_token": resume})
        connected = await again.expect("session.connected")
        assert connected["payload"]["resumed"] is True
        notice = await again.expect("match.restored")
        assert notice["payload"] == {
            "match_id": restored["match_id"],
            "tick": snapshot_tick,
            "lost_ticks": restored["lost_ticks"],
        }
        await again.expect("match.rejoined")
        # Enough frames for the match to have re-run the lost ticks and gone past them (a match
        # can be snapshotted at any tick of its interval, so 15 ticks and more can be lost).
        count = max(10, restored["lost_ticks"] + 3)
        states = await again.states(count)
        counters = [s["counter"] for s in states]
        # The counter continues from the snapshot's tick, one per tick, nothing skipped.
        assert counters[0] > snapshot_tick and counters[0] == states[0]["tick"]
        assert counters == list(range(counters[0], counters[0] + count))
    finally:
        for node in (first, second):
            if node is not None:
                await node.stop()

    # Exactly once: every tick's grant is in the ledger once, across the crash and the re-run.
    reasons = await _ledger_reasons(tmp_path, database_url, client.player_id)
    ticks = [int(r[1:]) for r in reasons]
    assert len(ticks) == len(set(ticks)), "a grant was applied twice"
    assert ticks == list(range(1, ticks[-1] + 1))
    assert ticks[-1] > last_written
    skipped = second.events("unit_skipped")
    assert [e["tick"] for e in skipped] == list(range(snapshot_tick + 1, last_written + 1))


async def test_a_player_without_the_resume_token_starts_afresh(
    tmp_path: Path, database_url: str
) -> None:
    (tmp_path / "game").mkdir()
    (tmp_path / "game" / "match.lua").write_text(GRANTING)
    first = await _serve(tmp_path, database_url, {})
    second = None
    try:
        client, token, _ = await _player(first)
        await client.states(25, 10)
        first.kill9()
        second = await _serve(tmp_path, database_url, {})
        restored = await second.wait_event("match_restored")
        again = await second.client()
        await again.send("session.connect", {"token": token, "resume_token": "not-the-token"})
        connected = await again.expect("session.connected")
        assert connected["payload"]["resumed"] is False
        released = await second.wait_event("seat_released", player_id=client.player_id)
        assert released["match_id"] == restored["match_id"]
    finally:
        for node in (first, second):
            if node is not None:
                await node.stop()
