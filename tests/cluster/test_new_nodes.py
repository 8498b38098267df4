"""A node started since another node's last heartbeat read is alive but not listed there yet:
placement and the wallet handover must not take it for dead (real node listings, real Redis)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from asobi.cluster import nodes as nodes_module
from asobi.cluster.forming import Group, QueuedTicket
from asobi.cluster.link import RedisLink
from asobi.cluster.nodes import NodeDirectory
from asobi.cluster.placement import choose_node
from asobi.cluster.wallets import WalletHandover, holder_key
from tests.cluster_support import REDIS_BIN, RedisServer

pytestmark = pytest.mark.skipif(REDIS_BIN is None, reason="needs redis-server")


def group_of(*homes: str) -> Group:
    tickets = [
        QueuedTicket(f"t{i}", f"p{i}", "solo", home, 0.0, 0.0) for i, home in enumerate(homes)
    ]
    return Group("g1", "solo", "a", tickets)


async def test_a_group_goes_to_its_players_node_even_when_that_node_started_since_the_last_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    links = {n: RedisLink(redis.url, n) for n in ("a", "b", "d")}
    load = {"matches": 0.0, "players": 0.0}
    a, b, d = (
        NodeDirectory(links[n], f"ws://{n}", lambda: load, ttl_s=ttl)
        for n, ttl in (("a", 5.0), ("b", 5.0), ("d", 0.4))
    )
    try:
        await b.beat()
        await a.beat()
        await d.beat()  # d is in Redis now, but not yet in a's listing
        assert set(a.nodes) == {"a", "b"}

        assert choose_node(group_of("d"), a) == "d"
        assert choose_node(group_of("d", "d", "b"), a) == "d"
        assert choose_node(group_of("b", "b", "d"), a) == "b"

        # d stops beating: once a has seen it go, its players' group goes to a live node.
        await a.beat()
        assert set(a.nodes) == {"a", "b", "d"}
        await asyncio.sleep(0.6)
        await a.beat()
        assert a.seen_gone("d")
        assert choose_node(group_of("d"), a) in {"a", "b"}
        assert choose_node(group_of("d", "d", "b"), a) == "b"

        # d back under the same id: listed again, and its players' groups go to it again.
        await d.beat()
        await a.beat()
        assert not a.seen_gone("d")
        assert choose_node(group_of("d"), a) == "d"

        # Gone again, and forgotten once GONE_KEPT_S passed (ids of old processes do not pile up).
        await asyncio.sleep(0.6)
        await a.beat()
        assert a.seen_gone("d")
        monkeypatch.setattr(nodes_module, "GONE_KEPT_S", 0.2)
        await asyncio.sleep(0.3)
        await a.beat()
        assert not a.seen_gone("d")
    finally:
        for link in links.values():
            await link.stop()
        redis.stop()


async def test_a_wallet_held_by_a_node_not_listed_yet_is_handed_over_by_it(tmp_path: Path) -> None:
    """The previous holder started after this node's last read: it is asked to write its queued
    data out before the load goes ahead; a holder whose heartbeat is gone is not waited for."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    links = {n: RedisLink(redis.url, n) for n in ("a", "d")}
    load = {"matches": 0.0, "players": 0.0}
    a, d = (NodeDirectory(links[n], f"ws://{n}", lambda: load, ttl_s=0.5) for n in ("a", "d"))
    asked: list[str] = []

    async def hand_over(message: dict[str, Any]) -> None:  # node d's side of the bus
        asked.append(str(message["player_id"]))
        await links["d"].reply(message, {"flushed": True})

    links["d"].on("store_handover", hand_over)
    try:
        for link in links.values():
            await link.start()
        await a.beat()
        await d.beat()
        assert not a.alive("d") and await a.is_alive("d")
        assert not await a.is_alive("never-started")
        await links["d"].redis.set(holder_key("p1"), "d")
        await WalletHandover(links["a"], a, None, "a").handover("p1")  # type: ignore[arg-type]
        assert asked == ["p1"]
        assert await links["a"].redis.get(holder_key("p1")) == b"a"

        # d's heartbeat expires: its record is stale, the load does not wait for it.
        await asyncio.sleep(0.7)
        assert not await a.is_alive("d")
        await links["a"].redis.set(holder_key("p2"), "d")
        await WalletHandover(links["a"], a, None, "a").handover("p2")  # type: ignore[arg-type]
        assert asked == ["p1"]
    finally:
        for link in links.values():
            await link.stop()
        redis.stop()
