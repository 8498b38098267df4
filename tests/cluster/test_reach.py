"""Reaching a match on another node: `match.list`/`match.join` across nodes by redirect, seat
tokens, resume tokens that route themselves, a resume naming a killed node."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
import websockets

from asobi.cluster.seat_tokens import SeatTokens
from tests.cluster_support import SECRET, Cluster, Node, needs_cluster
from tests.conftest import Client

pytestmark = needs_cluster

GAME = """\
match_size = 1
max_players = 2
tick_rate = 20
function init(state)
  state.counter = 0
  return state
end
function join(state, player_id)
  return state
end
function tick(state)
  state.counter = state.counter + 1
  return state
end
function get_state(state, player_id)
  return { counter = state.counter }
end
"""
FILES = {"match.lua": GAME}


class Metered(Client):
    """A client that counts the bytes its WebSocket carries: the opening handshake both ways,
    and every message with its frame header (client frames are masked: 4 bytes more)."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        super().__init__(ws)
        assert ws.request is not None and ws.response is not None
        self.bytes = len(ws.request.serialize()) + len(ws.response.serialize())

    async def send(self, kind: str, payload: Any = None, cid: Any = None) -> None:
        frame: dict[str, Any] = {"type": kind, "payload": {} if payload is None else payload}
        if cid is not None:
            frame["cid"] = cid
        text = orjson.dumps(frame)
        self.bytes += len(text) + header(len(text)) + 4
        await self.ws.send(text.decode())

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        self.bytes += len(raw.encode() if isinstance(raw, str) else raw) + header(len(raw))
        return orjson.loads(raw)


def header(length: int) -> int:
    return 2 if length < 126 else 4 if length < 65536 else 10


@dataclass
class Guest:
    client: Client
    player_id: str
    token: str
    resume_token: str


async def guest(node: Node, mode: str | None = None) -> Guest:
    client = await node.client()
    await client.send("auth.guest")
    token = (await client.expect("auth.token"))["payload"]["token"]
    connected = (await client.expect("session.connected"))["payload"]
    client.player_id = connected["player_id"]
    if mode is not None:
        await client.send("matchmaker.add", {"mode": mode})
        await client.expect("matchmaker.queued")
    return Guest(client, connected["player_id"], token, connected["resume_token"])


async def in_match(node: Node) -> tuple[Guest, str, int]:
    """A guest alone in a one-player match on `node`: the guest, the match id, and the last
    counter they saw."""
    player = await guest(node, "arena")
    matched = await player.client.expect("matchmaker.matched")
    [state] = await player.client.states(1)
    return player, matched["payload"]["match_id"], state["counter"]


async def listed(node: Node, client: Client, match_id: str, timeout: float = 5.0) -> dict:
    """Poll `match.list` on `node` until it lists `match_id`; returns the entry."""
    deadline = time.monotonic() + timeout
    while True:
        reply = await client.request("match.list", {"mode": "arena"})
        for entry in reply["payload"]["matches"]:
            if entry["match_id"] == match_id:
                return entry
        assert time.monotonic() < deadline, f"{node.node_id} never listed {match_id}"
        await asyncio.sleep(0.1)


async def redis_commands(cluster: Cluster) -> dict[str, int]:
    """Commands Redis has processed so far, per command name."""
    from redis.asyncio import Redis

    redis = Redis.from_url(cluster.redis.url)
    try:
        stats = await redis.info("commandstats")
        return {name: int(entry["calls"]) for name, entry in stats.items()}
    finally:
        await redis.aclose()


