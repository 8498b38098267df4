"""One matchmaker for the cluster: players queued on different nodes meet, on the node holding
most of them; a ticket never makes two matches; expiry and remove work whichever node asks."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from tests.cluster_support import Cluster, Node, needs_cluster
from tests.conftest import Client

pytestmark = needs_cluster


def game(size: int) -> dict[str, str]:
    return {
        "match.lua": f"""
match_size = {size}
max_players = {size}
function init(state) state.n = 0 return state end
function join(state, player_id) return state end
function tick(state) state.n = state.n + 1 return state end
function get_state(state, player_id) return {{ n = state.n }} end
"""
    }


async def guest(node: Node) -> tuple[Client, str]:
    """A logged-in guest on `node` and their token (to reconnect elsewhere)."""
    client = await node.client()
    await client.send("auth.guest")
    token = (await client.expect("auth.token"))["payload"]["token"]
    connected = await client.expect("session.connected")
    client.player_id = connected["payload"]["player_id"]
    return client, token


async def queue(client: Client, mode: str = "duel") -> str:
    await client.send("matchmaker.add", {"mode": mode})
    return str((await client.expect("matchmaker.queued"))["payload"]["ticket_id"])


async def matched(client: Client, timeout: float = 10.0) -> dict[str, Any]:
    frame = await client.expect("matchmaker.matched", timeout=timeout, skip=("matchmaker.queued",))
    return dict(frame["payload"])


async def test_players_on_two_nodes_meet_on_the_node_holding_most_of_them(
    cluster: Cluster,
) -> None:
    a = await cluster.start_node(game(3))
    b = await cluster.start_node(game(3))
    await cluster.wait_nodes(a, {a.node_id, b.node_id})
    b1, _ = await guest(b)
    b2, _ = await guest(b)
    a1, _ = await guest(a)
    await queue(b1)
    await queue(a1)  # the last ticket arrives on the minority node: it forms, B places
    await queue(b2)

    remote = await matched(a1)
    assert remote["node_id"] == b.node_id and remote["node_url"] == b.url
    assert isinstance(remote["seat_token"], str) and remote["seat_token"]
    for local in (b1, b2):
        seen = await matched(local)
        assert seen["match_id"] == remote["match_id"]
        assert "node_url" not in seen and "seat_token" not in seen
        assert (await local.states(1))[0]["n"] >= 1  # the match ticks on B
    started = await b.wait_event("match_started", match_id=remote["match_id"])
    assert set(started["players"]) == {a1.player_id, b1.player_id, b2.player_id}
    assert sorted(remote["players"]) == sorted(started["players"])
    assert not a.events("match_started")  # nothing started on A
    await b.wait_event("matched", match_id=remote["match_id"], node=b.node_id)


async def test_players_on_two_nodes_meet_after_redirect(cluster: Cluster) -> None:
    """The full flow, redirect included: the player whose match runs on the other node
    reconnects there with their seat token and plays.  Needs `session.connect {seat_token}`
    honoured by the match's node (the cluster's redirect, built beside the matchmaker)."""
    a = await cluster.start_node(game(2))
    b = await cluster.start_node(game(2))
    await cluster.wait_nodes(a, {a.node_id, b.node_id})
    a1, a1_token = await guest(a)
    b1, b1_token = await guest(b)
    await queue(a1)
    await queue(b1)
    seen = {a.node_id: await matched(a1), b.node_id: await matched(b1)}
    assert seen[a.node_id]["match_id"] == seen[b.node_id]["match_id"]
    # One player each: the tie goes to the least loaded node; the other player moves there.
    movers = [n for n, m in seen.items() if "seat_token" in m]
    assert len(movers) == 1, seen
    home = movers[0]
    moved = seen[home]
    target = a if moved["node_id"] == a.node_id else b
    assert target.node_id != home and moved["node_url"] == target.url
    token = a1_token if home == a.node_id else b1_token
    client = await target.client()
    await client.send("session.connect", {"token": token, "seat_token": moved["seat_token"]})
    await client.expect("session.connected")
    rejoined = await client.expect("match.rejoined")
    assert rejoined["payload"]["match_id"] == moved["match_id"]
    assert len(await client.states(2)) == 2


async def test_every_player_racing_on_three_nodes_is_matched_exactly_once(
    cluster: Cluster,
) -> None:
    nodes = [await cluster.start_node(game(2)) for _ in range(3)]
    everyone = {n.node_id for n in nodes}
    for node in nodes:
        await cluster.wait_nodes(node, everyone)
    players = [await nodes[i % 3].player() for i in range(30)]
    random.shuffle(players)
    await asyncio.gather(*(p.send("matchmaker.add", {"mode": "duel"}) for p in players))
    results = await asyncio.gather(*(matched(p, timeout=20) for p in players))
    by_match: dict[str, list[str]] = {}
    for player, result in zip(players, results, strict=True):
        assert player.player_id in result["players"]
        by_match.setdefault(result["match_id"], []).append(str(player.player_id))
    assert len(by_match) == 15 and all(len(v) == 2 for v in by_match.values())
    # Every match started exactly once, somewhere, and no player sits in two.
    started = [e for n in nodes for e in n.events("match_started")]
    assert sorted(e["match_id"] for e in started) == sorted(by_match)
    seated = [p for e in started for p in e["players"]]
    assert len(seated) == len(set(seated)) == 30


async def test_expiry_and_remove_work_cluster_wide(cluster: Cluster) -> None:
    a = await cluster.start_node(game(2), env={"ASOBI_TICKET_TTL_S": "1.5"})
    b = await cluster.start_node(game(2), env={"ASOBI_TICKET_TTL_S": "60"})
    await cluster.wait_nodes(a, {a.node_id, b.node_id})
    # A ticket queued on A expires on A's time to live, and never pairs with a later one.
    early, _ = await guest(a)
    ticket = await queue(early)
    expired = await early.expect("matchmaker.expired", timeout=6)
    assert expired["payload"] == {"ticket_id": ticket, "mode": "duel"}
    await a.wait_event("ticket_expired", ticket_id=ticket)
    # A removed ticket leaves the cluster's queue: B's next player waits alone.
    leaving, _ = await guest(a)
    gone = await queue(leaving)
    await leaving.send("matchmaker.remove", {"ticket_id": gone})
    assert (await leaving.expect("matchmaker.removed"))["payload"]["removed"] is True
    lonely, _ = await guest(b)
    await queue(lonely)
    # The next player pairs with the one live ticket, not the expired or the removed one.
    partner, _ = await guest(b)
    await queue(partner)
    pair = await matched(partner)
    assert sorted(pair["players"]) == sorted([partner.player_id, lonely.player_id])
    assert (await matched(lonely))["match_id"] == pair["match_id"]
