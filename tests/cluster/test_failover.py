"""Matches that outlive their node: a drained node hands its matches over with no tick lost or
repeated; a node killed with -9 has its matches restarted elsewhere from their snapshots, and
their players resume with their tokens through any node; no tick grants twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from tests.cluster.test_matchmaking import guest, matched, queue
from tests.cluster_support import Cluster, Node, needs_cluster
from tests.conftest import Client
from tests.test_durability_crash import _ledger_reasons

pytestmark = needs_cluster

ADMIN_TOKEN = "drain-test-admin-token"
GRANTING = """\
match_size = 2
max_players = 4
tick_rate = 20

function init(state)
  state.counter = 0
  return state
end
function join(state, player_id) return state end
function tick(state)
  state.counter = state.counter + 1
  -- One grant per tick, named after its tick: a tick granting twice shows up twice.
  local pid = game.players()[1]
  if pid then game.economy.grant(pid, "gold", 1, "t" .. game.tick()) end
  return state
end
function get_state(state, player_id)
  return { counter = state.counter, tick = game.tick() }
end
"""
ENV = {"ASOBI_ADMIN_TOKEN": ADMIN_TOKEN, "ASOBI_SNAPSHOT_TICKS": "15"}


async def _pair(node: Node) -> tuple[list[tuple[Client, str]], str]:
    """Two players on `node` matched together there; ([(client, token)], match id)."""
    players = [await guest(node), await guest(node)]
    for client, _ in players:
        await queue(client, "default")
    ids = {(await matched(client))["match_id"] for client, _ in players}
    assert len(ids) == 1
    return players, ids.pop()


async def _until(client: Client, kind: str, timeout: float = 15.0) -> tuple[list[int], dict]:
    """The counters of the state frames before the first `kind` frame, and its payload."""
    counters: list[int] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        frame = await client.recv(max(deadline - asyncio.get_running_loop().time(), 0.01))
        if frame["type"] == "match.state":
            counters.append(frame["payload"]["counter"])
        elif frame["type"] == kind:
            return counters, frame["payload"]


def _drain(node: Node) -> subprocess.CompletedProcess[str]:
    """`asobi drain` against `node`, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "asobi", "drain", "--url", node.http],
        env={**os.environ, "ASOBI_ADMIN_TOKEN": ADMIN_TOKEN},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def _resume(node: Node, token: str, **extra: Any) -> tuple[Client, dict[str, Any]]:
    client = await node.client()
    await client.send("session.connect", {"token": token, **extra})
    connected = await client.expect("session.connected")
    return client, connected["payload"]


def _granted_ticks(reasons: list[str]) -> list[int]:
    return [int(r[1:]) for r in reasons if r.startswith("t")]


async def _match_grants(cluster: Cluster, players: list[tuple[Client, str]]) -> list[int]:
    """The ticks granted to either player of the match.  `tick` grants to the first of
    game.players(): which of the two that is follows the order their matchmaker tickets (and,
    after a move, their arrivals) were handled in, which the test does not fix."""
    ticks: list[int] = []
    for client, _ in players:
        assert client.player_id is not None
        reasons = await _ledger_reasons(cluster.root, cluster.database_url, client.player_id)
        ticks += _granted_ticks(reasons)
    return ticks


