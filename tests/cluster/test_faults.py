"""Matchmaking through faults: a node killed with -9, a group whose former died before placing
it, Redis restarted under running matches."""

from __future__ import annotations

import asyncio
import time

from asobi.cluster.forming import NODE_PREFIX, PREFIX, SOURCE
from tests.cluster.test_matchmaking import game, guest, matched, queue
from tests.cluster_support import Cluster, needs_cluster

pytestmark = needs_cluster


async def test_a_killed_node_s_tickets_are_dropped_and_the_others_still_play(
    cluster: Cluster,
) -> None:
    a = await cluster.start_node(game(4))
    b = await cluster.start_node(game(4))
    c = await cluster.start_node(game(4))
    for node in (a, b, c):
        await cluster.wait_nodes(node, {a.node_id, b.node_id, c.node_id})
    a1, _ = await guest(a)
    c1, _ = await guest(c)
    c2, _ = await guest(c)
    for client in (a1, c1, c2):
        await queue(client)
    await in_redis(cluster, c.node_id, 2)  # C's writes went out before it dies
    c.kill9()
    await a.wait_event("node_gone", node_id=c.node_id, timeout=10)
    dropped = [e for n in (a, b) for e in n.events("tickets_dropped") if e["node"] == c.node_id]
    deadline = time.monotonic() + 5
    while not dropped and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        dropped = [e for n in (a, b) for e in n.events("tickets_dropped") if e["node"] == c.node_id]
    assert dropped and sum(e["tickets"] for e in dropped) == 2
    # A's ticket was not lost: three players on B complete its group, without C's players.
    others = [(await guest(b))[0] for _ in range(3)]
    for client in others:
        await queue(client)
    result = await matched(a1)
    expected = {a1.player_id, *(o.player_id for o in others)}
    assert set(result["players"]) == expected
    assert result["node_id"] == b.node_id  # three of the four are B's
    for client in others:
        assert set((await matched(client))["players"]) == expected


async def in_redis(cluster: Cluster, node_id: str, tickets: int) -> None:
    """Wait until Redis holds `tickets` tickets of the node's players."""
    from redis.asyncio import Redis

    redis = Redis.from_url(cluster.redis.url)
    try:
        deadline = time.monotonic() + 5
        while await redis.zcard(f"{PREFIX}n:{node_id}") != tickets:
            assert time.monotonic() < deadline, "the tickets never reached Redis"
            await asyncio.sleep(0.02)
    finally:
        await redis.aclose()


async def test_a_group_whose_former_died_before_placing_it_is_handed_back_and_played(
    cluster: Cluster,
) -> None:
    """A node that forms a group and dies before placing it is played here by this test: it
    queues two connected players (as their nodes would) and forms their group under a node id
    that never places it.  The lease runs out; a live node hands the group back; it plays."""
    from redis.asyncio import Redis

    a = await cluster.start_node(game(2))
    b = await cluster.start_node(game(2))
    await cluster.wait_nodes(a, {a.node_id, b.node_id})
    a1, _ = await guest(a)
    b1, _ = await guest(b)
    redis = Redis.from_url(cluster.redis.url)
    try:
        script = redis.register_script(SOURCE)
        await redis.script_load(SOURCE)
        async with redis.pipeline(transaction=True) as pipe:  # nodes cannot form in between
            for node, client in ((a, a1), (b, b1)):
                args = ["add", PREFIX, NODE_PREFIX, f"t-{client.player_id}", client.player_id]
                await script(keys=[], args=[*args, "duel", node.node_id, 60_000], client=pipe)
            args = ["form", PREFIX, NODE_PREFIX, "duel", 2, 1, 1000, "ghost"]
            await script(keys=[], args=args, client=pipe)
            replies = await pipe.execute()
        assert len(replies[2]) == 3, replies  # depth, oldest, one group leased to "ghost"
        started = time.monotonic()
        first = await matched(a1, timeout=10)
        handed = [e for n in (a, b) for e in n.events("group_handed_back")]
        assert [(e["former"], e["back"]) for e in handed] == [("ghost", 2)]
        assert time.monotonic() - started >= 0.5  # not before the lease ran out
        second = await matched(b1)
        assert first["match_id"] == second["match_id"]
        assert set(first["players"]) == {a1.player_id, b1.player_id}
        # The placing node marks the group done right after telling the players.
        deadline = time.monotonic() + 2
        while await redis.zcard(PREFIX + "leases") != 0:
            assert time.monotonic() < deadline, "the placed group's lease was never released"
            await asyncio.sleep(0.02)
    finally:
        await redis.aclose()


async def test_redis_restart_matches_keep_ticking_and_matchmaking_recovers(
    cluster: Cluster,
) -> None:
    a = await cluster.start_node(game(2))
    b = await cluster.start_node(game(2))
    await cluster.wait_nodes(a, {a.node_id, b.node_id})
    p1, _ = await guest(a)
    p2, _ = await guest(a)
    await queue(p1)
    await queue(p2)
    match_id = (await matched(p1))["match_id"]
    assert (await matched(p2))["match_id"] == match_id
    waiting, _ = await guest(b)
    await queue(waiting)

    cluster.redis.stop()
    await b.wait_event("redis_down", timeout=10)
    lost = await waiting.expect("error", timeout=5, skip=("matchmaker.queued",))
    assert lost["payload"]["code"] == "unavailable"
    asked = time.monotonic()
    await waiting.send("matchmaker.add", {"mode": "duel"}, cid="down")
    refused = await waiting.expect("error")
    assert refused["payload"]["code"] == "unavailable" and refused["cid"] == "down"
    assert time.monotonic() - asked < 1.0  # at once, not after a Redis timeout
    # The match on A ticks on through the outage.
    before = (await p1.states(1))[0]["n"]
    after = (await p1.states(10, timeout=5))[-1]["n"]
    assert after >= before + 9

    cluster.redis.socket.unlink(missing_ok=True)
    cluster.redis.start()
    await b.wait_event("redis_up", timeout=10)
    await a.wait_event("redis_up", timeout=10)
    # Recovered by itself: a new pair forms across the two nodes.
    deadline = time.monotonic() + 10
    while True:
        await waiting.send("matchmaker.add", {"mode": "duel"}, cid="again")
        reply = await waiting.recv()
        if reply["type"] == "matchmaker.queued":
            break
        assert reply["payload"]["code"] == "unavailable" and time.monotonic() < deadline, reply
        await asyncio.sleep(0.2)
    partner, _ = await guest(a)
    await queue(partner)
    pair = await matched(partner)
    assert set(pair["players"]) == {partner.player_id, waiting.player_id}
    assert (await matched(waiting))["match_id"] == pair["match_id"]
    assert (await p1.states(1))[0]["n"] > after
    # Redis came back empty, yet no node took the other for dead: both re-beat within the TTL.
    await asyncio.sleep(a_ttl := 5.5)
    for node, other in ((a, b), (b, a)):
        assert not [e for e in node.events("node_gone") if e["node_id"] == other.node_id], a_ttl
    await a.wait_event("redis_reset_seen")
