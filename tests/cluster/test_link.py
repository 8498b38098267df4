"""The node's Redis link: a burst of calls larger than its pool, requests to a node that is gone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from asobi.cluster.link import POOL_CONNECTIONS, RedisLink, Unavailable
from tests.cluster_support import REDIS_BIN, RedisServer

pytestmark = pytest.mark.skipif(REDIS_BIN is None, reason="needs redis-server")


async def test_a_burst_larger_than_the_pool_waits_instead_of_marking_redis_down(
    tmp_path: Path,
) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    link = RedisLink(redis.url, "burst-node")
    try:
        # Each BLPOP holds its connection for 0.3 s, so half again as many calls as the pool
        # has connections must wait for one: they are answered, and Redis stays up.
        calls = POOL_CONNECTIONS + POOL_CONNECTIONS // 2
        replies = await asyncio.gather(
            *(
                link.call("wait", link.redis.blpop([f"burst:{i}"], timeout=0.3))
                for i in range(calls)
            )
        )
        assert replies == [None] * calls
        assert link.up
    finally:
        await link.stop()
        redis.stop()


async def test_a_request_to_a_node_that_is_gone_fails_at_once(tmp_path: Path) -> None:
    """A node seen gone fails the requests waiting on it; requests to others keep waiting."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    link = RedisLink(redis.url, "asking-node")
    await link.start()
    try:
        loop = asyncio.get_running_loop()
        to_gone = asyncio.create_task(link.request("gone-node", "drain.take", {}, timeout_s=30))
        to_other = asyncio.create_task(link.request("other-node", "drain.take", {}, timeout_s=1))
        await asyncio.sleep(0.2)
        started = loop.time()
        link.abandon("gone-node")
        with pytest.raises(Unavailable, match="gone-node is gone"):
            await to_gone
        assert loop.time() - started < 1
        with pytest.raises(Unavailable, match="other-node did not answer"):
            await to_other
    finally:
        await link.stop()
        redis.stop()
