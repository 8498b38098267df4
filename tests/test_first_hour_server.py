"""A new user's first hour against a real server: the guest route typed by hand, token errors in
plain words, readiness of a broken game dir, mode fallback, and what a reload says it did."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import jwt
import orjson
import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import TUTORIAL, Logs
from tests.protocol_support import http_get

SECRET = "test-secret-with-enough-length-for-hs256"


# -- the guest route ------------------------------------------------------------------------------
async def test_auth_guest_opens_the_session_and_hello_gives_each_client_its_own_match(
    start_server,
) -> None:
    """What the README's tutorial promises, frame by frame, for two clients typing it."""
    server = await start_server()
    match_ids = []
    for _ in range(2):
        client = await server.client()
        await client.ws.send('{"type":"auth.guest","payload":{}}')
        token = await client.recv()
        assert token["type"] == "auth.token"
        connected = await client.recv()
        assert connected["type"] == "session.connected"
        assert connected["payload"]["player_id"] == token["payload"]["player_id"]
        await client.ws.send('{"type":"matchmaker.add","payload":{"mode":"hello"}}')
        assert (await client.recv())["type"] == "matchmaker.queued"
        matched = await client.recv()
        assert matched["type"] == "matchmaker.matched"
        assert matched["payload"]["players"] == [token["payload"]["player_id"]]
        state = await client.recv()
        assert state["type"] == "match.state"
        assert state["payload"]["message"] == "hello"
        match_ids.append(matched["payload"]["match_id"])
    assert match_ids[0] != match_ids[1]


async def test_auth_timeout_close_reason_names_the_limit(start_server) -> None:
    server = await start_server(connect_timeout_s=0.3)
    client = await server.client()
    with pytest.raises(ConnectionClosed) as closed:
        await client.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert "within 0.3 s" in closed.value.rcvd.reason
    assert "auth.guest" in closed.value.rcvd.reason


async def test_a_guest_is_not_closed_by_the_auth_limit(start_server) -> None:
    server = await start_server(connect_timeout_s=0.3)
    client = await server.player()
    await asyncio.sleep(0.6)
    beat = await client.request("session.heartbeat")
    assert beat["type"] == "session.heartbeat"


# -- token errors ---------------------------------------------------------------------------------
async def test_invalid_token_messages_are_plain_words(start_server) -> None:
    server = await start_server()
    forged = jwt.encode({"sub": "alice", "exp": 2**40, "iss": "asobi"}, "x" * 40, "HS256")
    expired = jwt.encode({"sub": "alice", "exp": 1000, "iss": "asobi"}, SECRET, "HS256")
    foreign = jwt.encode({"sub": "alice", "exp": 2**40, "iss": "other"}, SECRET, "HS256")
    cases = {
        forged: "signature does not match this server's secret",
        expired: "token has expired",
        "not-a-token": "token is malformed",
        foreign: "not issued by this server",
    }
    client = await server.client()
    for token, expected in cases.items():
        await client.send("session.connect", {"token": token})
        error = await client.expect("error")
        assert error["payload"]["code"] == "invalid_token"
        message = error["payload"]["message"]
        assert expected in message, message
        for internal in (
            "Signature verification failed",
            "Not enough segments",
            "Invalid issuer",
            "Token is missing",
            "jwt",
        ):
            assert internal not in message, message


# -- readiness ------------------------------------------------------------------------------------
async def test_every_script_rejected_makes_ready_false_until_one_loads(
    start_server, logs: Logs
) -> None:
    server = await start_server({"match.lua": "function init(\n"}, reload="poll", reload_poll_ms=50)
    line = logs.events("no_playable_scripts")[0]
    assert line["rejected"] == 1
    status, _, body = await http_get(server.http + "/ready")
    assert status == 503
    reply = orjson.loads(body)
    assert reply["ready"] is False
    assert "every script in" in reply["reason"] and "was rejected (1)" in reply["reason"]
    server.write("match.lua", TUTORIAL)
    await logs.wait_for("reloaded")
    status, _, body = await http_get(server.http + "/ready")
    assert status == 200 and orjson.loads(body) == {"ready": True}