@pytest.mark.parametrize("how", ["asobi drain", "SIGTERM"])
async def test_drain_moves_a_two_player_match_with_no_tick_skipped_or_repeated(
    cluster: Cluster, how: str
) -> None:
    a = await cluster.start_node({"match.lua": GRANTING}, env=ENV)
    b = await cluster.start_node({"match.lua": GRANTING}, env=ENV)
    await cluster.wait_nodes(a, {a.node_id, b.node_id})
    players, match_id = await _pair(a)
    seen = [[s["counter"] for s in await client.states(5)] for client, _ in players]

    if how == "SIGTERM":
        a.process.send_signal(signal.SIGTERM)
    else:
        drained = asyncio.create_task(asyncio.to_thread(_drain, a))
    before: list[list[int]] = []
    resumed: list[Client] = []
    for n, (client, token) in enumerate(players):
        counters, moved = await _until(client, "match.moved")
        if n == 1:
            await asyncio.sleep(0.3)  # a slow client: the match waits for it, up to 2 s
        assert moved["match_id"] == match_id
        assert (moved["node_id"], moved["node_url"]) == (b.node_id, b.url)
        before.append(seen[n] + counters)
        again, connected = await _resume(b, token, seat_token=moved["seat_token"])
        assert connected["resumed"] is True
        rejoined = await again.expect("match.rejoined")
        assert rejoined["payload"]["match_id"] == match_id
        resumed.append(again)
    if how == "SIGTERM":
        await asyncio.to_thread(a.process.wait, 20)
    else:
        done = await drained
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"moved 1 matches to {b.node_id}" in done.stdout

    stopped_at = (await a.wait_event("match_moved", match_id=match_id))["tick"]
    for counters, again in zip(before, resumed, strict=True):
        after = [s["counter"] for s in await again.states(10)]
        # The last frame from A is the tick the match stopped at; B's first is the next one.
        assert counters[-1] == stopped_at
        assert after == list(range(stopped_at + 1, stopped_at + 11))
    taken = await b.wait_event("match_taken", match_id=match_id)
    assert taken["tick"] == stopped_at and taken["from_node"] == a.node_id
    assert not a.events("match_finished")  # moved, not ended

    # Every tick granted once, on A up to the move and on B after it.
    ticks = await _match_grants(cluster, players)
    assert len(ticks) == len(set(ticks))
    assert set(range(1, stopped_at + 6)) <= set(ticks)


async def _rest(client: Client, quiet_s: float = 0.5) -> list[dict[str, Any]]:
    """Every frame the connection still gets until it falls quiet."""
    frames = []
    while True:
        try:
            frames.append(await client.recv(quiet_s))
        except TimeoutError:
            return frames


async def test_players_sent_ahead_switch_nodes_between_two_ticks(cluster: Cluster) -> None:
    """Make before break: on `match.moving` each player opens a second connection to the taking
    node and keeps the first; the first carries the match up to its last tick here, the second
    from the next tick on; nothing more (no `match.moved`) reaches the first."""
    a = await cluster.start_node({"match.lua": GRANTING}, env=ENV)
    b = await cluster.start_node({"match.lua": GRANTING}, env=ENV)
    await cluster.wait_nodes(a, {a.node_id, b.node_id})
    players, match_id = await _pair(a)
    for client, _ in players:
        await client.states(5)

    drained = asyncio.create_task(asyncio.to_thread(_drain, a))
    old_counters: list[list[int]] = []
    ahead: list[Client] = []
    for client, token in players:
        counters, moving = await _until(client, "match.moving")
        assert (moving["match_id"], moving["node_id"], moving["node_url"]) == (
            match_id,
            b.node_id,
            b.url,
        )
        old_counters.append(counters)
        second, connected = await _resume(b, token, seat_token=moving["seat_token"])
        assert connected["player_id"] == client.player_id
        ahead.append(second)
    for n, ((client, _), second) in enumerate(zip(players, ahead, strict=True)):
        rejoined = await second.expect("match.rejoined", timeout=10)
        assert rejoined["payload"]["match_id"] == match_id
        after = [s["counter"] for s in await second.states(10)]
        rest = await _rest(client)
        assert not [f for f in rest if f["type"] != "match.state"], rest
        old_counters[n] += [f["payload"]["counter"] for f in rest]
        before = old_counters[n]
        # One tick after another, whichever connection brought it.
        assert before == list(range(before[0], before[-1] + 1))
        assert after == list(range(before[-1] + 1, before[-1] + 11))
    done = await drained
    assert done.returncode == 0, done.stdout + done.stderr
    stopped_at = (await a.wait_event("match_moved", match_id=match_id))["tick"]
    assert all(counters[-1] == stopped_at for counters in old_counters)
    taken = await b.wait_event("match_taken", match_id=match_id)
    assert (taken["ahead"], taken["late"]) == (2, 0)
    assert not b.events("match_started_without_players")