async def test_a_player_joins_a_match_on_another_node_by_redirect(cluster: Cluster) -> None:
    a = await cluster.start_node(FILES)
    b = await cluster.start_node(FILES)
    c = await cluster.start_node(FILES)
    host, match_id, _ = await in_match(a)

    joiner = await guest(b)
    entry = await listed(b, joiner.client, match_id)
    assert entry["players"] == [host.player_id] and entry["max_players"] == 2
    # Every node lists it; the node running it lists it once.
    assert (await listed(c, await c.player(), match_id))["players"] == [host.player_id]
    own = await a.player()
    matches = (await own.request("match.list"))["payload"]["matches"]
    assert [m["match_id"] for m in matches].count(match_id) == 1

    await joiner.client.send("match.join", {"match_id": match_id}, cid="j1")
    redirect = await joiner.client.expect("match.redirect")
    assert redirect["cid"] == "j1"
    assert redirect["payload"]["match_id"] == match_id
    assert redirect["payload"]["node_id"] == a.node_id and redirect["payload"]["node_url"] == a.url
    await b.wait_event("seat_redirected", player_id=joiner.player_id, why="join")
    # B seated nobody: the join runs on A when the player arrives.
    assert (await host.client.states(1))[0]  # the match runs on
    await joiner.client.close()

    started = time.monotonic()
    ws = await websockets.connect(redirect["payload"]["node_url"], max_size=2**22)
    moved = Metered(ws)
    a.clients.append(moved)
    await moved.send(
        "session.connect",
        {"token": joiner.token, "seat_token": redirect["payload"]["seat_token"]},
        cid="c1",
    )
    connected = await moved.expect("session.connected")
    assert connected["payload"]["player_id"] == joiner.player_id
    joined = await moved.expect("match.joined")
    joined_after = time.monotonic() - started
    assert joined["payload"]["match_id"] == match_id
    assert set(joined["payload"]["players"]) == {host.player_id, joiner.player_id}
    [state] = await moved.states(1)
    elapsed = time.monotonic() - started
    assert state["counter"] > 0
    handshake = len(ws.request.serialize()) + len(ws.response.serialize())  # type: ignore[union-attr]
    print(
        f"\nredirect (match.join): {moved.bytes} bytes ({handshake} of them the handshake), "
        f"{joined_after * 1000:.1f} ms to match.joined, {elapsed * 1000:.1f} ms to first state"
    )
    assert elapsed < 3.0
    await a.wait_event("player_joined", match_id=match_id, player_id=joiner.player_id)

    # The match's frames go to sockets on its node only: Redis sees the same periodic commands
    # (heartbeats, listings, the matchmaker's backstop) however many frames the match sends.  A
    # command sent per frame would show as one command name counted once per frame or more.
    before, frames_before = await redis_commands(cluster), time.monotonic()
    states = await moved.states(30) + await host.client.states(30)
    after = await redis_commands(cluster)
    window = time.monotonic() - frames_before
    per_name = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
    print(f"{len(states)} frames in {window:.2f} s: Redis commands (3 nodes) {per_name}")
    assert max(per_name.values(), default=0) < len(states) / 3, per_name


async def test_a_seat_token_that_is_forged_expired_or_not_yours_is_refused(
    cluster: Cluster,
) -> None:
    a = await cluster.start_node(FILES)
    b = await cluster.start_node(FILES)
    host, match_id, _ = await in_match(a)
    other = await guest(a)
    stranger = await guest(b)
    await stranger.client.close()
    tokens = SeatTokens(SECRET)
    refusals = {
        "forged": SeatTokens("another-secret-entirely-long-enough-32b").issue(
            stranger.player_id, match_id, a.node_id, join=True
        ),
        "expired": SeatTokens(SECRET, ttl_s=-5).issue(
            stranger.player_id, match_id, a.node_id, join=True
        ),
        "another player": tokens.issue(other.player_id, match_id, a.node_id, join=True),
        "another node": tokens.issue(stranger.player_id, match_id, b.node_id, join=True),
        "malformed": "not-a-jwt",
    }
    messages = {
        "forged": "seat token is not valid",
        "expired": "seat token has expired",
        "another player": "seat token is for another player",
        "another node": "seat token is for another node",
        "malformed": "seat token is not valid",
    }
    client = await a.client()
    for what, seat_token in refusals.items():
        await client.send(
            "session.connect", {"token": stranger.token, "seat_token": seat_token}, cid=what
        )
        error = await client.expect("error")
        assert error["cid"] == what
        assert error["payload"]["code"] == "invalid_seat", what
        assert messages[what] in error["payload"]["message"], (what, error)
        # The connection stays usable, and nobody was seated.
        await client.send("session.heartbeat", cid="hb")
        assert (await client.expect("session.heartbeat"))["cid"] == "hb"
        await a.wait_event("seat_refused", player_id=stranger.player_id)
    listing = await other.client.request("match.list")
    assert listing["payload"]["matches"][0]["players"] == [host.player_id]
    # The same connection still opens a session without a seat.
    await client.send("session.connect", {"token": stranger.token}, cid="plain")
    connected = await client.expect("session.connected")
    assert connected["payload"]["player_id"] == stranger.player_id
    assert connected["payload"]["resumed"] is False

    # A genuine join seat for a match that ended meanwhile: the session opens, the join says so.
    late = await guest(b)
    await late.client.close()
    seat = tokens.issue(late.player_id, "f" * 32, a.node_id, join=True)
    arriving = await a.client()
    await arriving.send("session.connect", {"token": late.token, "seat_token": seat}, cid="late")
    assert (await arriving.expect("session.connected"))["cid"] == "late"
    error = await arriving.expect("error")
    assert error["payload"]["code"] == "match_not_found" and "cid" not in error


