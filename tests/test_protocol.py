"""Every client frame, its replies and every error code, against a real server."""

from __future__ import annotations

import asyncio

import orjson

from tests.conftest import Logs
from tests.protocol_support import GAME, PAIR, http_get, metric


async def game_server(start_server, files=None, **overrides):
    overrides.setdefault("reload", "off")
    return await start_server(files or {"match.lua": GAME}, **overrides)


async def in_match(server, mode: str = "m"):
    client = await server.player(mode)
    matched = await client.expect("matchmaker.matched")
    return client, matched["payload"]["match_id"]


async def test_auth_connect_heartbeat_echo_cid(start_server) -> None:
    server = await game_server(start_server)
    client = await server.client()
    await client.send("auth.guest", cid=1)
    token = await client.expect("auth.token")
    assert token["cid"] == 1 and token["payload"]["player_id"].startswith("guest-")
    # The guest's session is open on this connection at once (typable by hand).
    opened = await client.expect("session.connected")
    assert opened["cid"] == 1
    assert opened["payload"]["player_id"] == token["payload"]["player_id"]
    assert opened["payload"]["resumed"] is False
    # The token still opens a session elsewhere (another socket, a reconnect).
    other = await server.client()
    await other.send("session.connect", {"token": token["payload"]["token"]}, cid="c")
    connected = await other.expect("session.connected")
    assert connected["cid"] == "c"
    assert connected["payload"]["player_id"] == token["payload"]["player_id"]
    assert isinstance(connected["payload"]["resume_token"], str)
    assert connected["payload"]["resumed"] is False
    beat = await other.request("session.heartbeat")
    assert beat["cid"] == "session.heartbeat" and beat["payload"]["ts"] > 1_600_000_000_000


async def test_envelope_errors(start_server) -> None:
    server = await game_server(start_server)
    client = await server.client()
    cases = [
        ("{not json", "invalid_json", None),
        ("[1, 2]", "invalid_message", None),
        ('{"payload": {}, "cid": 5}', "invalid_message", 5),
        ('{"type": "session.heartbeat", "payload": [1], "cid": "x"}', "invalid_message", "x"),
        ('{"type": "session.heartbeat", "cid": true}', "invalid_message", None),
        ('{"type": "session.heartbeat", "cid": "' + "c" * 200 + '"}', "invalid_message", None),
        ('{"type": "no.such", "cid": 7}', "unknown_type", 7),
        ('{"type": "matchmaker.add", "payload": {"mode": "m"}, "cid": 8}', "unauthenticated", 8),
        ('{"type": "session.connect", "payload": {"token": "abc"}, "cid": 9}', "invalid_token", 9),
        ('{"type": "session.connect", "payload": {"token": 3}}', "invalid_message", None),
    ]
    for raw, code, cid in cases:
        await client.ws.send(raw)
        frame = await client.expect("error")
        assert frame["payload"]["code"] == code, raw
        assert frame.get("cid") == cid, raw
        assert frame["payload"]["message"]
    await client.ws.send(b"\x00\x01binary")
    frame = await client.expect("error")
    assert frame["payload"]["code"] == "binary_not_supported"
    # Still usable after all of that.
    await client.login_guest()
    _, _, body = await http_get(server.http + "/metrics")
    assert metric(body, "asobi_errors_total", 'code="invalid_message"') == 6
    assert metric(body, "asobi_errors_total", 'code="binary_not_supported"') == 1


async def test_already_authenticated_and_bad_resume_token_type(start_server) -> None:
    server = await game_server(start_server)
    client = await server.player()
    other = server.app.signer.issue("someone-else")
    await client.send("session.connect", {"token": other}, cid=1)
    error = await client.expect("error")
    assert error["payload"]["code"] == "already_authenticated" and error["cid"] == 1
    own = server.app.signer.issue(client.player_id)
    await client.send("session.connect", {"token": own, "resume_token": 42}, cid=2)
    error = await client.expect("error")
    assert error["payload"]["code"] == "invalid_message" and error["cid"] == 2
    # The same player again on the same socket just gets a new resume token.
    await client.send("session.connect", {"token": own}, cid=3)
    again = await client.expect("session.connected")
    assert again["payload"]["player_id"] == client.player_id


async def test_matchmaker_queue_remove_and_errors(start_server) -> None:
    server = await game_server(start_server, {"pair.lua": PAIR})
    client = await server.player()
    queued = await client.request("matchmaker.add", {"mode": "pair"}, "matchmaker.queued")
    ticket = queued["payload"]["ticket_id"]
    assert queued["payload"]["mode"] == "pair" and "already_queued" not in queued["payload"]
    again = await client.request("matchmaker.add", {"mode": "pair"}, "matchmaker.queued")
    assert again["payload"] == {"ticket_id": ticket, "mode": "pair", "already_queued": True}
    assert server.app.matchmaker.queued("pair") == 1
    removed = await client.request("matchmaker.remove", {"ticket_id": ticket}, "matchmaker.removed")
    assert removed["payload"] == {"ticket_id": ticket, "removed": True}
    removed = await client.request("matchmaker.remove", {"ticket_id": ticket}, "matchmaker.removed")
    assert removed["payload"]["removed"] is False
    assert server.app.matchmaker.queued("pair") == 0
    for payload, code in [
        ({"mode": "nope"}, "unknown_mode"),
        ({"mode": "bad mode!"}, "invalid_message"),
        ({}, "invalid_message"),
    ]:
        error = await client.request("matchmaker.add", payload, "error")
        assert error["payload"]["code"] == code
    error = await client.request("matchmaker.remove", {"ticket_id": 5}, "error")
    assert error["payload"]["code"] == "invalid_message"