async def test_the_js_client_switches_nodes_on_match_moving(cluster: Cluster, browser: Any) -> None:
    """The JavaScript client in a real browser: on `match.moving` it opens a socket to the
    taking node ahead of the cut and switches to it when the match arrives; its players see
    every tick once, in order, and the taking node seats both without a `match.moved`."""
    a = await cluster.start_node({"match.lua": GRANTING}, env=ENV)
    b = await cluster.start_node({"match.lua": GRANTING}, env=ENV)
    await cluster.wait_nodes(a, {a.node_id, b.node_id})
    await browser.get(a.http + "/")
    await browser.js_async(
        """
        const { Asobi } = await import('/static/asobi.js');
        window.seen = [[], []];
        window.redirects = [];
        window.clients = [];
        for (const n of [0, 1]) {
          const c = new Asobi();
          c.on('match.state', (s) => window.seen[n].push(s.counter));
          c.on('redirect', (p) => window.redirects.push(p.url));
          c.on('match.moved', () => window.redirects.push('match.moved'));
          await c.guest();
          window.clients.push(c);
        }
        await Promise.all(window.clients.map((c) => c.queue('default')));
        """
    )
    await browser.wait("return window.seen[0].length > 5 && window.seen[1].length > 5")
    done = await asyncio.to_thread(_drain, a)
    assert done.returncode == 0, done.stdout + done.stderr
    match_id = a.events("match_moved")[0]["match_id"]
    stopped_at = (await a.wait_event("match_moved", match_id=match_id))["tick"]
    await browser.wait(
        "return window.seen.every((s) => s[s.length - 1] >= arguments[0])", stopped_at + 10
    )
    seen = await browser.js("return window.seen")
    for counters in seen:
        assert stopped_at in counters and stopped_at + 1 in counters
        assert counters == list(range(counters[0], counters[-1] + 1))  # none skipped or repeated
    assert await browser.js("return window.redirects") == [b.url, b.url]
    assert await browser.js("return window.clients.map((c) => c.url)") == [b.url, b.url]
    taken = await b.wait_event("match_taken", match_id=match_id)
    assert (taken["ahead"], taken["late"]) == (2, 0)
    await browser.js("window.clients.forEach((c) => c.close())")


async def test_kill_9_failover_restores_the_match_elsewhere_and_the_token_leads_there(
    cluster: Cluster,
) -> None:
    a = await cluster.start_node({"match.lua": GRANTING}, env=ENV)
    b = await cluster.start_node({"match.lua": GRANTING}, env=ENV)
    c = await cluster.start_node({"match.lua": GRANTING}, env=ENV)
    for node in (a, b, c):
        await cluster.wait_nodes(node, {a.node_id, b.node_id, c.node_id})
    players, match_id = await _pair(a)
    resume_tokens = []
    for client, _ in players:
        await client.states(40, timeout=10)
    for client, token in players:  # a fresh resume token each, as after a reconnect
        await client.send("session.connect", {"token": token})
        resume_tokens.append((await client.expect("session.connected"))["payload"]["resume_token"])
    await players[0][0].states(20)  # a snapshot with these tokens is in Redis
    seen = (await players[0][0].states(1))[0]["counter"]
    a.kill9()
    # What A wrote before it died (the adopter writes only after the TTL).
    written = await _match_grants(cluster, players)

    adopters = await _adopter(b, c, match_id)
    adopter = adopters[0]
    assert len(adopters) == 1
    other = c if adopter is b else b
    restored = await adopter.wait_event("match_restored", match_id=match_id)
    snapshot_tick = restored["tick"]
    assert seen - 20 <= snapshot_tick <= seen
    assert restored["lost_ticks"] == max(written) - snapshot_tick >= seen - snapshot_tick - 2

    # The first player comes back through the node that did not adopt the match: sent on.
    (_, token), resume = players[0], resume_tokens[0]
    via, payload = await _connect_or_redirect(other, token, resume)
    assert payload == {"node_id": adopter.node_id, "node_url": adopter.url}
    await via.close()
    again, connected = await _resume(adopter, token, resume_token=resume)
    assert connected["resumed"] is True
    notice = (await again.expect("match.restored"))["payload"]
    assert notice == {
        "match_id": match_id,
        "tick": snapshot_tick,
        "lost_ticks": restored["lost_ticks"],
    }
    await again.expect("match.rejoined")
    states = await again.states(10)
    counters = [s["counter"] for s in states]
    assert counters[0] == states[0]["tick"] > snapshot_tick
    assert counters == list(range(counters[0], counters[0] + 10))

    # No tick granted twice: the re-run ticks up to the last written one were skipped.
    await asyncio.sleep(0.5)
    ticks = await _match_grants(cluster, players)
    assert len(ticks) == len(set(ticks))
    assert set(range(1, counters[-1] - 5)) <= set(ticks)
    skipped = adopter.events("unit_skipped")
    assert len(skipped) == restored["lost_ticks"]


