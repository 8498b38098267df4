"""Sessions and reconnection: resume tokens, the seat grace period, replaced connections."""

from __future__ import annotations

import asyncio

from tests.conftest import Logs
from tests.protocol_support import GAME, PAIR


async def game_server(start_server, files=None, **overrides):
    overrides.setdefault("reload", "off")
    return await start_server(files or {"match.lua": GAME}, **overrides)


async def connect(server, token: str, resume_token: str | None = None):
    client = await server.client()
    payload = {"token": token}
    if resume_token is not None:
        payload["resume_token"] = resume_token
    await client.send("session.connect", payload)
    connected = await client.expect("session.connected")
    client.player_id = connected["payload"]["player_id"]
    return client, connected["payload"]


def drop(client) -> None:
    """The network goes away: no close frame, the TCP connection is just gone."""
    client.ws.transport.abort()


async def wait_until(predicate, timeout: float = 3.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def test_drop_and_resume_keeps_seat_and_state(start_server, logs: Logs) -> None:
    server = await game_server(start_server)
    token = server.app.signer.issue("alice")
    client, first = await connect(server, token)
    assert first["resumed"] is False
    await client.send("matchmaker.add", {"mode": "m"})
    match_id = (await client.expect("matchmaker.matched", skip=("matchmaker.queued",)))["payload"][
        "match_id"
    ]
    await client.send("match.input", {"add": 3})
    before = [s["counter"] for s in await client.states(5)]
    drop(client)
    await logs.wait_for("seat_held", lambda e: e["player_id"] == "alice")
    # The match runs on while nobody is connected.
    match = server.app.engine.match_of("alice")
    dropped_at = match.tick_no
    await wait_until(lambda: match.tick_no >= dropped_at + 3)
    back, resumed = await connect(server, token, first["resume_token"])
    assert resumed["resumed"] is True and resumed["resume_token"] != first["resume_token"]
    rejoined = await back.expect("match.rejoined")
    assert rejoined["payload"] == {"match_id": match_id, "mode": "m"}
    after = await back.states(5)
    counters = [s["counter"] for s in after]
    assert counters == list(range(counters[0], counters[0] + 5))
    assert counters[0] > before[-1] + 2  # no reset, and it kept ticking meanwhile
    assert all(s["inputs"] == 3 and s["left"] == 0 for s in after)  # leave never ran
    assert server.app.engine.match_of("alice").id == match_id
    assert len(server.app.presence) == 0


async def test_grace_expiry_runs_leave(start_server, logs: Logs) -> None:
    server = await game_server(start_server, {"pair.lua": PAIR}, reconnect_grace_s=0.4)
    a = await server.player("pair")
    b = await server.player("pair")
    await a.expect("matchmaker.matched")
    await b.expect("matchmaker.matched")
    drop(b)
    await logs.wait_for("seat_held", lambda e: e["player_id"] == b.player_id)
    # During the grace period leave has not run.
    states = await a.states(4)
    assert all(s["left"] == 0 for s in states)
    gone = await a.expect("match.gone", timeout=3)
    assert gone["payload"] == {"player_id": b.player_id}
    (state,) = await a.states(1)
    assert state["left"] == 1 and state["last_left"] == b.player_id
    await logs.wait_for("seat_expired", lambda e: e["player_id"] == b.player_id)


async def test_grace_expiry_ends_empty_match(start_server, logs: Logs) -> None:
    server = await game_server(start_server, reconnect_grace_s=0.3)
    client = await server.player("m")
    match_id = (await client.expect("matchmaker.matched"))["payload"]["match_id"]
    drop(client)
    line = await logs.wait_for("match_finished", lambda e: e["match_id"] == match_id, timeout=3)
    assert line["result"] == {"reason": "empty"}
    assert not server.app.engine.matches


async def test_reconnect_without_resume_token_releases_seat(start_server, logs: Logs) -> None:
    server = await game_server(start_server, {"pair.lua": PAIR})
    a = await server.player("pair")
    token = server.app.signer.issue("bob")
    b, _ = await connect(server, token)
    await b.send("matchmaker.add", {"mode": "pair"})
    await a.expect("matchmaker.matched")
    drop(b)
    await logs.wait_for("seat_held", lambda e: e["player_id"] == "bob")
    fresh, payload = await connect(server, token, resume_token="not-the-token")
    assert payload["resumed"] is False
    gone = await a.expect("match.gone")
    assert gone["payload"] == {"player_id": "bob"}
    assert server.app.engine.match_of("bob") is None
    await fresh.send("session.heartbeat", cid=1)
    frame = await fresh.recv()
    assert frame["type"] == "session.heartbeat"  # no match.rejoined, no match.state
    await logs.wait_for("seat_released", lambda e: e["player_id"] == "bob")


async def test_second_connection_replaces_first(start_server) -> None:
    server = await game_server(start_server)
    token = server.app.signer.issue("carol")
    first, payload = await connect(server, token)
    await first.send("matchmaker.add", {"mode": "m"})
    await first.expect("matchmaker.matched", skip=("matchmaker.queued",))
    second, again = await connect(server, token, payload["resume_token"])
    assert again["resumed"] is True
    await second.expect("match.rejoined")
    await asyncio.wait_for(first.ws.wait_closed(), 3)
    assert first.ws.close_code == 4000
    assert "replaced" in first.ws.close_reason
    counters = [s["counter"] for s in await second.states(4)]
    assert counters == list(range(counters[0], counters[0] + 4))
    assert server.app.engine.match_of("carol") is not None
    assert len(server.app.presence) == 0


async def test_resume_token_is_single_use(start_server) -> None:
    server = await game_server(start_server)
    token = server.app.signer.issue("dave")
    client, first = await connect(server, token)
    await client.send("matchmaker.add", {"mode": "m"})
    await client.expect("matchmaker.matched", skip=("matchmaker.queued",))
    drop(client)
    back, _second = await connect(server, token, first["resume_token"])
    await back.expect("match.rejoined")
    drop(back)
    # The first token was rotated away by the resumption.
    _stale, third = await connect(server, token, first["resume_token"])
    assert third["resumed"] is False
    await wait_until(lambda: server.app.engine.match_of("dave") is None)


async def test_no_grace_leaves_at_once(start_server, logs: Logs) -> None:
    server = await game_server(start_server, reconnect_grace_s=0)
    client = await server.player("m")
    match_id = (await client.expect("matchmaker.matched"))["payload"]["match_id"]
    await client.close()
    await logs.wait_for("match_finished", lambda e: e["match_id"] == match_id)
    assert not logs.events("seat_held")


async def test_seat_metrics(start_server) -> None:
    from tests.protocol_support import http_get, metric

    server = await game_server(start_server, reconnect_grace_s=0.2)
    token = server.app.signer.issue("erin")
    client, first = await connect(server, token)
    await client.send("matchmaker.add", {"mode": "m"})
    await client.expect("matchmaker.matched", skip=("matchmaker.queued",))
    drop(client)
    await wait_until(lambda: len(server.app.presence) == 1)
    back, _ = await connect(server, token, first["resume_token"])
    await back.expect("match.rejoined")
    await back.close()
    await wait_until(lambda: not server.app.engine.matches)
    _, _, body = await http_get(server.http + "/metrics")
    assert metric(body, "asobi_seats_total", 'outcome="resumed"') == 1
    assert metric(body, "asobi_seats_total", 'outcome="expired"') == 1
