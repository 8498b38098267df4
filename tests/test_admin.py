"""Admin frames (the console's protocol) over a real WebSocket, and the pages' HTTP side."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
import websockets

from tests.conftest import LOGS, TUTORIAL

ADMIN = "admin-test-token-0123456789"
ROOT = Path(__file__).resolve().parent.parent

ONE = "match_size = 1\nmax_players = 2\n" + TUTORIAL


async def admin_client(server):  # type: ignore[no-untyped-def]
    client = await server.client()
    reply = await client.request("admin.auth", {"token": ADMIN}, "admin.authed")
    assert reply["cid"] == "admin.auth"
    return client


async def test_admin_frames_need_the_configured_token(start_server, logs) -> None:
    off = await start_server()
    client = await off.client()
    await client.send("admin.auth", {"token": "anything"}, cid=1)
    error = await client.expect("error")
    assert error["payload"]["code"] == "admin_disabled" and error["cid"] == 1

    server = await start_server(admin_token=ADMIN)
    client = await server.client()
    await client.send("admin.overview", cid=2)
    assert (await client.expect("error"))["payload"]["code"] == "admin_unauthorized"
    await client.send("admin.auth", {"token": "wrong"}, cid=3)
    assert (await client.expect("error"))["payload"]["code"] == "admin_unauthorized"
    failed = await logs.wait_for("admin_auth_failed")
    assert "wrong" not in str(failed)
    await client.request("admin.auth", {"token": ADMIN}, "admin.authed")
    await logs.wait_for("admin_connected")
    overview = await client.request("admin.overview")
    assert overview["payload"]["matches"] == 0
    assert not [line for line in LOGS.lines[logs.start :] if ADMIN in str(line)]


async def test_an_admin_connection_is_not_closed_by_the_auth_deadline(start_server) -> None:
    server = await start_server(admin_token=ADMIN, connect_timeout_s=0.3)
    client = await admin_client(server)
    await asyncio.sleep(0.6)
    assert (await client.request("admin.queues"))["payload"] == {"queues": []}


async def test_matches_are_paged_and_filtered(start_server) -> None:
    server = await start_server({"match.lua": ONE, "duel.lua": ONE}, admin_token=ADMIN)
    for mode in ("match", "match", "match", "duel"):
        player = await server.player(mode)
        await player.expect("matchmaker.matched")
    client = await admin_client(server)
    page = (await client.request("admin.matches", {"limit": 2}))["payload"]
    assert (page["total"], page["running"], len(page["matches"])) == (4, 4, 2)
    assert page["modes"] == ["duel", "match"]
    rest = (await client.request("admin.matches", {"limit": 2, "offset": 2}))["payload"]
    ids = {m["match_id"] for m in page["matches"] + rest["matches"]}
    assert ids == set(server.app.engine.matches)
    duels = (await client.request("admin.matches", {"mode": "duel"}))["payload"]
    assert [m["mode"] for m in duels["matches"]] == ["duel"]
    version = duels["matches"][0]["version"]
    by_version = (await client.request("admin.matches", {"version": version}))["payload"]
    assert by_version["total"] == 4  # both modes run the same content
    none = (await client.request("admin.matches", {"version": "nope"}))["payload"]
    assert none["total"] == 0
    await client.send("admin.matches", {"limit": 1000}, cid=9)
    assert (await client.expect("error"))["payload"]["code"] == "invalid_message"


async def test_watch_pushes_views_rates_and_sizes(start_server) -> None:
    server = await start_server({"match.lua": ONE}, admin_token=ADMIN)
    player = await server.player("match")
    matched = await player.expect("matchmaker.matched")
    match_id = matched["payload"]["match_id"]
    client = await admin_client(server)
    await client.request("admin.watch", {"match_id": match_id}, "admin.watching")
    for _ in range(5):
        await player.send("match.input", {"go": 1})
    pushed = await client.expect("admin.match", timeout=3)
    snapshot = pushed["payload"]
    assert "cid" not in pushed
    assert snapshot["players"][0] == {
        "player_id": player.player_id,
        "connected": True,
        "seat_held": False,
    }
    assert snapshot["views"][player.player_id]["message"] == "hello"
    assert snapshot["state_bytes"] > 10
    assert snapshot["inputs_per_s"] > 0 and snapshot["bytes_per_s"] > 0
    await client.request("admin.unwatch", reply="admin.unwatched")
    assert server.app.hub.tap is None

    # A watched match that ends says so once and stops costing the frame path anything.
    await client.request("admin.watch", {"match_id": match_id}, "admin.watching")
    assert server.app.hub.tap is not None
    await client.request("admin.end_match", {"match_id": match_id}, "admin.match_ended")
    while not (await client.expect("admin.match", timeout=3))["payload"].get("finished"):
        pass
    assert server.app.hub.tap is None


async def test_kick_message_and_end(start_server, logs) -> None:
    server = await start_server({"match.lua": ONE}, admin_token=ADMIN)
    a = await server.player("match")
    match_id = (await a.expect("matchmaker.matched"))["payload"]["match_id"]
    client = await admin_client(server)
    await client.request(
        "admin.message", {"match_id": match_id, "text": "hi <b>"}, "admin.message_sent"
    )
    message = await a.expect("match.message")
    assert message["payload"] == {
        "match_id": match_id,
        "payload": {"text": "hi <b>"},
        "from": "admin",
    }
    await client.request("admin.kick", {"player_id": a.player_id}, "admin.kicked")
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await a.recv(timeout=2)
    assert a.ws.close_code == 4001
    assert server.app.engine.match_of(a.player_id) is None
    await client.send("admin.kick", {"player_id": "nobody"}, cid=4)
    assert (await client.expect("error"))["payload"]["code"] == "player_not_found"

    b = await server.player("match")
    match_id = (await b.expect("matchmaker.matched"))["payload"]["match_id"]
    await client.request("admin.end_match", {"match_id": match_id}, "admin.match_ended")
    finished = await b.expect("match.finished")
    assert finished["payload"]["result"] == {"reason": "ended_by_admin"}
    await logs.wait_for("admin_match_ended", lambda e: e["match_id"] == match_id)
    await client.send("admin.end_match", {"match_id": match_id}, cid=5)
    assert (await client.expect("error"))["payload"]["code"] == "match_not_found"


async def test_reload_history_carries_a_diff_and_errors_stream_live(start_server) -> None:
    server = await start_server({"match.lua": ONE}, admin_token=ADMIN, reload="off")
    player = await server.player("match")
    await player.expect("matchmaker.matched")
    client = await admin_client(server)
    server.write("match.lua", ONE.replace('"hello"', '"bye"'))
    reloading = await client.request("admin.reload", reply="admin.reloading")
    assert reloading["payload"]["reloads"][0]["script"] == "match.lua"
    event = await client.expect("admin.log", timeout=3)
    assert event["payload"]["event"] == "reloaded"
    history = (await client.request("admin.reloads"))["payload"]["reloads"]
    diff = history[0]["diff"]
    assert '-  state.message = "hello"' in diff and '+  state.message = "bye"' in diff

    broken = ONE.replace("state.counter + 1", "state.counter + nil")
    server.write("match.lua", broken)
    await client.request("admin.reload", reply="admin.reloading")
    seen = []
    while not any(e["event"] == "reload_rolled_back" for e in seen):
        seen.append((await client.expect("admin.log", timeout=3))["payload"])
    rolled = next(e for e in seen if e["event"] == "reload_rolled_back")
    assert rolled["where"].startswith("match.lua:")
    history = (await client.request("admin.reloads"))["payload"]["reloads"]
    assert history[0]["outcome"] == "reload_rolled_back" and history[0]["rolled_back"]
    assert "+nil" in history[0]["diff"].replace(" ", "")

    server.write("match.lua", "function init(state) return state")
    await client.send("admin.reload", cid=8)
    failed = await client.expect("admin.log", timeout=3, skip=("admin.reloading",))
    assert failed["payload"]["event"] == "reload_failed"
    assert failed["payload"]["where"].startswith("match.lua:")


async def test_callback_failures_stream_with_file_and_line(start_server) -> None:
    failing = ONE.replace("state.counter = state.counter + 1", "error('boom')")
    server = await start_server({"match.lua": failing}, admin_token=ADMIN)
    client = await admin_client(server)
    player = await server.player("match")
    await player.expect("matchmaker.matched")
    event = (await client.expect("admin.log", timeout=3))["payload"]
    assert event["event"] == "callback_failed" and event["callback"] == "tick"
    assert event["where"] == "match.lua:9" and "boom" in event["message"]


async def test_queues_show_depth_and_oldest_ticket(start_server) -> None:
    two = "match_size = 2\n" + TUTORIAL
    server = await start_server({"match.lua": two}, admin_token=ADMIN)
    await server.player("match")
    client = await admin_client(server)
    await asyncio.sleep(0.1)
    (queue,) = (await client.request("admin.queues"))["payload"]["queues"]
    assert queue["mode"] == "match" and queue["depth"] == 1
    assert queue["oldest_wait_s"] >= 0.1


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def test_pages_are_served_with_a_strict_policy(start_server) -> None:
    server = await start_server(admin_token=ADMIN)
    for path, kind in (
        ("/", "text/html"),
        ("/console", "text/html"),
        ("/static/asobi.js", "text/javascript"),
    ):
        status, headers, body = await asyncio.to_thread(_get, server.http + path)
        assert status == 200 and headers["Content-Type"].startswith(kind)
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert "unsafe-inline" not in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert len(body) == int(headers["Content-Length"])
        if kind == "text/html":
            text = body.decode()
            assert "<script>" not in text and " on" not in text.split("<body>")[1].split("=")[0]
    status, _, body = await asyncio.to_thread(_get, server.http + "/api/v1/modes")
    assert status == 200 and b'"match"' in body

    off = await start_server()
    status, _, body = await asyncio.to_thread(_get, off.http + "/console")
    assert status == 403 and b"ASOBI_ADMIN_TOKEN" in body


def test_the_repository_client_is_the_served_client() -> None:
    served = (ROOT / "asobi" / "static" / "asobi.js").read_bytes()
    assert (ROOT / "clients" / "js" / "asobi.js").read_bytes() == served


async def test_a_thousand_matches_come_as_pages_of_summaries(start_server) -> None:
    """The console must stay responsive with 1,000 matches: it gets one page of summaries, not
    every match (and never their frames)."""
    slow = "match_size = 1\ntick_rate = 1\n" + TUTORIAL
    server = await start_server({"match.lua": slow}, admin_token=ADMIN, reload="off")
    engine = server.app.engine
    script = server.app.registry.resolve_mode("match")
    for i in range(1000):
        engine.start_match("match", script, [f"p{i}"])
    client = await admin_client(server)
    await client.send("admin.matches", {"offset": 950}, cid="page")
    t0 = time.perf_counter()
    raw = await asyncio.wait_for(client.ws.recv(), 5)
    elapsed = time.perf_counter() - t0
    page = orjson.loads(raw)["payload"]
    assert (page["total"], page["offset"], len(page["matches"])) == (1000, 950, 50)
    assert len(raw) < 20_000, len(raw)
    assert elapsed < 0.5, f"a page of 1,000 matches took {elapsed * 1000:.0f} ms"
    overview = (await client.request("admin.overview"))["payload"]
    assert overview["matches"] == 1000