# -- modes ----------------------------------------------------------------------------------------
async def test_mode_fallback_is_logged_once_per_mode(start_server, logs: Logs) -> None:
    server = await start_server()
    for mode in ("hello", "hello", "duel"):
        client = await server.player(mode)
        await client.expect("matchmaker.matched")
    fallbacks = logs.events("mode_fallback")
    assert sorted(line["mode"] for line in fallbacks) == ["duel", "hello"]
    assert all(line["script"] == "match.lua" for line in fallbacks)


async def test_strict_modes_refuse_a_mode_without_its_own_script(start_server, logs: Logs) -> None:
    duel = TUTORIAL.replace('"hello"', '"duel"')
    server = await start_server({"match.lua": TUTORIAL, "duel.lua": duel}, strict_modes=True)
    client = await server.player()
    await client.send("matchmaker.add", {"mode": "hello"})
    error = await client.expect("error")
    assert error["payload"]["code"] == "unknown_mode"
    assert "looked for hello.lua" in error["payload"]["message"]
    assert "strict" in error["payload"]["message"]
    await client.send("matchmaker.add", {"mode": "duel"})
    await client.expect("matchmaker.queued")
    assert (await client.expect("match.state", skip=("matchmaker.matched",)))["payload"][
        "message"
    ] == "duel"
    assert logs.events("mode_fallback") == []


async def test_a_rejected_mode_script_is_named_not_run_on_match_lua(start_server) -> None:
    server = await start_server({"match.lua": TUTORIAL, "arena.lua": "function init(\n"})
    client = await server.player()
    await client.send("matchmaker.add", {"mode": "arena"})
    error = await client.expect("error")
    assert error["payload"]["code"] == "unknown_mode"
    message = error["payload"]["message"]
    assert "arena.lua was rejected: " in message and "arena.lua:" in message, message
    assert "no script" not in message


# -- reload feedback ------------------------------------------------------------------------------
async def test_a_save_with_unchanged_content_says_it_was_skipped(start_server, logs: Logs) -> None:
    server = await start_server()
    await server.player("hello")
    server.write("match.lua", TUTORIAL)
    skipped = await logs.wait_for("reload_skipped")
    assert skipped["script"] == "match.lua" and skipped["reason"] == "unchanged"
    assert logs.events("reloaded") == []


HOLDS_FUNCTION = TUTORIAL.replace(
    'state.message = "hello"', 'state.message = "hello"\n  state.helper = function() end'
)


async def test_a_reload_every_match_refuses_is_not_used_for_new_matches(
    start_server, logs: Logs
) -> None:
    server = await start_server({"match.lua": HOLDS_FUNCTION})
    first = await server.player("hello")
    await first.expect("matchmaker.matched")
    old = server.app.registry.get("match.lua")
    server.write("match.lua", HOLDS_FUNCTION.replace('"hello"', '"edited"'))
    failed = await logs.wait_for("reload_failed")
    assert "state cannot cross" in failed["errors"][0]
    assert failed["restored_previous"] is True and failed["new_matches"] == "previous"
    assert server.app.registry.get("match.lua") is old
    second = await server.player("hello")
    matched = await second.expect("matchmaker.matched")
    match = server.app.engine.matches[matched["payload"]["match_id"]]
    assert match.script is old
    assert (await second.states(1))[0]["message"] == "hello"
    # `asobi reloads` says new matches start on the previous version.
    listed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "asobi", "reloads", "--url", server.http],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()[:2]
    assert "new_matches" in header.split()
    cells = row.split()
    assert "reload_failed" in cells and "previous" in cells
    # Saving the refused content again is explained, not silently ignored.
    server.write("match.lua", HOLDS_FUNCTION.replace('"hello"', '"edited"'))
    skipped = await logs.wait_for("reload_skipped")
    assert skipped["reason"] == "already_rejected"


async def test_a_single_server_lists_itself_as_the_only_node(start_server) -> None:
    """`GET /api/v1/cluster` (and `asobi nodes`) on a server without Redis: one node, its own
    URL and load."""
    server = await start_server()
    player = await server.player("solo")
    await player.expect("matchmaker.matched")
    status, _, body = await http_get(server.http + "/api/v1/cluster")
    reply = orjson.loads(body)
    assert status == 200 and reply["cluster"] is False
    [node] = reply["nodes"]
    assert node["public_url"] == f"ws://127.0.0.1:{server.server.port}/ws"
    assert (node["matches"], node["players"]) == (1, 1)
