"""Leaderboards and global storage written on one node are read on every node within 1 s.

Real node processes on one Redis and one PostgreSQL schema; the writes come from a match script
(`tests.store_helpers.BANK`) on one node and are read on another node by a client
(`leaderboard.top`) and by that node's own match script.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson

from tests.cluster_support import Cluster, Node, needs_cluster
from tests.conftest import Client
from tests.store_helpers import BANK, bank_player, call, send_only

pytestmark = needs_cluster

FILES = {"bank.lua": BANK}
DEBUG = {"ASOBI_LOG_LEVEL": "debug"}  # `store_changes_heard` carries each notice's lag


async def until(
    probe: Callable[[], Awaitable[Any]], want: Any, timeout: float, every: float = 0.03
) -> float:
    """Seconds until `probe()` returns `want`; fails with the last answer after `timeout`.
    Probes `every` seconds at most: a connection may send 60 frames per second."""
    started = time.monotonic()
    while True:
        got = await probe()
        if got == want:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"still {got!r} after {timeout}s, expected {want!r}")
        await asyncio.sleep(every)


async def top(viewer: Client, board: str) -> list[dict[str, Any]]:
    reply = await viewer.request("leaderboard.top", {"board": board, "n": 10})
    entries: list[dict[str, Any]] = reply["payload"]["entries"]
    return entries


async def two_nodes(cluster: Cluster) -> tuple[Node, Node, Client, Client]:
    a = await cluster.start_node(FILES, env=DEBUG)
    b = await cluster.start_node(FILES, env=DEBUG)
    for node in (a, b):
        await node.wait_event("store_sync_listening")
    return a, b, await bank_player(a), await bank_player(b)


async def test_a_leaderboard_written_on_a_is_read_on_b_within_a_second(cluster: Cluster) -> None:
    a, b, on_a, on_b = await two_nodes(cluster)
    viewer = await b.player()
    assert await top(viewer, "arena") == []

    assert (await call(on_a, "submit", board="arena", pid="p1", score=500))["ok"]["improved"]
    entry = [{"rank": 1, "player_id": "p1", "score": 500}]
    assert await until(lambda: top(viewer, "arena"), entry, timeout=1.0) < 1.0
    # B's own match script reads it too, and ranks against it.
    assert await call(on_b, "top", board="arena", n=5) == {"ok": entry}
    assert await call(on_b, "submit", board="arena", pid="p1", score=400) == {
        "ok": {"best": 500, "improved": False}
    }
    assert (await call(on_b, "submit", board="arena", pid="p2", score=900))["ok"]["improved"]
    assert await until(
        lambda: call(on_a, "rank", board="arena", pid="p1"),
        {"ok": {"rank": 2, "score": 500, "total": 2}},
        timeout=1.0,
    )
    heard = await b.wait_event("store_changes_heard", sender=a.node_id)
    assert heard["scores"] == 1 and 0 <= heard["lag_ms"] < 1000


async def test_global_storage_written_on_a_is_read_on_b_within_a_second(cluster: Cluster) -> None:
    a, b, on_a, on_b = await two_nodes(cluster)
    assert await call(on_b, "get", collection="config", key="motd") == {}  # ok is nil

    await call(on_a, "set", collection="config", key="motd", value={"text": "hello"})
    waited = await until(
        lambda: call(on_b, "get", collection="config", key="motd"),
        {"ok": {"text": "hello"}},
        timeout=1.0,
    )
    assert waited < 1.0
    # A delete travels the same way, and so does a write the other way round.
    await call(on_a, "set", collection="config", key="motd", value=None)
    await until(lambda: call(on_b, "get", collection="config", key="motd"), {}, timeout=1.0)
    await call(on_b, "set", collection="config", key="season", value=7)
    await until(
        lambda: call(on_a, "get", collection="config", key="season"), {"ok": 7}, timeout=1.0
    )
    heard = await b.wait_event("store_changes_heard", sender=a.node_id)
    assert heard["keys"] == 1 and 0 <= heard["lag_ms"] < 1000


async def test_both_nodes_writing_the_same_entries_end_up_with_what_the_database_holds(
    cluster: Cluster,
) -> None:
    _, _, on_a, on_b = await two_nodes(cluster)
    # Interleaved writes of one key and one leaderboard entry from both nodes, unanswered.
    for i in range(10):  # 20 frames per connection, well under its 60 per second
        await send_only(on_a, "set", collection="race", key="k", value=f"a{i}")
        await send_only(on_b, "set", collection="race", key="k", value=f"b{i}")
        await send_only(on_a, "submit", board="race", pid="p1", score=100 + i)
        await send_only(on_b, "submit", board="race", pid="p1", score=200 - i)
    # The last answers of each node: everything before them is committed in its memory (and on
    # its way to the database, write-behind).
    await call(on_a, "get", collection="race", key="k")
    await call(on_b, "get", collection="race", key="k")

    conn = await asyncpg.connect(cluster.database_url)
    try:
        settled: list[Any] = []

        async def agreed() -> bool:
            """Both nodes read what the database holds for the key and for the entry."""
            stored = await conn.fetchval("SELECT value FROM storage WHERE key = 'k'")
            best = await conn.fetchval("SELECT score FROM leaderboard WHERE board = 'race'")
            want = ({"ok": orjson.loads(stored)}, {"ok": {"rank": 1, "score": best, "total": 1}})
            for client in (on_a, on_b):
                got = (
                    await call(client, "get", collection="race", key="k"),
                    await call(client, "rank", board="race", pid="p1"),
                )
                if got != want:
                    return False
            settled[:] = [stored, best]
            return True

        # Last writer wins, in the database's commit order: both nodes converge to its value;
        # the entry is the best of all submissions, from whichever node.
        await until(agreed, True, timeout=1.0, every=0.1)
        stored, best = settled
        assert best == 200
        assert stored in {f'"a{i}"' for i in range(10)} | {f'"b{i}"' for i in range(10)}
    finally:
        await conn.close()


async def test_a_node_that_lost_its_listening_connection_reads_everything_again(
    cluster: Cluster,
) -> None:
    a, b, _, on_b = await two_nodes(cluster)
    conn = await asyncpg.connect(cluster.database_url)
    try:
        # Rows no node announced: as if their notices had gone out while B was not listening.
        await conn.execute(
            "INSERT INTO storage (owner, collection, key, value, updated_at) "
            "VALUES ('', 'config', 'missed', '\"recovered\"', 0)"
        )
        await conn.execute(
            "INSERT INTO leaderboard (board, player_id, score, updated_at) "
            "VALUES ('arena', 'p9', 42, 0)"
        )
        assert await call(on_b, "get", collection="config", key="missed") == {}
        terminated = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1",
            f"asobi-store-sync:{b.node_id}",
        )
        assert terminated == 1
    finally:
        await conn.close()
    await b.wait_event("store_sync_lost", timeout=5)

    async def listened() -> int:
        return len(b.events("store_sync_listening"))

    await until(listened, 2, timeout=5)
    await until(
        lambda: call(on_b, "get", collection="config", key="missed"),
        {"ok": "recovered"},
        timeout=2.0,
    )
    assert await call(on_b, "top", board="arena", n=5) == {
        "ok": [{"rank": 1, "player_id": "p9", "score": 42}]
    }
    assert a.alive() and b.alive()


async def bank_guest(node: Node) -> tuple[Client, str, str]:
    """A guest in a bank match on `node`: the client, its token and its player id."""
    client = await node.client()
    await client.send("auth.guest")
    token = (await client.expect("auth.token"))["payload"]["token"]
    pid = (await client.expect("session.connected"))["payload"]["player_id"]
    await client.send("matchmaker.add", {"mode": "bank"})
    await client.expect("matchmaker.matched", skip=("matchmaker.queued",))
    return client, token, pid


async def reconnect_in_bank(node: Node, token: str) -> Client:
    client = await node.client()
    await client.send("session.connect", {"token": token})
    await client.expect("session.connected")
    await client.send("matchmaker.add", {"mode": "bank"})
    await client.expect("matchmaker.matched", skip=("matchmaker.queued",))
    return client


async def hold_wallet_row(conn: asyncpg.Connection, pid: str, seconds: float) -> asyncio.Task[None]:
    """Lock the player's wallet row for `seconds`: a node's write of it waits in its queue."""
    lock = conn.transaction()
    await lock.start()
    await conn.execute("SELECT 1 FROM wallets WHERE player_id = $1 FOR UPDATE", pid)

    async def let_go() -> None:
        await asyncio.sleep(seconds)
        await lock.rollback()

    return asyncio.create_task(let_go())


async def test_a_wallet_loads_on_the_new_node_only_after_the_old_one_wrote_it_out(
    cluster: Cluster,
) -> None:
    a = await cluster.start_node(FILES)
    b = await cluster.start_node(FILES)
    on_a, token, pid = await bank_guest(a)
    assert await call(on_a, "grant", amount=100) == {"ok": 100}
    conn = await asyncpg.connect(cluster.database_url)
    try:

        async def stored() -> Any:
            return await conn.fetchval("SELECT balance FROM wallets WHERE player_id = $1", pid)

        await until(stored, 100, timeout=2.0)
        releasing = await hold_wallet_row(conn, pid, 0.4)
        assert await call(on_a, "grant", amount=50) == {"ok": 150}  # in A's memory, not written
        # The same player opens a session on B: B's load must wait for A's queued grant.
        on_b = await reconnect_in_bank(b, token)
        assert await call(on_b, "balance") == {"ok": {"gold": 150}}
        await releasing
    finally:
        await conn.close()
    handed = await b.wait_event("player_handed_over", player_id=pid)
    assert handed["from_node"] == a.node_id and handed["waited_ms"] >= 300
    # A dropped its copy: one node at a time holds the wallet.
    assert (await call(on_a, "balance"))["error"] == "not_loaded"


async def test_a_handover_the_old_node_cannot_finish_delays_the_load_at_most_two_seconds(
    cluster: Cluster,
) -> None:
    a = await cluster.start_node(FILES)
    b = await cluster.start_node(FILES)
    on_a, token, pid = await bank_guest(a)
    assert await call(on_a, "grant", amount=100) == {"ok": 100}
    conn = await asyncpg.connect(cluster.database_url)
    try:

        async def stored() -> Any:
            return await conn.fetchval("SELECT balance FROM wallets WHERE player_id = $1", pid)

        await until(stored, 100, timeout=2.0)
        releasing = await hold_wallet_row(conn, pid, 4.0)  # longer than A may take to answer
        await call(on_a, "grant", amount=50)
        started = time.monotonic()
        on_b = await reconnect_in_bank(b, token)
        assert "ok" in await call(on_b, "balance")
        assert time.monotonic() - started < 2.0 + 1.0  # the bound, plus a busy machine's slack
        failed = await b.wait_event("player_handover_failed", player_id=pid)
        assert a.node_id in failed["error"]
        await releasing
        await until(stored, 150, timeout=2.0)  # A's grant is written once the row is free
    finally:
        await conn.close()