async def test_a_reserved_seat_is_reclaimed_with_a_seat_token(cluster: Cluster) -> None:
    """The matchmaker's redirect: the match already lists the player and holds their seat (as
    for a dropped player); the seat token takes it like a resume, with no resume token."""
    a = await cluster.start_node(FILES)
    await cluster.start_node(FILES)
    player, match_id, counter = await in_match(a)
    await player.client.close()
    await a.wait_event("seat_held", player_id=player.player_id, match_id=match_id)
    seat = SeatTokens(SECRET).issue(player.player_id, match_id, a.node_id)
    client = await a.client()
    await client.send("session.connect", {"token": player.token, "seat_token": seat}, cid="s")
    connected = await client.expect("session.connected")
    assert connected["payload"]["resumed"] is True
    rejoined = await client.expect("match.rejoined")
    assert rejoined["payload"]["match_id"] == match_id
    [state] = await client.states(1)
    assert state["counter"] > counter  # the same match, still running


async def test_resume_on_the_wrong_node_is_redirected_and_the_match_continues(
    cluster: Cluster,
) -> None:
    a = await cluster.start_node(FILES)
    b = await cluster.start_node(FILES)
    player, match_id, counter = await in_match(a)
    assert player.resume_token.startswith(a.node_id + ".")
    await player.client.close()
    await a.wait_event("seat_held", player_id=player.player_id)

    wrong = await b.client()
    resume = {"token": player.token, "resume_token": player.resume_token}
    await wrong.send("session.connect", resume, cid="r1")
    redirect = await wrong.expect("session.redirect")
    assert redirect["cid"] == "r1"
    assert redirect["payload"] == {"node_id": a.node_id, "node_url": a.url}
    await b.wait_event("seat_redirected", player_id=player.player_id, why="resume")
    # No session was opened on B, and the connection stays usable.
    await wrong.send("match.list", cid="m")
    assert (await wrong.expect("error"))["payload"]["code"] == "unauthenticated"
    assert a.events("seat_released") == []  # B did not touch A's seat

    right = await websockets.connect(redirect["payload"]["node_url"])
    client = Client(right)
    a.clients.append(client)
    await client.send("session.connect", resume, cid="r2")
    connected = await client.expect("session.connected")
    assert connected["payload"]["resumed"] is True
    assert (await client.expect("match.rejoined"))["payload"]["match_id"] == match_id
    [state] = await client.states(1)
    assert state["counter"] > counter


async def test_resume_naming_a_killed_node_reports_the_match_lost(cluster: Cluster) -> None:
    a = await cluster.start_node(FILES)
    b = await cluster.start_node(FILES)
    player, _, _ = await in_match(b)
    b.kill9()
    await cluster.wait_nodes(a, {a.node_id}, timeout=10)

    client = await a.client()
    await client.send(
        "session.connect",
        {"token": player.token, "resume_token": player.resume_token},
        cid="r",
    )
    lost = await client.expect("error")
    assert lost["payload"]["code"] == "match_lost" and "cid" not in lost
    assert "stopped" in lost["payload"]["message"] and b.node_id in lost["payload"]["message"]
    connected = await client.expect("session.connected")
    assert connected["cid"] == "r" and connected["payload"]["resumed"] is False
    assert connected["payload"]["resume_token"].startswith(a.node_id + ".")
    await a.wait_event("seat_lost", player_id=player.player_id, node=b.node_id)
    # A fresh session that plays on.
    await client.send("matchmaker.add", {"mode": "arena"})
    await client.expect("matchmaker.queued")
    await client.expect("matchmaker.matched")