async def _adopter(b: Node, c: Node, match_id: str) -> list[Node]:
    """The node(s) that adopted the match (waits up to the TTL plus a few beats)."""
    deadline = asyncio.get_running_loop().time() + 15
    while asyncio.get_running_loop().time() < deadline:
        found = [
            n for n in (b, c) if any(e["match_id"] == match_id for e in n.events("match_adopted"))
        ]
        if found:
            await asyncio.sleep(3)  # past the sweep: a second adopter would show by now
            return [n for n in (b, c) if n.events("match_adopted")]
        await asyncio.sleep(0.05)
    raise AssertionError("no node adopted the match")


async def _connect_or_redirect(node: Node, token: str, resume: str) -> tuple[Client, dict]:
    client = await node.client()
    await client.send("session.connect", {"token": token, "resume_token": resume})
    frame = await client.expect("session.redirect")
    return client, frame["payload"]


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
async def test_a_node_starting_adopts_the_matches_of_a_node_that_ran_alone(
    cluster: Cluster, how: str
) -> None:
    """Nobody saw A go (it ran alone).  Killed, it is still in the heartbeat index without a
    heartbeat: B's first beat reports it gone.  Stopped (no node to drain to: its matches stay
    in the journal), it left the index: B finds its journal when it starts."""
    a = await cluster.start_node({"match.lua": GRANTING}, env=ENV)
    players, match_id = await _pair(a)
    (client, token), _ = players
    await client.send("session.connect", {"token": token})
    resume = (await client.expect("session.connected"))["payload"]["resume_token"]
    await client.states(20)  # a snapshot holding that token is in Redis
    if how == "SIGTERM":
        await a.stop()
        assert a.events("drain_refused")[0]["reason"] == "no other live node"
    else:
        a.kill9()
        await asyncio.sleep(5.5)  # A's heartbeat expired: B never sees it alive

    b = await cluster.start_node({"match.lua": GRANTING}, env=ENV)
    adopted = await b.wait_event("match_adopted", match_id=match_id)
    assert adopted["from_node"] == a.node_id
    again, connected = await _resume(b, token, resume_token=resume)
    assert connected["resumed"] is True
    notice = (await again.expect("match.restored"))["payload"]
    assert notice["match_id"] == match_id and notice["tick"] == adopted["tick"]
    await again.expect("match.rejoined")
    counters = [s["counter"] for s in await again.states(5)]
    assert counters[0] > adopted["tick"]
    assert counters == list(range(counters[0], counters[0] + 5))
    if how == "SIGTERM":  # a clean stop snapshotted every match: nothing lost
        assert notice["lost_ticks"] == 0
        assert not b.events("node_gone")


async def _marks(database_url: str, match_id: str) -> int:
    import asyncpg

    from tests.test_durability_crash import _path

    url, settings = database_url.split("?")[0], _path(database_url)
    conn = await asyncpg.connect(url, server_settings=settings)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM match_marks WHERE match_id = $1", match_id)
        )
    finally:
        await conn.close()


async def test_a_match_that_ends_leaves_no_exactly_once_mark_behind(cluster: Cluster) -> None:
    """The journal is in Redis, the exactly-once marks in the database: when a match ends, both
    go (the marks table would otherwise grow by a row per match ever played)."""
    node = await cluster.start_node({"match.lua": GRANTING}, env=ENV)
    players, match_id = await _pair(node)
    await players[0][0].states(5)
    deadline = asyncio.get_running_loop().time() + 5
    while await _marks(cluster.database_url, match_id) == 0:
        assert asyncio.get_running_loop().time() < deadline, "no mark was written"
        await asyncio.sleep(0.1)
    for client, _ in players:
        await client.send("match.leave")
    await node.wait_event("match_finished", match_id=match_id)
    deadline = asyncio.get_running_loop().time() + 5
    while await _marks(cluster.database_url, match_id) != 0:
        assert asyncio.get_running_loop().time() < deadline, "the ended match's mark stayed"
        await asyncio.sleep(0.1)
