"""Which node a formed group is sent to, decided from a real node listing in a real Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from asobi.cluster.forming import Group, QueuedTicket
from asobi.cluster.link import RedisLink
from asobi.cluster.nodes import NodeDirectory
from asobi.cluster.placement import choose_node
from tests.cluster_support import REDIS_BIN, RedisServer

pytestmark = pytest.mark.skipif(REDIS_BIN is None, reason="needs redis-server")


def group_of(*homes: str) -> Group:
    tickets = [
        QueuedTicket(f"t{i}", f"p{i}", "solo", home, 0.0, 0.0) for i, home in enumerate(homes)
    ]
    return Group("g1", "solo", "a", tickets)


async def test_a_group_goes_to_its_players_node_even_when_that_node_started_since_the_last_read(
    tmp_path: Path,
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
    finally:
        for link in links.values():
            await link.stop()
        redis.stop()
