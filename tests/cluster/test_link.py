"""The node's Redis link under a burst: more calls at once than it has connections."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from asobi.cluster.link import POOL_CONNECTIONS, RedisLink
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
