"""The compact state encoding on a real server: a WebSocket client that chose it gets its state
frames as binary frames and, decoding them, holds tick for tick the state a JSON client of the
same match is sent; every other frame stays JSON text; resync and resume start a new key table."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import orjson
import pytest

from asobi import compact_state
from asobi.compact_state import CompactClient
from tests.conftest import Client, Running
from tests.test_state_patch import game

pytestmark = pytest.mark.timeout(30)


class CompactReader:
    """Reads a compact client's frames: binary ones through the reference decoder, text ones as
    JSON (which must never be a state frame)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.decoder = CompactClient()
        self.by_tick: dict[int, Any] = {}
        self.kinds: list[tuple[int, int]] = []  # (FULL or PATCH, tick)
        self.texts: list[dict[str, Any]] = []

    async def take(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        seen = 0
        while seen < count:
            left = max(deadline - time.monotonic(), 0.001)
            # websockets hands text frames over as str, binary frames as bytes.
            raw = await asyncio.wait_for(self.client.ws.recv(), left)
            if isinstance(raw, str):
                frame = orjson.loads(raw)
                assert frame["type"] not in ("match.state", "match.patch"), frame
                self.texts.append(frame)
                continue
            state = self.decoder.receive(raw)
            assert state is not None, "a patch that does not follow the last frame"
            kind = raw[0] & compact_state.KINDS
            seen += 1
            self.by_tick[state["tick"]] = state
            self.kinds.append((kind, state["tick"]))


async def compact_pair(run: Running, sync: str = "patch") -> tuple[Client, Client, str, str]:
    """Two players in one match: the first chose compact frames, the second full JSON frames.
    Returns both clients and the compact one's token and resume token."""
    compact = await run.client()
    await compact.send("auth.guest", {"state_sync": sync, "state_encoding": "compact"})
    token = (await compact.expect("auth.token"))["payload"]["token"]
    connected = await compact.expect("session.connected")
    compact.player_id = connected["payload"]["player_id"]
    full = await run.client()
    await full.send("auth.guest", {"state_sync": "full"})
    await full.expect("session.connected", skip=("auth.token",))
    for client in (compact, full):
        await client.send("matchmaker.add", {"mode": "duel"})
        await client.expect("matchmaker.queued")
    await full.expect("matchmaker.matched")
    return compact, full, token, connected["payload"]["resume_token"]


async def test_compact_frames_rebuild_the_full_state_tick_for_tick(start_server) -> None:
    run = await start_server({"match.lua": game(8)})
    compact, full, _, _ = await compact_pair(run)
    reader = CompactReader(compact)
    await reader.take(40)
    assert any(frame["type"] == "matchmaker.matched" for frame in reader.texts)
    full_states = {s["tick"]: s for s in await full.states(45)}
    common = sorted(set(reader.by_tick) & set(full_states))
    assert len(common) >= 30
    for tick in common:
        # Compared as JSON with sorted keys: 1 and 1.0, {} and [] must come out the same.
        assert _exact(reader.by_tick[tick]) == _exact(full_states[tick]), tick
    kinds = [k for k, _ in reader.kinds]
    assert kinds[0] == compact_state.FULL
    assert kinds.count(compact_state.PATCH) >= 30
    full_ticks = [t for k, t in reader.kinds if k == compact_state.FULL]
    assert len(full_ticks) >= 4
    assert {b - a for a, b in itertools.pairwise(full_ticks)} == {8}


async def test_resync_and_resume_start_again_with_a_full_frame(start_server) -> None:
    run = await start_server({"match.lua": game(100_000)})
    compact, _, token, resume = await compact_pair(run)
    reader = CompactReader(compact)
    await reader.take(4)
    await compact.send("match.resync")
    await reader.take(4)
    kinds = [k for k, _ in reader.kinds]
    assert kinds.count(compact_state.FULL) == 2 and kinds[-1] == compact_state.PATCH
    # A new socket resumes the seat: its key table is empty, its first state frame full.
    again = await run.client()
    await again.send(
        "session.connect",
        {"token": token, "resume_token": resume, "state_encoding": "compact"},
    )
    await again.expect("session.connected")
    resumed = CompactReader(again)
    await resumed.take(4)
    assert [k for k, _ in resumed.kinds] == [compact_state.FULL] + [compact_state.PATCH] * 3


async def test_compact_full_frames_only(start_server) -> None:
    """`state_sync: "full"` with the compact encoding: every frame a self-contained full one."""
    run = await start_server({"match.lua": game(100_000)})
    compact, _, _, _ = await compact_pair(run, sync="full")
    reader = CompactReader(compact)
    await reader.take(5)
    assert [k for k, _ in reader.kinds] == [compact_state.FULL] * 5
    # Each frame defines its own keys: a fresh decoder reads any of them.
    assert all(CompactClient().receive(_encoded(s)) == s for s in reader.by_tick.values())


async def test_a_bad_state_encoding_is_refused(start_server) -> None:
    run = await start_server({"match.lua": game(10)})
    client = await run.client()
    await client.send("auth.guest", {"state_encoding": "msgpack"}, cid=4)
    error = await client.expect("error")
    assert error["payload"]["code"] == "invalid_message"
    assert "state_encoding" in error["payload"]["message"]
    assert error["cid"] == 4


def _exact(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _encoded(state: Any) -> bytes:
    return compact_state.encode_full(1, state)[0]


async def test_the_console_shows_a_compact_player_what_they_were_sent(start_server) -> None:
    """The console's view of a player rebuilds the state from their compact frames as it does
    from JSON patches: both players of the match are shown the same state."""
    run = await start_server({"match.lua": game(8)}, admin_token="console-compact-token-0123")
    compact, _full, _, _ = await compact_pair(run)
    reader = CompactReader(compact)
    await reader.take(3)
    match_id = run.app.engine.player_match[compact.player_id or ""]
    admin = await run.client()
    await admin.request("admin.auth", {"token": "console-compact-token-0123"}, "admin.authed")
    await admin.request("admin.watch", {"match_id": match_id}, "admin.watching")
    reading = asyncio.create_task(reader.take(40))
    for _ in range(10):
        views = (await admin.expect("admin.match", timeout=3))["payload"]["views"]
        shown = [views.get(pid) for pid in run.app.engine.matches[match_id].players]
        if all(isinstance(view, dict) for view in shown):
            break
    else:
        raise AssertionError(f"no view of both players: {views}")
    assert len(shown) == 2 and set(shown[0]) == set(shown[1]) and "tick" in shown[0]
    reading.cancel()