async def test_matched_pair_input_message_broadcast_leave(start_server) -> None:
    server = await game_server(start_server, {"pair.lua": PAIR})
    a = await server.player("pair")
    b = await server.player("pair")
    ma = await a.expect("matchmaker.matched")
    mb = await b.expect("matchmaker.matched")
    assert ma["payload"] == mb["payload"]
    assert sorted(ma["payload"]["players"]) == sorted([a.player_id, b.player_id])
    match_id = ma["payload"]["match_id"]
    error = await a.request("matchmaker.add", {"mode": "pair"}, "error")
    assert error["payload"]["code"] == "already_in_match"

    await a.send("match.input", {"add": 5, "whisper": "psst"})
    message = await a.expect("match.message")
    assert message["payload"] == {"match_id": match_id, "payload": {"echo": "psst"}}
    for _ in range(20):
        (state,) = await a.states(1)
        if state["inputs"] == 5:
            break
    else:
        raise AssertionError("input never reached handle_input")
    await a.send("match.input", {"shout": "hi"})
    for client in (a, b):
        shout = await client.expect("match.shout")
        assert shout["payload"] == {"from": a.player_id, "text": "hi"}

    # leave runs while the leaver is still seated: its broadcast reaches them too.
    await a.send("match.leave", cid=9)
    left = await a.expect("match.left", skip=("match.gone",))
    assert left["payload"] == {"match_id": match_id}
    gone = await b.expect("match.gone")
    assert gone["payload"] == {"player_id": a.player_id}
    for _ in range(20):
        (state,) = await b.states(1)
        if state["left"] == 1:
            assert state["last_left"] == a.player_id
            break
    else:
        raise AssertionError("leave never ran")
    for kind in ("match.leave", "match.input"):
        error = await a.request(kind, {}, "error")
        assert error["payload"]["code"] == "not_in_match"


async def test_match_finished(start_server) -> None:
    server = await game_server(start_server)
    client, match_id = await in_match(server)
    await client.send("match.input", {"finish": True})
    finished = await client.expect("match.finished")
    assert finished["payload"] == {"match_id": match_id, "result": {"winner": client.player_id}}
    assert match_id not in server.app.engine.matches


async def test_match_failed_when_init_errors(start_server) -> None:
    server = await game_server(
        start_server,
        {
            "match.lua": "function init(s) error('no') end\nfunction tick(s) end\n"
            "function get_state(s) return {} end"
        },
    )
    client = await server.player("m")
    error = await client.expect("error")
    assert error["payload"]["code"] == "match_failed"


async def test_match_list_and_join(start_server) -> None:
    server = await game_server(start_server, {"match.lua": GAME, "other.lua": GAME})
    a, match_id = await in_match(server, "m")
    _, other_id = await in_match(server, "other")
    listed = await a.request("match.list", {}, "match.list")
    by_id = {m["match_id"]: m for m in listed["payload"]["matches"]}
    assert by_id[match_id] == {
        "match_id": match_id,
        "mode": "m",
        "players": [a.player_id],
        "max_players": 3,
    }
    assert other_id in by_id
    only = await a.request("match.list", {"mode": "other"}, "match.list")
    assert [m["match_id"] for m in only["payload"]["matches"]] == [other_id]
    error = await a.request("match.list", {"mode": 3}, "error")
    assert error["payload"]["code"] == "invalid_message"

    b = await server.player()
    await b.send("matchmaker.add", {"mode": "other"})
    await b.expect("matchmaker.queued")
    await b.expect("matchmaker.matched")
    error = await b.request("match.join", {"match_id": match_id}, "error")
    assert error["payload"]["code"] == "already_in_match"
    await b.send("match.leave")
    await b.expect("match.left", skip=("match.gone",))
    joined = await b.request("match.join", {"match_id": match_id}, "match.joined")
    assert joined["payload"] == {
        "match_id": match_id,
        "mode": "m",
        "players": [a.player_id, b.player_id],
    }
    counters = [s["counter"] for s in await b.states(3)]
    assert counters == list(range(counters[0], counters[0] + 3))

    error = await b.request("match.join", {"match_id": "f" * 32}, "error")
    assert error["payload"]["code"] == "already_in_match"
    c = await server.player()
    error = await c.request("match.join", {"match_id": "f" * 32}, "error")
    assert error["payload"]["code"] == "match_not_found"
    error = await c.request("match.join", {}, "error")
    assert error["payload"]["code"] == "invalid_message"
    # The script refuses: join returns nil, "match is closed".
    await a.send("match.input", {"close": True})
    # Handled: the heartbeat's reply follows the input on the same connection, and a state
    # after it follows the tick that applied any input queued until then.
    await a.request("session.heartbeat")
    await a.states(1)
    error = await c.request("match.join", {"match_id": match_id}, "error")
    assert error["payload"] == {"code": "join_refused", "message": "match is closed"}
    assert server.app.engine.match_of(c.player_id) is None