async def test_the_js_client_follows_match_and_session_redirects(
    cluster: Cluster, browser: Any
) -> None:
    """The JavaScript client in a real browser: `join` of a match on another node moves it
    there and resolves with `match.joined`; a resume sent to the wrong node follows the
    `session.redirect` and takes the seat back."""
    a = await cluster.start_node(FILES)
    b = await cluster.start_node(FILES)
    host, match_id, _ = await in_match(a)
    await listed(b, await b.player(), match_id)
    await browser.get(b.http + "/")
    result = await browser.js_async(
        """
        const { Asobi } = await import('/static/asobi.js');
        const [matchId] = args;
        const firstState = (c) => new Promise((r) => {
          const off = c.on('match.state', (s) => { off(); r(s); });
        });
        const c = new Asobi();
        const redirects = [];
        c.on('redirect', (p) => redirects.push(p.url));
        await c.guest();
        const listed = (await c.listMatches('arena')).matches.map((m) => m.match_id);
        const state = firstState(c);
        const joined = await c.join(matchId);
        const counter = (await state).counter;
        const moved = { url: c.url, matchId: c.matchId, connected: c.connected };
        // Resume through the wrong node: a second client on this page's node, with c's tokens.
        const d = new Asobi(undefined, { token: c.token, resumeToken: c.resumeToken });
        d.on('redirect', (p) => redirects.push(p.url));
        c.close();
        const rejoined = new Promise((r) => d.on('match.rejoined', r));
        const resumedState = firstState(d);
        await d.connect();
        return { listed, joined, counter, moved, redirects, resumed: { url: d.url,
                 rejoined: await rejoined, counter: (await resumedState).counter,
                 player: d.playerId, me: c.playerId } };
        """,
        match_id,
    )
    assert match_id in result["listed"]
    assert result["joined"]["match_id"] == match_id and len(result["joined"]["players"]) == 2
    assert result["moved"] == {"url": a.url, "matchId": match_id, "connected": True}
    assert result["counter"] > 0
    assert result["redirects"] == [a.url, a.url]
    resumed = result["resumed"]
    assert resumed["url"] == a.url and resumed["player"] == resumed["me"]
    assert resumed["rejoined"]["match_id"] == match_id
    assert resumed["counter"] > result["counter"]
    player = resumed["player"]
    await b.wait_event("seat_redirected", player_id=player, why="join")
    await b.wait_event("seat_redirected", player_id=player, why="resume")
    await a.wait_event("player_joined", match_id=match_id, player_id=player)
    assert a.events("seat_released") == []  # the seat carried over: nobody left the match
    players = (await host.client.request("match.list"))["payload"]["matches"][0]["players"]
    assert set(players) == {host.player_id, player}


async def test_a_server_running_alone_refuses_seat_tokens(start_server: Any) -> None:
    """No cluster, no seats by token: even a genuinely signed one is refused, clearly."""
    server = await start_server(FILES)
    client = await server.client()
    await client.send("auth.guest")
    token = (await client.expect("auth.token"))["payload"]["token"]
    connected = (await client.expect("session.connected"))["payload"]
    assert "." not in connected["resume_token"]  # a single node's token names no node
    await client.close()
    seat = SeatTokens(server.app.settings.secret).issue(connected["player_id"], "m", "local")
    again = await server.client()
    await again.send("session.connect", {"token": token, "seat_token": seat}, cid="s")
    error = await again.expect("error")
    assert error["cid"] == "s" and error["payload"]["code"] == "invalid_seat"
    assert "runs alone" in error["payload"]["message"]
    await again.send("session.connect", {"token": token}, cid="p")
    assert (await again.expect("session.connected"))["cid"] == "p"