async def test_match_full(start_server) -> None:
    server = await game_server(start_server)
    _a, match_id = await in_match(server)
    for _ in range(2):
        p = await server.player()
        await p.request("match.join", {"match_id": match_id}, "match.joined")
    late = await server.player()
    error = await late.request("match.join", {"match_id": match_id}, "error")
    assert error["payload"]["code"] == "match_full"
    listed = await late.request("match.list", {"mode": "m"}, "match.list")
    assert len(listed["payload"]["matches"][0]["players"]) == 3


async def test_join_drops_queued_tickets(start_server) -> None:
    server = await game_server(start_server, {"match.lua": GAME, "pair.lua": PAIR})
    _, match_id = await in_match(server)
    b = await server.player("pair")
    assert server.app.matchmaker.queued("pair") == 1
    await b.request("match.join", {"match_id": match_id}, "match.joined")
    assert server.app.matchmaker.queued("pair") == 0


async def test_ticket_expires(start_server, logs: Logs) -> None:
    server = await game_server(start_server, {"pair.lua": PAIR}, ticket_ttl_s=0.3)
    client = await server.player()
    queued = await client.request("matchmaker.add", {"mode": "pair"}, "matchmaker.queued")
    expired = await client.expect("matchmaker.expired", timeout=3)
    assert expired["payload"] == {"ticket_id": queued["payload"]["ticket_id"], "mode": "pair"}
    assert server.app.matchmaker.queued("pair") == 0
    await logs.wait_for("ticket_expired", lambda e: e["player_id"] == client.player_id)


async def test_disconnect_removes_tickets(start_server) -> None:
    server = await game_server(start_server, {"pair.lua": PAIR})
    client = await server.player("pair")
    assert server.app.matchmaker.queued("pair") == 1
    await client.close()
    for _ in range(100):
        if server.app.matchmaker.queued("pair") == 0:
            break
        await asyncio.sleep(0.01)
    assert server.app.matchmaker.queued("pair") == 0
    # A later player is not matched with the ghost.
    late = await server.player("pair")
    # Matching runs right after the queued reply, before the next frame is handled.
    await late.request("session.heartbeat")
    assert server.app.engine.match_of(late.player_id) is None


async def test_match_state_every_tick_is_raw_json(start_server) -> None:
    server = await game_server(start_server)
    client, _ = await in_match(server)
    raw = await asyncio.wait_for(client.ws.recv(), 2)
    frame = orjson.loads(raw)
    assert frame["type"] == "match.state" and set(frame["payload"]) >= {"counter", "inputs"}


async def test_match_input_lua_cannot_take_is_refused(start_server, logs: Logs) -> None:
    server = await game_server(start_server)
    client, match_id = await in_match(server)
    deep = {"x": 1}
    for _ in range(40):
        deep = {"x": deep}
    payloads = [
        orjson.dumps(deep).decode(),
        '{"add": 9223372036854775808}',
        '{"add": 18446744073709551615}',
        orjson.dumps({"many": [0] * 20_000}).decode(),
    ]
    for i, payload in enumerate(payloads):
        await client.ws.send(f'{{"type": "match.input", "cid": {i}, "payload": {payload}}}')
        error = await client.expect("error")
        assert error["payload"]["code"] == "invalid_message" and error["cid"] == i
    await client.send("match.input", {"add": 2**63 - 1})
    for _ in range(20):
        (state,) = await client.states(1)
        if state["inputs"] == 2**63 - 1:
            break
    else:
        raise AssertionError("the largest integer did not reach handle_input")
    assert server.app.engine.matches[match_id]
    assert not logs.events("match_crashed")


async def test_internal_error_echoes_cid_and_keeps_the_connection(
    start_server, logs: Logs, monkeypatch
) -> None:
    """A bug while handling a frame (injected here: nothing a client sends should reach one)
    answers `internal_error` with the frame's cid, whether the handler is synchronous or waits on
    I/O, and the connection goes on."""
    server = await game_server(start_server)
    client = await server.player()

    def broken(*_: object) -> None:
        raise RuntimeError("injected")

    async def broken_async(*_: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(server.app.engine, "list_matches", broken)
    monkeypatch.setattr(server.app.accounts, "register", broken_async)
    await client.send("match.list", {}, cid="sync-1")
    error = await client.expect("error")
    assert error["cid"] == "sync-1" and error["payload"]["code"] == "internal_error"
    await client.send("auth.register", {"username": "erin", "password": "password-e"}, cid=42)
    error = await client.expect("error")
    assert error["cid"] == 42 and error["payload"]["code"] == "internal_error"
    assert len(logs.events("frame_failed")) == 2
    assert (await client.request("session.heartbeat"))["type"] == "session.heartbeat"
